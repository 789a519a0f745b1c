"""Retrieval (text<->audio recall@k, mAP@10) and zero-shot classification accuracy.

Retrieval ranks by cosine similarity. Text->audio has one relevant audio per text;
audio->text has every text of the audio as relevant: R@k counts a query as a hit when any
relevant item is in its top k, and mAP@10 averages over queries the precision at each relevant
rank within the top 10, divided by min(#relevant, 10). Rankings come from one stable argsort
of the whole similarity matrix, so equal similarities rank by index.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import balanced_accuracy_score

from flam_core.errors import DataError

RECALL_KS = (1, 5, 10)
MAP_K = 10


def _check_matrix(name: str, values: np.ndarray) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim != 2:
        raise DataError(f"{name} must be a 2-D array, got shape {values.shape}")
    if values.size == 0:
        raise DataError(f"{name} is empty (shape {values.shape})")
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
        raise DataError(f"{name} must be real numbers, got dtype {values.dtype}")
    bad = ~np.isfinite(values)
    if bad.any():
        raise DataError(
            f"{name} holds {int(bad.sum())} NaN/inf value(s), first at row {np.argwhere(bad)[0][0]}"
        )
    return values.astype(np.float64, copy=False)


def _check_index(name: str, values: np.ndarray, n_rows: int, n_classes: int, what: str) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim != 1 or len(values) != n_rows:
        raise DataError(f"{name} must be a [{n_rows}] vector, got shape {values.shape}")
    if not np.issubdtype(values.dtype, np.integer):
        raise DataError(f"{name} must hold integer {what} indices, got dtype {values.dtype}")
    out_of_range = (values < 0) | (values >= n_classes)
    if out_of_range.any():
        raise DataError(
            f"{name} holds {int(out_of_range.sum())} index(es) outside [0, {n_classes}), "
            f"e.g. {int(values[out_of_range][0])}"
        )
    return values.astype(np.int64, copy=False)


def _normalise(name: str, emb: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    zero = norms[:, 0] == 0
    if zero.any():
        raise DataError(
            f"{name} holds {int(zero.sum())} all-zero row(s), e.g. row {int(np.flatnonzero(zero)[0])}"
        )
    return emb / norms


def _ranking_metrics(sim: np.ndarray, relevant: np.ndarray, prefix: str) -> dict[str, float]:
    """R@k and mAP@10 of queries (rows of `sim`) against items, `relevant` a [Q, I] bool mask."""
    order = np.argsort(-sim, axis=1, kind="stable")
    hits = np.take_along_axis(relevant, order[:, :MAP_K], axis=1)
    out = {f"{prefix}_R@{k}": float(hits[:, :k].any(axis=1).mean()) for k in RECALL_KS}
    precision_at = np.cumsum(hits, axis=1) / np.arange(1, hits.shape[1] + 1)
    n_relevant = np.minimum(relevant.sum(axis=1), MAP_K)
    out[f"{prefix}_mAP@{MAP_K}"] = float(((precision_at * hits).sum(axis=1) / n_relevant).mean())
    return out


def retrieval_metrics(
    audio_emb: np.ndarray, text_emb: np.ndarray, text_to_audio: np.ndarray
) -> dict[str, float]:
    """Text->audio and audio->text R@1/5/10 and mAP@10 by cosine similarity.

    `text_to_audio[t]` is the index of the audio that text t describes; every audio needs at
    least one text. Keys: "t2a_R@1", ..., "t2a_mAP@10", "a2t_R@1", ..., "a2t_mAP@10".
    """
    audio_emb = _check_matrix("audio embeddings", audio_emb)
    text_emb = _check_matrix("text embeddings", text_emb)
    if audio_emb.shape[1] != text_emb.shape[1]:
        raise DataError(
            f"audio embeddings have dimension {audio_emb.shape[1]} but text embeddings {text_emb.shape[1]}"
        )
    n_audio = len(audio_emb)
    text_to_audio = _check_index("text_to_audio", text_to_audio, len(text_emb), n_audio, "audio")
    n_texts = np.bincount(text_to_audio, minlength=n_audio)
    if (n_texts == 0).any():
        raise DataError(
            f"{int((n_texts == 0).sum())} audio(s) have no text, e.g. audio "
            f"{int(np.flatnonzero(n_texts == 0)[0])}; audio->text recall is undefined for them"
        )
    sim = _normalise("text embeddings", text_emb) @ _normalise("audio embeddings", audio_emb).T  # [T, N]
    relevant = text_to_audio[:, None] == np.arange(n_audio)[None, :]
    return {**_ranking_metrics(sim, relevant, "t2a"), **_ranking_metrics(sim.T, relevant.T, "a2t")}


def zero_shot_accuracy(scores: np.ndarray, targets: np.ndarray) -> dict[str, float | int]:
    """Top-1 (and top-5 when there are at least 5 classes) accuracy and per-class mean accuracy.

    `scores` is [N, C] (higher = more likely), `targets` the [N] true class indices. The
    per-class mean averages top-1 recall over the classes that occur in `targets`.
    """
    scores = _check_matrix("class scores", scores)
    n_classes = scores.shape[1]
    targets = _check_index("targets", targets, len(scores), n_classes, "class")
    order = np.argsort(-scores, axis=1, kind="stable")
    hit_rank = order == targets[:, None]
    out: dict[str, float | int] = {"top1": float(hit_rank[:, 0].mean())}
    if n_classes >= 5:
        out["top5"] = float(hit_rank[:, :5].any(axis=1).mean())
    with warnings.catch_warnings():
        # Predictions of classes absent from the targets are expected and do not change the score.
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        # Few clips per class (a zero-shot test set) is expected too: the targets are classes.
        warnings.filterwarnings("ignore", message="The number of unique classes is greater than 50%")
        out["mean_class_accuracy"] = float(balanced_accuracy_score(targets, order[:, 0]))
    out["n"] = len(targets)
    return out
