"""Where a clip is active: frame-wise A-weighted RMS level against the clip's own peak.

The paper re-derives event boundaries from A-weighted RMS; here the threshold is relative to
the loudest frame of the clip (`threshold_db`, e.g. -35 dB), so it is independent of the
clip's gain. Spans are `[n_spans, 2]` float arrays of (onset_s, offset_s), sorted, disjoint.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

_EPS = 1e-20


def a_weighting_gain(freqs_hz: np.ndarray) -> np.ndarray:
    """Linear amplitude gain of the IEC 61672 A-weighting curve (1.0 at 1 kHz)."""
    f2 = np.asarray(freqs_hz, dtype=np.float64) ** 2
    num = (12194.0**2) * f2**2
    den = (f2 + 20.6**2) * np.sqrt((f2 + 107.7**2) * (f2 + 737.9**2)) * (f2 + 12194.0**2)
    gain = num / np.maximum(den, _EPS)
    return gain * 10 ** (2.0 / 20)  # +2.00 dB normalises the curve to 0 dB at 1 kHz


def a_weighted_level_db(
    samples: np.ndarray, sample_rate: int, frame_s: float = 0.025, hop_s: float = 0.010
) -> np.ndarray:
    """A-weighted RMS level per frame in dBFS, `[n_frames]`; frame i is centred at i * hop_s."""
    frame = max(int(round(frame_s * sample_rate)), 2)
    hop = max(int(round(hop_s * sample_rate)), 1)
    x = np.asarray(samples, dtype=np.float32)
    n_frames = int(np.ceil(len(x) / hop)) if len(x) else 0
    if n_frames == 0:
        return np.zeros(0)
    padded = np.pad(x, (frame // 2, frame // 2 + hop * n_frames - len(x) + 1))
    frames = sliding_window_view(padded, frame)[::hop][:n_frames]
    window = np.hanning(frame).astype(np.float32)
    spectrum = np.fft.rfft(frames * window, axis=-1)
    weights = a_weighting_gain(np.fft.rfftfreq(frame, 1.0 / sample_rate)) ** 2
    # Parseval with the one-sided spectrum; divide by the window energy so that a full-scale
    # 1 kHz sine reads about -3 dBFS, as its plain RMS would.
    power = np.abs(spectrum) ** 2 * weights
    power[:, 1:-1] *= 2.0
    mean_square = power.sum(axis=-1) / (frame * float(np.sum(window**2)))
    return 10.0 * np.log10(mean_square + _EPS)


def active_spans(
    samples: np.ndarray,
    sample_rate: int,
    threshold_db: float = -35.0,
    frame_s: float = 0.025,
    hop_s: float = 0.010,
    min_span_s: float = 0.03,
    merge_gap_s: float = 0.10,
) -> np.ndarray:
    """Active regions of a clip as `[n_spans, 2]` (onset_s, offset_s).

    A frame is active when its A-weighted level is within `threshold_db` (negative) of the
    clip's loudest frame. Gaps shorter than `merge_gap_s` are bridged, then spans shorter
    than `min_span_s` are dropped. A silent clip has no spans.
    """
    duration_s = len(samples) / sample_rate
    level = a_weighted_level_db(samples, sample_rate, frame_s, hop_s)
    if level.size == 0 or level.max() <= 10.0 * np.log10(_EPS) + 1.0:
        return np.zeros((0, 2))
    active = level >= level.max() + threshold_db
    edges = np.diff(np.concatenate(([0], active.astype(np.int8), [0])))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)  # exclusive frame index
    # A frame stands for the hop-long interval around its centre.
    onsets = np.clip(starts * hop_s - hop_s / 2, 0.0, duration_s)
    offsets = np.clip((ends - 1) * hop_s + hop_s / 2, 0.0, duration_s)
    spans = np.stack([onsets, offsets], axis=1)
    spans = merge_close_spans(spans, merge_gap_s)
    keep = (spans[:, 1] - spans[:, 0]) >= min_span_s
    return spans[keep]


def merge_close_spans(spans: np.ndarray, max_gap_s: float) -> np.ndarray:
    """Join consecutive sorted spans whose gap is at most `max_gap_s` (or that overlap)."""
    if len(spans) < 2:
        return spans.copy()
    gaps = spans[1:, 0] - spans[:-1, 1]
    new_group = np.concatenate(([True], gaps > max_gap_s))
    onsets = spans[new_group, 0]
    offsets = np.maximum.reduceat(spans[:, 1], np.flatnonzero(new_group))
    return np.stack([onsets, offsets], axis=1)
