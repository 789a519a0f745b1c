"""Frame-level scores for a fixed vocabulary, and frame AUROC (scikit-learn).

`vocabulary_scores` scores every cached mixture against every label of a vocabulary (the
label itself is the prompt), with the unbiased detector; `frame_auroc` compares them with
the ground-truth frames, micro (all frames of all labels pooled) and macro (mean over labels
that have both positive and negative frames).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, get_args

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from flam_core.errors import DataError
from flam_core.features import FeatureCache
from flam_core.model.flam import FlamModel

ScoreKind = Literal["detector", "unbiased", "approximate", "posterior", "logit"]


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
    kind: ScoreKind = "detector",
) -> np.ndarray:
    """`[M, K, L]` float32 frame scores of every vocabulary label in every mixture.

    `kind`: "detector" what the detector reports (`FlamModel.scores`: cohort-normalised when
    the model is calibrated so, else unbiased), "unbiased" `p / (p + sigmoid(beta))`, "approximate"
    `sigmoid(alpha * cos)`, "posterior" `p = sigmoid(alpha * cos + beta)` (the learned prior
    left in), or "logit" the cohort logit before its shared map to a probability (the z-score plus
    the weighted prior, `CohortNorm.logits`; a model with a `score_norm` only)."""
    model.eval()
    head = model.head
    if kind == "logit" and model.score_norm is None:
        raise DataError("cohort logits need a model whose scores are normalised over a cohort")
    # the detector's vectors (the classifier's part after the embeddings, when fused); the head's
    # own scores read the embeddings alone
    prompt, alpha, beta = model.prompt_vectors(model.text_encoder(list(vocabulary)))
    d = head.config.embed_dim
    text_emb = prompt[:, :d]
    scores = []
    for start in range(0, len(cache), batch_size):
        frames = torch.from_numpy(np.asarray(cache.features[start : start + batch_size], dtype=np.float32))
        vectors = model.frame_vectors(frames)
        frame_emb = vectors[..., :d]
        if kind == "detector":
            scores.append(model.scores(vectors, prompt, alpha, beta))
        elif kind == "unbiased":
            scores.append(head.detector_scores(frame_emb, text_emb, alpha, beta))
        elif kind == "approximate":
            scores.append(head.approximate_scores(frame_emb, text_emb, alpha))
        elif kind == "logit":
            scores.append(model.score_norm.logits(vectors, prompt, beta))  # type: ignore[union-attr]
        elif kind == "posterior":
            scores.append(torch.sigmoid(head.frame_logits(frame_emb, text_emb, alpha, beta)))
        else:
            raise DataError(f"unknown score kind {kind!r}; allowed: {', '.join(get_args(ScoreKind))}")
    return torch.cat(scores).numpy()


def frame_truth(
    events: list[tuple[float, float, str]], vocabulary: list[str], n_frames: int, hop: float
) -> np.ndarray:
    """`[K, T]` bool: a frame is active for a label when its events cover >= 25% of the frame."""
    truth = np.zeros((len(vocabulary), n_frames), dtype=bool)
    index = {label: k for k, label in enumerate(vocabulary)}
    edges = np.arange(n_frames + 1) * hop
    for onset, offset, label in events:
        overlap = np.clip(np.minimum(offset, edges[1:]) - np.maximum(onset, edges[:-1]), 0.0, None)
        truth[index[label]] |= overlap >= 0.25 * min(hop, offset - onset)
    return truth


def frame_auroc(truth: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """Micro and macro frame AUROC of `[M, K, L]` truth and scores.

    `per_label` holds each label's AUROC (NaN for a label without both positive and negative
    frames, which has none); `macro` is their mean over the labels that have one.
    """
    if truth.shape != scores.shape:
        raise DataError(f"truth {truth.shape} and scores {scores.shape} differ in shape")
    if not truth.any() or truth.all():
        raise DataError("frame AUROC needs both positive and negative frames")
    per_label = np.full(truth.shape[1], np.nan)
    for k in range(truth.shape[1]):
        labels = truth[:, k].ravel()
        if labels.any() and not labels.all():
            per_label[k] = roc_auc_score(labels, scores[:, k].ravel())
    return {
        "micro": float(roc_auc_score(truth.ravel(), scores.ravel())),
        "macro": float(np.nanmean(per_label)),
        "n_labels": int(np.isfinite(per_label).sum()),
        "per_label": per_label,
    }


def recognition_and_localisation(truth: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Macro frame AUROC split into its two parts, from `[M, K, L]` truth and scores.

    - `clip`: does the score say whether the label sounds in a clip at all? AUROC of each
      clip's highest frame score against the label's presence in the clip (recognition).
    - `within_clip`: does it say when? AUROC over the frames of only the clips in which the
      label sounds (localisation; a score constant over a clip gives 0.5).

    Both are macro averages over the labels that have both classes in that view. A model that
    only tells clips apart (a clip-level objective) can match a frame-trained one on `clip`
    and still trail it on `within_clip`; the frame AUROC mixes the two.
    """
    if truth.shape != scores.shape or truth.ndim != 3:
        raise DataError(f"truth {truth.shape} and scores {scores.shape} must be one [M, K, L] shape")
    present = truth.any(axis=2)  # [M, K]
    clip, within = [], []
    for k in range(truth.shape[1]):
        if present[:, k].any() and not present[:, k].all():
            clip.append(roc_auc_score(present[:, k], scores[:, k].max(axis=1)))
        frames, frame_scores = truth[present[:, k], k].ravel(), scores[present[:, k], k].ravel()
        if frames.any() and not frames.all():
            within.append(roc_auc_score(frames, frame_scores))
    if not clip or not within:
        raise DataError(
            "recognition and localisation need a label present in some clips and absent from others, "
            "and a present label inactive in some of its frames"
        )
    return {"clip": float(np.mean(clip)), "within_clip": float(np.mean(within))}


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


