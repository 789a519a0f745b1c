"""Recordings longer than one mixture: several consecutive `mixture_s` mixtures over one
background that plays continuously under all of them.

The Mixer renders fixed-length mixtures, so concatenation is how a recording gets long; each
mixture plays the recording's background clip from where the previous one stopped (its looped
offset advanced by `mixture_s`), so the bed has no seams. The moment-retrieval benchmark and the
real-recording test set both make their long recordings this way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from flam_core.errors import ConfigError, DataError

if TYPE_CHECKING:
    from flam_core.data.mixer import Mixer
    from flam_core.data.recipes import ClipPool


def merge_spans(spans: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Overlapping or touching `(onset, offset)` spans joined, sorted by onset: the truth of a
    label in a recording, however many of its events overlap."""
    out: list[list[float]] = []
    for onset, offset in sorted(spans):
        if out and onset <= out[-1][1] + 1e-9:
            out[-1][1] = max(out[-1][1], offset)
        else:
            out.append([onset, offset])
    return [(a, b) for a, b in out]


def mixtures_per_recording(
    rng: np.random.Generator, n_recordings: int, mixture_s: float, min_s: float, max_s: float
) -> np.ndarray:
    """`[n_recordings]` mixtures per recording, drawn uniformly among the whole numbers of
    `mixture_s` mixtures that last `min_s`-`max_s` seconds."""
    if isinstance(n_recordings, bool) or not isinstance(n_recordings, int) or n_recordings < 1:
        raise ConfigError(f"the number of recordings must be a positive integer, got {n_recordings!r}")
    if not (math.isfinite(min_s) and math.isfinite(max_s)) or min_s > max_s:
        raise ConfigError(f"recording lengths must satisfy min_s <= max_s, got {min_s} and {max_s}")
    fewest = max(1, math.ceil(min_s / mixture_s - 1e-9))
    most = math.floor(max_s / mixture_s + 1e-9)
    if most < fewest:
        raise ConfigError(
            f"no recording of {min_s:g}-{max_s:g} s is a whole number of {mixture_s:g} s mixtures"
        )
    return rng.integers(fewest, most + 1, n_recordings)


def continuous_backgrounds(
    recipes: pd.DataFrame,
    mixer: Mixer,
    pool: ClipPool,
    n_mixtures: np.ndarray,
    rng: np.random.Generator,
) -> list[tuple[str, str]]:
    """One background clip under each recording: every mixture plays it from where the previous
    one stopped. Returns (clip id, label) per recording; edits `recipes` in place."""
    background = np.flatnonzero((recipes["kind"].astype(str) == "background").to_numpy())
    if len(background) != int(n_mixtures.sum()):
        raise DataError("each sampled mixture must have exactly one background row")
    recipes["clip_id"] = recipes["clip_id"].astype(str)
    recipes["label"] = recipes["label"].astype(str)
    mixture_s = mixer.synth.mixture_s
    offsets = recipes["clip_offset_s"].to_numpy(np.float64).copy()
    clips, labels = recipes["clip_id"].to_numpy(object), recipes["label"].to_numpy(object)
    chosen = []
    first = 0
    for n in n_mixtures.tolist():
        k = int(rng.integers(len(pool.background_ids)))
        clip, label = str(pool.background_ids[k]), str(pool.background_labels[k])
        period = float(mixer.loop_period_s[mixer.clip_index[clip]])
        start = float(rng.uniform(0.0, period))
        rows = background[first : first + n]
        clips[rows], labels[rows] = clip, label
        offsets[rows] = np.mod(start + mixture_s * np.arange(n), period)
        chosen.append((clip, label))
        first += n
    recipes["clip_id"], recipes["label"], recipes["clip_offset_s"] = clips, labels, offsets
    return chosen
