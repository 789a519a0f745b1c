"""Frame-level scores for a fixed vocabulary, and frame AUROC (scikit-learn).

`vocabulary_scores` scores every cached mixture against every label of a vocabulary (the
label itself is the prompt), with the unbiased detector; `frame_auroc` compares them with
the ground-truth frames, micro (all frames of all labels pooled) and macro (mean over labels
that have both positive and negative frames).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from flam_core.errors import DataError

if TYPE_CHECKING:
    from flam_core.features import FeatureCache
    from flam_core.train import FlamModel


def truth_matrix(cache: FeatureCache, vocabulary: Sequence[str]) -> np.ndarray:
    """`[M, K, L]` bool: label k sounds in frame l of mixture m."""
    index = {label: k for k, label in enumerate(vocabulary)}
    n_frames = cache.features.shape[1]
    truth = np.zeros((len(cache), len(vocabulary), n_frames), dtype=bool)
    for m, (_, labels) in enumerate(cache.labels):
        for row, label in enumerate(labels.labels):
            if label in index:
                truth[m, index[label]] = labels.frames[row]
    return truth


@torch.no_grad()
def vocabulary_scores(
    model: FlamModel,
    cache: FeatureCache,
    vocabulary: Sequence[str],
    batch_size: int = 64,
    unbiased: bool = True,
) -> np.ndarray:
    """`[M, K, L]` float32 frame probabilities of every vocabulary label in every mixture."""
    model.eval()
    head = model.head
    text_features = model.text_encoder(list(vocabulary))
    text_emb = head.text_embeddings(text_features)
    alpha, beta = head.text_scale_bias(text_features)
    scores = []
    for start in range(0, len(cache), batch_size):
        frames = torch.from_numpy(np.asarray(cache.features[start : start + batch_size], dtype=np.float32))
        frame_emb = head.frame_embeddings(head.contextualise(frames))
        if unbiased:
            scores.append(head.unbiased_scores(head.frame_logits(frame_emb, text_emb, alpha, beta), beta))
        else:
            scores.append(head.approximate_scores(frame_emb, text_emb, alpha))
    return torch.cat(scores).numpy()


def frame_auroc(truth: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Micro and macro frame AUROC of `[M, K, L]` truth and scores."""
    if truth.shape != scores.shape:
        raise DataError(f"truth {truth.shape} and scores {scores.shape} differ in shape")
    if not truth.any() or truth.all():
        raise DataError("frame AUROC needs both positive and negative frames")
    per_label = []
    for k in range(truth.shape[1]):
        labels = truth[:, k].ravel()
        if labels.any() and not labels.all():
            per_label.append(roc_auc_score(labels, scores[:, k].ravel()))
    return {
        "micro": float(roc_auc_score(truth.ravel(), scores.ravel())),
        "macro": float(np.mean(per_label)),
        "n_labels": len(per_label),
    }


def event_vocabulary(cache: FeatureCache) -> list[str]:
    """The event labels that sound in a cache split, sorted."""
    return sorted(
        {
            lab
            for _, labels in cache.labels
            for lab, ev in zip(labels.labels, labels.is_event, strict=True)
            if ev
        }
    )