def label_frame_priors(cache: FeatureCache, labels: Sequence[str]) -> np.ndarray:
    """`[K]` each label's frame prior: positive frames per mixture in which it occurs, over L.

    The prior loss's batch prior r_k = positives / (B * L) is this, times the label's share of
    mixtures in a batch; within one vocabulary the two rank the labels alike.
    """
    truth = truth_matrix(cache, labels)
    present = truth.any(axis=2)
    return truth.sum(axis=(0, 2)) / np.maximum(present.sum(axis=0), 1) / truth.shape[2]


@torch.no_grad()
def learned_priors(model: FlamModel, train_cache: FeatureCache) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(training labels, their empirical frame priors, the model's `sigmoid(beta)` for each).

    The logit adjustment should make `sigmoid(beta)` track the frame prior of each label."""
    labels = event_vocabulary(train_cache)
    prior = label_frame_priors(train_cache, labels)
    _, beta = model.head.text_scale_bias(model.text_encoder(labels))
    return labels, prior, torch.sigmoid(beta).numpy()


def rank_correlation(learned: np.ndarray, prior: np.ndarray) -> float | None:
    """Spearman correlation of learned and empirical priors; None where the model has one shared
    bias (ablation `no_text_bias`): a constant has no ranking to compare. Equal to 1e-6 counts as
    constant: torch's vectorised sigmoid can give one shared bias values a last bit apart."""
    from scipy.stats import spearmanr

    if np.allclose(learned, learned[0], rtol=1e-6, atol=0.0) or np.ptp(prior) == 0.0:
        return None
    return round(float(spearmanr(learned, prior).statistic), 4)


def macro_gain_interval(
    ours: dict[str, float],
    baseline: dict[str, float],
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> dict[str, Any]:
    """How far a macro-average gain (ours minus baseline) can be trusted, over the labels.

    `ours` and `baseline` map each label to a per-label metric (e.g. frame AUROC) of two models
    scored on the same data. The macro gain is the mean of the per-label differences; a
    bootstrap over the labels (scipy's BCa interval, seeded) says how much that mean would
    move with another draw of labels of the same kind, which for a held-out vocabulary of a
    few dozen prompts is the main source of uncertainty. Also: on how many labels ours wins.
    """
    from scipy.stats import bootstrap

    if ours.keys() != baseline.keys():
        differing = sorted(ours.keys() ^ baseline.keys())
        raise DataError(f"the two models are scored on different labels: {differing[:5]}")
    labels = sorted(ours)
    if len(labels) < 2:
        raise DataError(f"a gain interval needs at least 2 labels, got {len(labels)}")
    if not 0.0 < confidence < 1.0:
        raise DataError(f"confidence must lie in (0, 1), got {confidence}")
    diff = np.array([ours[label] - baseline[label] for label in labels])
    if np.ptp(diff) < 1e-9:  # every label moved alike: nothing to resample
        low = high = float(diff.mean())
    else:
        result = bootstrap(
            (diff,),
            np.mean,
            confidence_level=confidence,
            n_resamples=resamples,
            method="BCa",
            rng=np.random.default_rng(seed),
        )
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    return {
        "gain": float(diff.mean()),
        "low": low,
        "high": high,
        "confidence": confidence,
        "n_labels": len(labels),
        "n_better": int((diff > 0).sum()),
    }
