"""The real-recording test set (`test_real`): whole sources that training never sees, as long
recordings over real ambiences and as isolated clips, written as a user's files would arrive.

The set. `sources.held_out_sources` names whole sources (Debian packages, or folders of one)
whose clips the source library puts in its `test_real` split and nowhere else, so no recording
of theirs is trained, validated or calibrated on. `build_real_set` makes, from those clips only:

- recordings of `min_s`-`max_s` seconds: several consecutive `mixture_s` mixtures drawn by the
  recipe sampler (`sample_chunk`, the profile's `synth` parameters) from the held-out events,
  over one held-out ambience that plays continuously under the whole recording (its looped
  offset advanced mixture by mixture, as the moment-retrieval set does). They are written as a
  user's recordings would arrive: the formats, sample rates and channel counts rotate
  (16 kHz WAV, 22.05 kHz Ogg Vorbis, 44.1 kHz FLAC; mono or stereo). The audio is rendered at the
  library's rate and resampled, so the higher rates carry no content above its Nyquist
  frequency: what varies is the detector's decoding path, not the material.
- isolated clips: up to `clips_per_label` event clips per label, each written alone in the same
  rotation.

The validation twin (`val_real`, `split=VAL_REAL_SPLIT`) is made the same way from the clips of
`sources.validation_sources` into `test_real.val_out_dir`: real recordings from other sources
than the test's, on which settings that only show on real recordings are chosen.

Ground truth (`recordings.tsv`, `clips.tsv`, DCASE format, readable by `flam evaluate --tsv`):
every active span of every placed sound, exact (the Mixer's times), merged per label, and the
ambience's own label over its active spans, since a person asks for "rain" or "wind" too. The
prompts are the set's labels in plain words, events and ambiences together.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import soundfile as sf

from flam_core.data.events import Event
from flam_core.data.mixer import Mixer
from flam_core.data.recipes import ClipPool, sample_chunk
from flam_core.data.recordings import continuous_backgrounds, merge_spans, mixtures_per_recording
from flam_core.data.sources import REAL_SPLIT, VAL_REAL_SPLIT, load_manifest
from flam_core.data.tsv import write_sed_tsv
from flam_core.errors import DataError
from flam_core.utils import atomic_dir, atomic_write_text, stable_seed

if TYPE_CHECKING:
    from flam_core.config import Params


# (extension, libsndfile format, subtype, sample rate): one per recording and clip, in turn.
ENCODINGS: tuple[tuple[str, str, str, int], ...] = (
    ("wav", "WAV", "PCM_16", 16000),
    ("ogg", "OGG", "VORBIS", 22050),
    ("flac", "FLAC", "PCM_16", 44100),
)
STEREO_DELAY_S = 0.0004  # the second channel of a stereo file: the same sound 0.4 ms later


@dataclass(frozen=True)
class RealSetSummary:
    """`summary.json` of a built set."""

    recordings: int
    recording_s: float  # total duration
    clips: int
    labels: list[str]  # every label of the set: the prompts
    event_labels: list[str]
    background_labels: list[str]
    sources: list[str]  # the held-out sources the clips come from
    encodings: list[str]  # "wav 16000 Hz mono", ...
    seed: int
    split: str  # REAL_SPLIT (the test) or VAL_REAL_SPLIT: what the set may be used for

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _merge(events: Sequence[Event]) -> list[Event]:
    """Overlapping or touching events of one label joined; sorted by onset then label."""
    out = [
        Event(round(a, 6), round(b, 6), label)
        for label in {e.label for e in events}
        for a, b in merge_spans((e.onset, e.offset) for e in events if e.label == label)
    ]
    return sorted(out)


def _encode(samples: np.ndarray, rate: int, n: int) -> tuple[np.ndarray, tuple[str, str, str, int], int]:
    """The n-th file of the rotation: samples resampled to its rate, `[frames, channels]`."""
    import torch
    import torchaudio.functional as AF

    encoding = ENCODINGS[n % len(ENCODINGS)]
    channels = 1 + (n // len(ENCODINGS)) % 2
    out_rate = encoding[3]
    wave = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    if out_rate != rate:
        wave = AF.resample(wave, rate, out_rate)
    mono = wave.numpy()
    if channels == 2:
        delay = round(STEREO_DELAY_S * out_rate)
        mono = np.stack([mono, np.concatenate([np.zeros(delay, np.float32), mono[: len(mono) - delay]])], 1)
    else:
        mono = mono[:, None]
    peak = float(np.abs(mono).max(initial=0.0))
    if peak > 0.99:  # resampling can overshoot; keep clear of clipping in the 16-bit formats
        mono = mono * np.float32(0.99 / peak)
    return mono, encoding, channels


def _write(path_stem: Path, samples: np.ndarray, rate: int, n: int) -> tuple[str, str]:
    data, (ext, fmt, subtype, out_rate), channels = _encode(samples, rate, n)
    path = path_stem.with_suffix(f".{ext}")
    sf.write(path, data, out_rate, format=fmt, subtype=subtype)
    return path.name, f"{ext} {out_rate} Hz {'stereo' if channels == 2 else 'mono'}"


SOURCES_PARAM = {REAL_SPLIT: "held_out_sources", VAL_REAL_SPLIT: "validation_sources"}


def _held_out(manifest: pd.DataFrame, split: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    held = manifest[manifest["split"] == split]
    events = held[held["kind"] == "event"].sort_values("clip_id")
    backgrounds = held[held["kind"] == "background"].sort_values("clip_id")
    for what, table in (("event clip", events), ("ambience (background)", backgrounds)):
        if table.empty:
            raise DataError(
                f"the source library has no {what} in its {split!r} split: set "
                f"sources.{SOURCES_PARAM[split]} to sources that have them and rebuild the library"
            )
    return events, backgrounds


def build_real_set(
    params: Params, library_dir: Path | str, out_dir: Path | str | None = None, split: str = REAL_SPLIT
) -> RealSetSummary:
    """Write the real-recording set of split `split` (`test_real`, or `val_real` from the
    validation sources) of the library in `library_dir` (see the module docstring) to `out_dir`
    (default `test_real.out_dir` or `test_real.val_out_dir`); the folder appears whole or not at
    all. The same parameters and library give the same files."""
    if split not in SOURCES_PARAM:
        raise DataError(f"no real-recording set for split {split!r}: expected one of {list(SOURCES_PARAM)}")
    cfg = params.test_real
    library_dir = Path(library_dir)
    out_dir = Path(out_dir or (cfg.out_dir if split == REAL_SPLIT else cfg.val_out_dir))
    mixer = Mixer.for_library(params, library_dir)
    events, backgrounds = _held_out(load_manifest(library_dir), split)
    pool = ClipPool.of(events, backgrounds)
    synth = params.synth
    rng = np.random.default_rng(stable_seed(cfg.seed, split))
    n_mixtures = mixtures_per_recording(rng, cfg.recordings, synth.mixture_s, cfg.min_s, cfg.max_s)
    # the test keeps the seed it was first drawn with
    recipe_seed = stable_seed(cfg.seed, "recipes", *(() if split == REAL_SPLIT else (split,)))
    recipes = sample_chunk(pool, synth, int(n_mixtures.sum()), 0, recipe_seed).to_pandas()
    continuous_backgrounds(recipes, mixer, pool, n_mixtures, rng)
    plan = mixer.plan(recipes)
    rate = mixer.sample_rate
    encodings: set[str] = set()
    recording_truth: dict[str, list[Event]] = {}
    clip_truth: dict[str, list[Event]] = {}
    total_s = 0.0
    with atomic_dir(out_dir) as staging:
        (staging / "recordings").mkdir()
        (staging / "clips").mkdir()
        first = 0
        for r, n in enumerate(n_mixtures.tolist()):
            mixtures = range(first, first + n)
            first += n
            audio = np.concatenate([mixer.render(plan, i) for i in mixtures])
            placed = [  # the ambience's active spans come with the events (`Mixer.events`)
                Event(e.onset + k * synth.mixture_s, e.offset + k * synth.mixture_s, e.label)
                for k, i in enumerate(mixtures)
                for e in mixer.events(plan, i)
            ]
            name, encoding = _write(staging / "recordings" / f"real-{r:03d}", audio, rate, r)
            recording_truth[name] = _merge(placed)
            encodings.add(encoding)
            total_s += len(audio) / rate
        per_label = pick_clips(events, cfg.clips_per_label, cfg.seed)
        for c, row in enumerate(per_label.itertuples(index=False)):
            samples, clip_rate = sf.read(library_dir / row.path, dtype="float32")
            name, encoding = _write(staging / "clips" / f"clip-{c:03d}", samples, clip_rate, c)
            clip_truth[name] = _merge(
                [Event(float(a), float(b), str(row.label)) for a, b in row.active_spans]
            )
            encodings.add(encoding)
        write_sed_tsv(staging / "recordings.tsv", recording_truth)
        write_sed_tsv(staging / "clips.tsv", clip_truth)
        labels = sorted({e.label for evs in (*recording_truth.values(), *clip_truth.values()) for e in evs})
        summary = RealSetSummary(
            recordings=len(recording_truth),
            recording_s=round(total_s, 3),
            clips=len(clip_truth),
            labels=labels,
            event_labels=sorted(set(events["label"]) & set(labels)),
            background_labels=sorted(set(backgrounds["label"]) & set(labels)),
            sources=sorted(set(events["source_package"]) | set(backgrounds["source_package"])),
            encodings=sorted(encodings),
            seed=cfg.seed,
            split=split,
        )
        atomic_write_text(staging / "summary.json", json.dumps(summary.to_json(), indent=2))
    return summary


def pick_clips(events: pd.DataFrame, per_label: int, seed: int) -> pd.DataFrame:
    """Up to `per_label` event clips of each label, drawn with the seed; by label, then clip id."""
    picked = []
    for label, group in events.groupby("label", sort=True):
        order = np.random.default_rng(stable_seed(seed, "clips", str(label))).permutation(len(group))
        picked.append(group.sort_values("clip_id").iloc[np.sort(order[:per_label])])
    return pd.concat(picked, ignore_index=True)
