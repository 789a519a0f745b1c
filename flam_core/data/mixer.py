"""Recipe -> waveform and frame labels, deterministically.

The source library is decoded once into one contiguous float32 pool holding the clips'
16-bit values / 32768 exactly (forked loader workers share it). float32 rather than int16:
numpy multiplies int16 by a float32 gain about twice as slowly, and mixing is the hot path.
Backgrounds are additionally stored looped (with a short crossfade at each seam) so that
any `clip_offset_s` yields a contiguous mixture-long slice.

`Mixer.plan(recipes)` turns a recipe table into flat per-row arrays (sample offsets,
linear gains, pool positions); `Mixer.mix(plan, i)` then renders mixture i with a few
slice-and-add operations per row. The same recipe always gives bit-identical float32 audio:
the operations and their order are fixed, and nothing depends on the process.

Frame labels: mixture time is cut into `frames.n_frames` equal frames. For each distinct
label sounding in the mixture, a frame is positive when the label's active spans (from the
source manifest, mapped through each piece's clip offset and onset, not the placement
window) cover at least `frames.min_coverage` of it, or when it holds at least half of a
span shorter than a frame (so that a short click still marks the frame it falls in).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf

from flam_core.config import FrameParams, Params, SynthParams, frame_hop_s
from flam_core.data.events import Event
from flam_core.errors import DataError

LOOP_CROSSFADE_S = 0.05
PEAK_LIMIT = 0.99


@dataclass(frozen=True)
class FrameLabels:
    """What sounds where in one mixture. `frames` is `[K, n_frames]` bool, one row per label."""

    labels: tuple[str, ...]  # distinct labels, events in order of first onset, then the background
    captions: tuple[str, ...]  # the text used for each label (the recipe's caption for events)
    is_event: np.ndarray  # [K] bool; the background's label is last with False
    frames: np.ndarray  # [K, n_frames] bool


@dataclass(frozen=True)
class Mixture:
    mixture_id: int
    audio: np.ndarray  # [n_samples] float32, peak <= 0.99
    labels: FrameLabels


@dataclass(frozen=True)
class MixPlan:
    """A recipe split resolved against the pool: flat per-row arrays, rows grouped by mixture."""

    mixture_ids: np.ndarray  # [M] int64
    row_start: np.ndarray  # [M + 1] rows of mixture i are row_start[i]:row_start[i+1]
    is_event: np.ndarray  # [R] bool
    src_start: np.ndarray  # [R] int64 first pool sample of the piece
    n_samples: np.ndarray  # [R] int64 samples to add (clipped to what the clip holds)
    dst_start: np.ndarray  # [R] int64 first mixture sample
    gain: np.ndarray  # [R] float32 linear gain
    fade: np.ndarray  # [R] int64 fade length in samples
    clip: np.ndarray  # [R] int64 pool clip index
    offset_s: np.ndarray  # [R] float64 clip offset of the piece
    onset_s: np.ndarray  # [R] float64
    duration_s: np.ndarray  # [R] float64
    label: np.ndarray  # [R] int64 index into Mixer.labels
    text: np.ndarray  # [R] int64 index into Mixer.texts

    def __len__(self) -> int:
        return len(self.mixture_ids)


class Mixer:
    """Renders recipes of one source library. See the module docstring."""

    @classmethod
    def for_library(cls, params: Params, library_dir: Path) -> Mixer:
        """A mixer over the library in `library_dir`, with the synth, frames and rate of params."""
        from flam_core.data.sources import load_manifest

        library_dir = Path(library_dir)
        return cls(
            load_manifest(library_dir), library_dir, params.synth, params.frames, params.audio.sample_rate
        )

    def __init__(
        self,
        manifest: pd.DataFrame,
        library_dir: Path,
        synth: SynthParams,
        frames: FrameParams,
        sample_rate: int,
    ) -> None:
        self.synth, self.frames, self.sample_rate = synth, frames, sample_rate
        self.n_samples = int(round(synth.mixture_s * sample_rate))
        manifest = manifest.sort_values("clip_id", ignore_index=True)
        rates = set(manifest["sample_rate"])
        if rates != {sample_rate}:
            raise DataError(f"source library is at {sorted(rates)} Hz, the profile mixes at {sample_rate} Hz")
        self.clip_index = {cid: i for i, cid in enumerate(manifest["clip_id"])}
        self.is_background = (manifest["kind"] == "background").to_numpy()
        self.rms_dbfs = manifest["active_rms_dbfs"].to_numpy(float)
        self.labels = np.unique(manifest["label"].to_numpy(str))
        self.label_of = np.searchsorted(self.labels, manifest["label"].to_numpy(str))
        captions = manifest["captions"].map(list).to_list()
        self.texts: list[str] = []
        self.text_start = np.zeros(len(manifest), dtype=np.int64)
        for i, caps in enumerate(captions):
            self.text_start[i] = len(self.texts)
            self.texts.extend(caps)
        self.n_captions = np.array([len(c) for c in captions])
        self._load_pool(manifest, Path(library_dir))
        self._load_spans(manifest)

    # ---------------------------------------------------------------------------------------
    def _load_pool(self, manifest: pd.DataFrame, library_dir: Path) -> None:
        chunks, starts, lengths, periods = [], [], [], []
        position = 0
        crossfade = int(LOOP_CROSSFADE_S * self.sample_rate)
        for row in manifest.itertuples(index=False):
            path = library_dir / row.path
            try:
                clip = sf.read(str(path), dtype="int16")[0]
            except (sf.LibsndfileError, RuntimeError, OSError) as exc:
                raise DataError(f"clip {row.clip_id}: cannot read {path} ({exc})") from exc
            lengths.append(len(clip))
            periods.append(len(clip))
            if row.kind == "background":
                periods[-1] = len(clip) - min(crossfade, len(clip) // 4)
                clip = _loop(clip, self.n_samples + len(clip), crossfade)
            starts.append(position)
            chunks.append(clip)
            position += len(clip)
        pool = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
        self.pool = pool.astype(np.float32) / np.float32(32768.0)
        self.pool_start = np.array(starts, dtype=np.int64)
        self.clip_samples = np.array(lengths, dtype=np.int64)
        self.loop_period_s = np.array(periods, dtype=np.float64) / self.sample_rate

    def _load_spans(self, manifest: pd.DataFrame) -> None:
        """Flat span table; a background's spans are repeated over its looped length."""
        spans, owner = [], []
        for i, row in enumerate(manifest.itertuples(index=False)):
            clip_spans = np.asarray([list(s) for s in row.active_spans], dtype=float).reshape(-1, 2)
            if row.kind == "background":
                period = self.loop_period_s[i]
                repeats = int(np.ceil(self.synth.mixture_s / period)) + 2
                clip_spans = np.concatenate([clip_spans + k * period for k in range(repeats)])
            spans.append(clip_spans)
            owner.append(np.full(len(clip_spans), i))
        self.spans = np.concatenate(spans)
        self.span_owner = np.concatenate(owner)
        counts = np.bincount(self.span_owner, minlength=len(manifest))
        self.span_start = np.concatenate(([0], np.cumsum(counts)))

    # ---------------------------------------------------------------------------------------
    def plan(self, recipes: pd.DataFrame) -> MixPlan:
        """Resolve a recipe table (sorted by mixture_id, as written) against the pool."""
        clip_ids = recipes["clip_id"].astype(str).to_numpy()
        clip = np.fromiter(
            (self.clip_index.get(c, -1) for c in clip_ids), dtype=np.int64, count=len(clip_ids)
        )
        if (clip < 0).any():
            missing = sorted(set(clip_ids[clip < 0]))
            raise DataError(f"recipes reference clip(s) missing from the source library: {missing[:10]}")
        mixture = recipes["mixture_id"].to_numpy(np.int64)
        if len(mixture) and (np.diff(mixture) < 0).any():
            raise DataError("recipe rows must be sorted by mixture_id")
        ids, first = np.unique(mixture, return_index=True)
        is_event = (recipes["kind"].astype(str) == "event").to_numpy()
        if (self.is_background[clip] == is_event).any():
            raise DataError("recipe rows disagree with the library about which clips are backgrounds")
        sr = self.sample_rate
        offset_s = recipes["clip_offset_s"].to_numpy(np.float64)
        onset_s = recipes["onset_s"].to_numpy(np.float64)
        duration_s = recipes["duration_s"].to_numpy(np.float64)
        offset = np.round(offset_s * sr).astype(np.int64)
        dst_start = np.round(onset_s * sr).astype(np.int64)
        n = np.minimum(np.round(duration_s * sr).astype(np.int64), self.n_samples - dst_start)
        n = np.where(is_event, np.minimum(n, self.clip_samples[clip] - offset), n)
        reference = np.where(is_event, self.synth.background_dbfs + recipes["gain_db"].to_numpy(float), 0.0)
        reference = np.where(is_event, reference, self.synth.background_dbfs)
        gain = (10 ** ((reference - self.rms_dbfs[clip]) / 20)).astype(np.float32)
        caption = recipes["caption_id"].to_numpy(np.int64)
        if (is_event & ((caption < 0) | (caption >= self.n_captions[clip]))).any():
            raise DataError("recipe caption_id out of range for its clip's captions")
        text = np.where(is_event, self.text_start[clip] + caption, self.text_start[clip])
        return MixPlan(
            mixture_ids=ids,
            row_start=np.append(first, len(mixture)).astype(np.int64),
            is_event=is_event,
            src_start=self.pool_start[clip] + offset,
            n_samples=np.maximum(n, 0),
            dst_start=dst_start,
            gain=gain,
            fade=np.where(is_event, np.round(recipes["fade_s"].to_numpy(float) * sr), 0).astype(np.int64),
            clip=clip,
            offset_s=offset_s,
            onset_s=onset_s,
            duration_s=duration_s,
            label=self.label_of[clip],
            text=text,
        )

    def render(self, plan: MixPlan, i: int) -> np.ndarray:
        """The waveform of mixture i: `[n_samples]` float32, peak-limited to `PEAK_LIMIT`."""
        out = self.render_rows(plan, range(plan.row_start[i], plan.row_start[i + 1]))
        peak = max(out.max(), -out.min())  # two reductions, no |out| temporary
        if peak > PEAK_LIMIT:
            out *= np.float32(PEAK_LIMIT / peak)
        return out

    def render_rows(self, plan: MixPlan, rows: Iterable[int]) -> np.ndarray:
        """The sum of the given plan rows, without the peak limiter (`[n_samples]` float32)."""
        out = np.zeros(self.n_samples, dtype=np.float32)
        pool = self.pool
        rows = np.fromiter(rows, dtype=np.int64)
        # Python scalars: indexing numpy arrays element by element is the slow part here.
        columns = zip(
            plan.src_start[rows].tolist(),
            plan.n_samples[rows].tolist(),
            plan.dst_start[rows].tolist(),
            plan.gain[rows],
            plan.fade[rows].tolist(),
            strict=True,
        )
        for src, n, dst, gain, fade in columns:
            if n <= 0:
                continue
            piece = pool[src : src + n] * gain
            fade = min(fade, n // 2)
            if fade > 0:
                ramp = self._ramp(fade)
                piece[:fade] *= ramp
                piece[n - fade :] *= ramp[::-1]
            out[dst : dst + n] += piece
        return out

    @functools.cache  # noqa: B019 - a handful of fade lengths per mixer
    def _ramp(self, n: int) -> np.ndarray:
        return np.linspace(0.0, 1.0, n, endpoint=False, dtype=np.float32)

    def _active_spans(self, plan: MixPlan, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every active span of every piece of mixture i, in mixture time: (rows, start, end, span rows)."""
        rows = np.arange(plan.row_start[i], plan.row_start[i + 1])
        counts = self.span_start[plan.clip[rows] + 1] - self.span_start[plan.clip[rows]]
        row_of_span = np.repeat(rows, counts)
        span_index = np.concatenate(
            [np.arange(self.span_start[c], self.span_start[c + 1]) for c in plan.clip[rows]]
        ).astype(np.int64)
        lo = np.maximum(self.spans[span_index, 0], plan.offset_s[row_of_span])
        hi = np.minimum(self.spans[span_index, 1], plan.offset_s[row_of_span] + plan.duration_s[row_of_span])
        shift = plan.onset_s[row_of_span] - plan.offset_s[row_of_span]
        start = np.clip(lo + shift, 0.0, self.synth.mixture_s)
        end = np.clip(hi + shift, 0.0, self.synth.mixture_s)
        real = end > start
        return rows, start[real], end[real], row_of_span[real]

    def events(self, plan: MixPlan, i: int) -> list[Event]:
        """Ground-truth events of mixture i: (onset_s, offset_s, label), overlapping or touching
        spans of one label merged, sorted by onset. Exact times, not the frame grid."""
        _, start, end, span_rows = self._active_spans(plan, i)
        out: list[Event] = []
        labels = self.labels[plan.label[span_rows]]
        for label in dict.fromkeys(labels.tolist()):
            mine = labels == label
            order = np.argsort(start[mine], kind="stable")
            lo, hi = start[mine][order], end[mine][order]
            # a new event starts where a span begins after every earlier span has ended
            new = np.r_[True, lo[1:] > np.maximum.accumulate(hi)[:-1]]
            first = np.flatnonzero(new)
            ends = np.maximum.reduceat(hi, first)
            out += [Event(float(a), float(b), str(label)) for a, b in zip(lo[first], ends, strict=True)]
        return sorted(out)

    def pieces(self, plan: MixPlan, i: int) -> list[tuple[float, float, int]]:
        """Where each piece of mixture i sounds (the background's too): (onset_s, offset_s, plan
        row), from the start of its first active span to the end of its last, in mixture time,
        the silences inside the piece included; a piece with no active part is left out. Sorted
        by onset. Exact times: the extent of each placed sound, where `events` gives the active
        spans of each label."""
        _, start, end, span_rows = self._active_spans(plan, i)
        if not len(span_rows):
            return []
        order = np.argsort(span_rows, kind="stable")
        rows, bounds = np.unique(span_rows[order], return_index=True)
        onsets = np.minimum.reduceat(start[order], bounds)
        offsets = np.maximum.reduceat(end[order], bounds)
        return sorted(zip(onsets.tolist(), offsets.tolist(), rows.tolist(), strict=True))

    def frame_labels(self, plan: MixPlan, i: int) -> FrameLabels:
        rows, start, end, span_rows = self._active_spans(plan, i)
        # distinct labels: events by first onset, then the background (rows are in that order)
        event_rows = rows[plan.is_event[rows]]
        ordered = [*event_rows, *rows[~plan.is_event[rows]]]
        seen: dict[int, int] = {}
        for r in ordered:
            seen.setdefault(int(plan.label[r]), r)
        label_ids = np.array(list(seen), dtype=np.int64)
        lookup = np.full(len(self.labels), -1, dtype=np.int64)
        lookup[label_ids] = np.arange(len(label_ids))
        k_of_span = lookup[plan.label[span_rows]]
        frame_len = frame_hop_s(self.synth, self.frames)
        edges = np.arange(self.frames.n_frames + 1) * frame_len
        overlap = np.clip(
            np.minimum(end[:, None], edges[None, 1:]) - np.maximum(start[:, None], edges[None, :-1]),
            0.0,
            None,
        )
        covered = np.zeros((len(label_ids), self.frames.n_frames))
        np.add.at(covered, k_of_span, overlap)
        positive = covered >= self.frames.min_coverage * frame_len
        short = (end - start) < frame_len
        holds_half = short[:, None] & (overlap >= 0.5 * (end - start)[:, None]) & (overlap > 0)
        np.logical_or.at(positive, k_of_span, holds_half)
        first_rows = list(seen.values())
        return FrameLabels(
            labels=tuple(str(self.labels[k]) for k in label_ids),
            captions=tuple(self.texts[plan.text[r]] for r in first_rows),
            is_event=plan.is_event[first_rows].copy(),
            frames=positive,
        )

    def mix(self, plan: MixPlan, i: int) -> Mixture:
        return Mixture(int(plan.mixture_ids[i]), self.render(plan, i), self.frame_labels(plan, i))


def _loop(clip: np.ndarray, length: int, crossfade: int) -> np.ndarray:
    """Repeat `clip` to at least `length` samples, crossfading `crossfade` samples at each seam.

    The copies start every `len(clip) - crossfade` samples (the loop period).
    """
    crossfade = min(crossfade, len(clip) // 4)
    if crossfade == 0:
        return np.tile(clip, int(np.ceil(length / len(clip))))
    body = clip.astype(np.float32)
    fade_in = np.linspace(0.0, 1.0, crossfade, dtype=np.float32)
    period = len(clip) - crossfade
    repeats = int(np.ceil((length - crossfade) / period)) + 1
    out = np.zeros(period * repeats + crossfade, dtype=np.float32)
    for k in range(repeats):
        piece = body.copy()
        if k > 0:
            piece[:crossfade] *= fade_in
        if k < repeats - 1:
            piece[-crossfade:] *= fade_in[::-1]
        out[k * period : k * period + len(clip)] += piece
    return np.clip(np.round(out), -32768, 32767).astype(np.int16)
