"""Logits -> frame scores -> segments: the reference post-processing that detection and
evaluation share.

`unbiased_scores` is the one place the detector's score `p / (p + sigmoid(beta))` is computed
(FLAM_SPEC's logit adjustment: the learned label prior removed, so one threshold serves every
prompt); training's evaluation, calibration, `flam detect` and `flam search` all call it.

A score track holds one value per frame of `hop_s` seconds (frame l spans `[l * hop, (l + 1) *
hop)`). The post-processing (FLAM_SPEC) is a median filter over `MEDIAN_FRAMES` frames, then the
threshold: a frame is active when its filtered score is strictly above the threshold, and each
run of active frames is one segment, scored by the highest unfiltered score inside it.

This module needs only numpy and torch, so `flam detect`, `flam search` and the served model
import neither scipy nor the metric libraries of `flam_core.evaluation.sed`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

from flam_core.errors import DataError

# The reference post-processing (FLAM_SPEC): a median filter over 3 frames, then the
# threshold. `flam detect` applies it, so thresholds are chosen and F1 is measured after it.
MEDIAN_FRAMES = 3


def unbiased_scores(logits: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """`p / (p + sigmoid(beta))` with `p = sigmoid(logits)`; `beta` broadcasts against `logits`
    (`[B, K, L]` logits take `beta[None, :, None]`, `[T, K]` logits take `beta` `[K]`).

    In log space, `log s = log p - log(p + sigmoid(beta))`, which stays exact when both p and
    sigmoid(beta) are tiny (beta around -8 and below).
    """
    log_p = F.logsigmoid(logits)
    return torch.exp(log_p - torch.logaddexp(log_p, F.logsigmoid(beta)))


def is_number(value: object) -> bool:
    """A real number (Python or numpy), not a bool."""
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )


def check_hop(hop_s: float) -> float:
    """`hop_s` as a float; `DataError` unless it is a positive, finite number of seconds."""
    if not is_number(hop_s) or not math.isfinite(hop_s) or hop_s <= 0:
        raise DataError(f"hop_s must be a positive number of seconds, got {hop_s!r}")
    return float(hop_s)


def median_filter_frames(probs: np.ndarray, median_frames: int = MEDIAN_FRAMES) -> np.ndarray:
    """Median filter over the last (frame) axis of any score array; 1 returns the input."""
    if (
        not isinstance(median_frames, int | np.integer)
        or isinstance(median_frames, bool)
        or median_frames < 1
    ):
        raise DataError(f"median_frames must be a positive integer, got {median_frames!r}")
    probs = np.asarray(probs)
    if median_frames == 1:
        return probs
    # scipy.ndimage.median_filter(size=(1, ..., k), mode="nearest") as a rank selection over
    # sliding windows: the same values (the element of rank k // 2, edges repeated), without
    # importing scipy.ndimage (half a second of a detection's start-up).
    k = int(median_frames)
    padded = np.pad(probs, [(0, 0)] * (probs.ndim - 1) + [(k // 2, k - 1 - k // 2)], mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, k, axis=-1)
    return np.partition(windows, k // 2, axis=-1)[..., k // 2]


def active_runs(active: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start frames, end frames (exclusive), highest `probs` value) of each run of `active` frames."""
    edges = np.diff(np.concatenate([[False], active, [False]]).astype(np.int8))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    if starts.size == 0:
        return starts, ends, np.zeros(0, dtype=np.asarray(probs).dtype)
    bounds = np.stack([starts, ends], axis=1).ravel()
    return starts, ends, np.maximum.reduceat(np.append(probs, -np.inf), bounds)[::2]


def segments_from_frames(
    probs_k: np.ndarray, hop_s: float, threshold: float, median_frames: int = MEDIAN_FRAMES
) -> list[tuple[float, float, float]]:
    """(onset s, offset s, max score) of each run of frames whose median-filtered score is above threshold.

    The score of a segment is the highest unfiltered score inside it.
    """
    probs_k = np.asarray(probs_k, dtype=np.float64)
    if probs_k.ndim != 1 or probs_k.size == 0:
        raise DataError(
            f"frame scores of one label must be a non-empty [L] vector, got shape {probs_k.shape}"
        )
    if not np.isfinite(probs_k).all():
        raise DataError(f"frame scores hold {int((~np.isfinite(probs_k)).sum())} NaN/inf value(s)")
    hop_s = check_hop(hop_s)
    if not is_number(threshold) or not math.isfinite(threshold):
        raise DataError(f"threshold must be a finite number, got {threshold!r}")
    starts, ends, peaks = active_runs(median_filter_frames(probs_k, median_frames) > threshold, probs_k)
    return [
        (float(s * hop_s), float(e * hop_s), float(p)) for s, e, p in zip(starts, ends, peaks, strict=True)
    ]
