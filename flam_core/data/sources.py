"""The source library: labelled single-event clips and backgrounds, with honest splits.

`build_source_library(params)` gathers `RawClip`s from the catalog builders, conditions each
one (decode, downmix, resample to the profile rate, trim silence, cap the length, peak
normalise), measures its active spans, stores it as 16-bit FLAC, captions every label, and
splits clips into train/val/test with a seeded set of whole labels held out for
open-vocabulary tests. Clips of `sources.held_out_sources` (whole packages, a package's files
matching a glob, or folders of real recordings) never enter train/val/test: they form the
split `test_real`, a cross-source test of real recordings that no training mixture draws
from; clips of `sources.validation_sources` form `val_real` in the same way, the real-recording
validation set. The library is written to a staging folder and swapped in only when complete, so a
failed build leaves the previous library untouched.

Layout of `sources.out_dir`:
    clips/<clip_id>.flac    mono, `audio.sample_rate`, peak at `processing.peak_dbfs`
    manifest.parquet        one row per clip (columns: `MANIFEST_COLUMNS`)
    summary.json            counts, per-package accounting, rejected files, hashes
"""

from __future__ import annotations

import fnmatch
import json
import math
import multiprocessing
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import soundfile as sf
from rich.progress import track

from flam_core.audio.activity import active_spans
from flam_core.audio.io import read_audio, resample, write_flac
from flam_core.config import ActivityParams, Params, ProcessingParams, SplitParams, split_source
from flam_core.data.captions import caption_table
from flam_core.data.catalog.base import BuildReport, RawClip
from flam_core.data.catalog.debian import debian_clips
from flam_core.data.catalog.folder import folder_clips
from flam_core.data.catalog.midi import midi_clips
from flam_core.data.catalog.procedural import procedural_clips
from flam_core.data.catalog.speech import speech_clips
from flam_core.errors import AudioError, DataError
from flam_core.utils import (
    atomic_dir,
    atomic_write_text,
    file_sha256,
    interactive,
    json_sha256,
    stable_seed,
)

SCHEMA_VERSION = 1
MANIFEST_COLUMNS = (
    "clip_id",  # str, unique: "<source_package>-<12 hex>"
    "path",  # str, FLAC path relative to the library folder
    "label",  # str, clean lower-case label
    "captions",  # list[str], the label first
    "kind",  # "event" | "background"
    "split",  # "train" | "val" | "test"; "test_real" / "val_real": the held-out / validation sources
    "heldout",  # bool: the label is held out of train/val (open-vocabulary test)
    "duration_s",  # float
    "sample_rate",  # int
    "active_spans",  # list[[onset_s, offset_s]], sorted, disjoint, inside [0, duration_s]
    "active_rms_dbfs",  # float: RMS level of the samples inside the active spans (mixing reference)
    "source_package",  # str: Debian package, "fluid-soundfont-gm", "espeak-ng", "procedural", "user:<dir>"
    "origin",  # str: file inside the package, or the render description
    "licence",  # str
    "sha256",  # str: hash of the FLAC file
)
REAL_SPLIT = "test_real"  # the clips of the held-out sources, and nothing else
VAL_REAL_SPLIT = "val_real"  # the clips of the validation sources, and nothing else
SPLITS = ("train", "val", "test", REAL_SPLIT, VAL_REAL_SPLIT)


@dataclass(frozen=True)
class SourceClip:
    """One row of `manifest.parquet` (see `MANIFEST_COLUMNS`)."""

    clip_id: str
    path: str
    label: str
    captions: list[str]
    kind: str
    split: str
    heldout: bool
    duration_s: float
    sample_rate: int
    active_spans: list[list[float]]
    active_rms_dbfs: float
    source_package: str
    origin: str
    licence: str
    sha256: str


@dataclass(frozen=True)
class SourceLibrarySummary:
    """What `build_source_library` built; `to_json()` is the library's `summary.json`."""

    schema_version: int
    profile: str
    params_hash: str  # of the audio, sources and captions sections
    manifest_hash: str  # `manifest_hash(manifest)`
    heldout_labels: list[str]
    packages: list[BuildReport]  # per-package accounting, in build order
    rejected: list[dict[str, str]]  # {"clip", "reason"}: valid audio, unusable (silent, short, copy)
    skipped_bad_files: list[dict[str, str]]  # {"clip", "error"}: undecodable, with `sources.skip_bad`
    stats: dict[str, Any]  # `library_stats(manifest)`

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Rejected(Exception):
    """A clip that is valid audio but unusable (silent, too short); counted, not fatal."""


def condition_clip(
    raw: RawClip, sample_rate: int, processing: ProcessingParams, activity: ActivityParams
) -> np.ndarray:
    """Decode and condition one clip; returns mono float32 at `sample_rate`.

    Raises `AudioError` for undecodable input and `Rejected` for silent or too-short clips.
    """
    if raw.path is not None:
        samples, _ = read_audio(raw.path, sample_rate=sample_rate)
    else:
        assert raw.samples is not None and raw.sample_rate is not None
        if raw.samples.size == 0 or not np.isfinite(raw.samples).all():
            raise AudioError(f"{raw.source_package}/{raw.origin}: empty or non-finite samples")
        samples = resample(raw.samples, raw.sample_rate, sample_rate)
    spans = active_spans(samples, sample_rate, **activity.model_dump())
    if len(spans) == 0:
        raise Rejected("silent")
    margin = int(round(processing.trim_margin_s * sample_rate))
    start = max(0, int(spans[0, 0] * sample_rate) - margin)
    end = min(len(samples), int(math.ceil(spans[-1, 1] * sample_rate)) + margin)
    samples = samples[start:end]
    is_event = raw.kind == "event"
    longest = processing.max_event_s if is_event else processing.max_background_s
    shortest = processing.min_event_s if is_event else processing.min_background_s
    if len(samples) > longest * sample_rate:
        samples = samples[: int(longest * sample_rate)].copy()
        fade = min(len(samples), int(0.01 * sample_rate))
        samples[-fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
    if len(samples) < shortest * sample_rate:
        raise Rejected(f"shorter than {shortest} s after trimming")
    peak = float(np.max(np.abs(samples)))
    return (samples * (10 ** (processing.peak_dbfs / 20) / peak)).astype(np.float32)


def _condition_and_write(
    raw: RawClip, out_dir: Path, params: Params
) -> tuple[dict[str, Any] | None, str | None]:
    """Worker: condition `raw`, write its FLAC, read it back, and describe it.

    Returns `(row, None)` or `(None, reason)` for a rejected clip; `AudioError` propagates.
    """
    sources, rate = params.sources, params.audio.sample_rate
    try:
        samples = condition_clip(raw, rate, sources.processing, sources.activity)
    except Rejected as reason:
        return None, str(reason)
    relpath = f"clips/{raw.clip_id}.flac"
    write_flac(out_dir / relpath, samples, rate)
    # Spans are measured on what was stored (16-bit), so they describe the file exactly.
    stored, _ = read_audio(out_dir / relpath)
    duration_s = len(stored) / rate
    spans = np.clip(np.round(active_spans(stored, rate, **sources.activity.model_dump()), 4), 0.0, duration_s)
    row = {
        "clip_id": raw.clip_id,
        "path": relpath,
        "label": raw.label,
        "kind": raw.kind,
        "duration_s": duration_s,
        "sample_rate": rate,
        "active_spans": spans.tolist(),
        "active_rms_dbfs": active_rms_dbfs(stored, rate, spans),
        "source_package": raw.source_package,
        "origin": raw.origin,
        "licence": raw.licence,
        "sha256": file_sha256(out_dir / relpath),
    }
    return row, None


def active_rms_dbfs(samples: np.ndarray, sample_rate: int, spans: np.ndarray) -> float:
    """RMS level in dBFS of the samples inside `spans` (the clip's level when it sounds)."""
    mask = np.zeros(len(samples), dtype=bool)
    for onset, offset in np.round(np.asarray(spans) * sample_rate).astype(int):
        mask[onset:offset] = True
    active = samples[mask] if mask.any() else samples
    return round(float(10 * np.log10(np.mean(np.square(active, dtype=np.float64)) + 1e-20)), 3)


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def gather_raw_clips(params: Params, base_dir: Path) -> tuple[list[RawClip], list[BuildReport]]:
    """Every catalog builder enabled in `params`, in a fixed order."""
    sources, rate, seed = params.sources, params.audio.sample_rate, params.sources.splits.seed
    clips: list[RawClip] = []
    reports: list[BuildReport] = []
    for package in sources.packages:
        package_clips, report = debian_clips(package, params.cache_path, seed)
        clips += package_clips
        reports.append(report)
    generated = []
    if sources.midi.enabled:
        generated += midi_clips(sources.midi, rate, params.cache_path, seed)
    if sources.speech.enabled:
        generated += speech_clips(sources.speech, rate, seed)
    if sources.procedural.enabled:
        generated += procedural_clips(sources.procedural, rate, seed)
    for folder in sources.user_folders:
        generated += folder_clips(folder, base_dir, params.cache_path)
    for package, count in sorted(Counter(c.source_package for c in generated).items()):
        reports.append(BuildReport(package=package, mapped=count))
    clips += generated
    duplicates = [cid for cid, n in Counter(c.clip_id for c in clips).items() if n > 1]
    if duplicates:
        raise DataError(f"duplicate clip ids {duplicates[:5]}: two builders named the same origin")
    return clips, reports


def held_out_source_mask(
    source_package: Sequence[str], origin: Sequence[str], held_out_sources: Sequence[str]
) -> np.ndarray:
    """Boolean mask: which clips (given by package and origin) belong to a held-out source.

    An entry "<package>" holds out the whole package; "<package>:<glob>" only its clips whose
    origin matches the glob (fnmatch, case-sensitive, `*` crosses `/`).
    """
    packages = np.asarray(source_package, dtype=object)
    origins = np.asarray(origin, dtype=object)
    mask = np.zeros(len(packages), dtype=bool)
    for entry in held_out_sources:
        package, pattern = split_source(entry)
        in_package = packages == package
        if pattern is not None:
            matches = np.fromiter(
                (fnmatch.fnmatchcase(o, pattern) for o in origins[in_package]),
                dtype=bool,
                count=int(in_package.sum()),
            )
            in_package[np.flatnonzero(in_package)[~matches]] = False
        mask |= in_package
    return mask


def cap_per_label(
    clips: Sequence[RawClip], max_per_label: int, seed: int, held_out_sources: Sequence[str] = ()
) -> list[RawClip]:
    """Keep at most `max_per_label` clips of each label (seeded choice, stable order).

    Clips of held-out sources are capped on their own, so the real-recording test set and the
    training library do not compete for one label's quota.
    """
    ordered = sorted(clips, key=lambda c: c.clip_id)
    held_out = held_out_source_mask(
        [c.source_package for c in ordered], [c.origin for c in ordered], held_out_sources
    )
    by_label: dict[tuple[str, bool], list[RawClip]] = {}
    for clip, is_held_out in zip(ordered, held_out.tolist(), strict=True):
        by_label.setdefault((clip.label, is_held_out), []).append(clip)
    kept = []
    for (label, is_held_out), group in sorted(by_label.items()):
        if len(group) > max_per_label:
            key = ("cap_held_out", label) if is_held_out else ("cap", label)
            rng = np.random.default_rng(stable_seed(seed, *key))
            group = [group[i] for i in sorted(rng.choice(len(group), max_per_label, replace=False))]
        kept += group
    return sorted(kept, key=lambda c: c.clip_id)


def assign_splits(
    table: pd.DataFrame,
    splits: SplitParams,
    held_out_sources: Sequence[str] = (),
    validation_sources: Sequence[str] = (),
) -> tuple[pd.DataFrame, list[str]]:
    """Add `split` and `heldout` columns; returns the table and the held-out labels.

    Every clip of a held-out source (`held_out_source_mask`) goes to `test_real`, every clip of
    a validation source to `val_real` (heldout False: the label may well be trained on, from
    other sources), whatever its label; a clip matched by both is a DataError. The rest is split
    as follows.

    A seeded `heldout_label_fraction` of event labels is held out (heldout=True), drawn from
    the labels no background carries (a background plays under training mixtures with its
    label as a prompt, so its label could not stay unseen): a seeded
    `heldout_val_fraction` of those labels goes entirely to `val` (the never-trained prompts
    the detection threshold is chosen on), the others entirely to `test`; with two held-out
    labels or more, each side keeps at least one. Every other event label is split clip by
    clip: it keeps at least one training clip, gets a test clip from 3 clips up and a
    validation clip from 4 clips up. Backgrounds are split the same way as one group.
    """
    if held_out_sources or validation_sources:
        real = held_out_source_mask(table["source_package"], table["origin"], held_out_sources)
        val_real = held_out_source_mask(table["source_package"], table["origin"], validation_sources)
        if (real & val_real).any():
            clips = table.loc[real & val_real, "clip_id"].tolist()
            raise DataError(
                f"clips {clips[:5]} belong to both sources.held_out_sources and sources.validation_sources"
            )
        rest, heldout = assign_splits(table[~(real | val_real)], splits)
        parts = [
            rest,
            table[real].assign(split=REAL_SPLIT, heldout=False),
            table[val_real].assign(split=VAL_REAL_SPLIT, heldout=False),
        ]
        return pd.concat(parts).loc[table.index], heldout
    event_labels = sorted(table.loc[table["kind"] == "event", "label"].unique())
    background_labels = set(table.loc[table["kind"] == "background", "label"])
    candidates = [label for label in event_labels if label not in background_labels]
    n_heldout = min(math.ceil(splits.heldout_label_fraction * len(event_labels)), len(candidates))
    rng = np.random.default_rng(stable_seed(splits.seed, "heldout"))
    heldout = sorted(rng.choice(candidates, size=n_heldout, replace=False).tolist()) if candidates else []
    n_val_heldout = round(splits.heldout_val_fraction * len(heldout))
    if len(heldout) >= 2 and splits.heldout_val_fraction > 0:
        n_val_heldout = min(max(n_val_heldout, 1), len(heldout) - 1)
    order = np.random.default_rng(stable_seed(splits.seed, "heldout_val")).permutation(len(heldout))
    heldout_val = {heldout[i] for i in order[:n_val_heldout]}
    split = pd.Series("train", index=table.index, dtype=object)
    # Events are split label by label; backgrounds form one group (few clips per label).
    group_key = table["label"].where(table["kind"] == "event", "<backgrounds>")
    for key, group in table.groupby(group_key, sort=True):
        index = group.sort_values("clip_id").index.to_numpy()
        if key in heldout:
            split[index] = "val" if key in heldout_val else "test"
            continue
        index = np.random.default_rng(stable_seed(splits.seed, "split", key)).permutation(index)
        n = len(index)
        n_test = max(round(n * splits.test_fraction), 1 if n >= 3 else 0)
        n_val = max(round(n * splits.val_fraction), 1 if n >= 4 else 0)
        n_val = min(n_val, n - 1 - min(n_test, n - 1))
        n_test = min(n_test, n - 1 - n_val)
        split[index[:n_test]] = "test"
        split[index[n_test : n_test + n_val]] = "val"
    return table.assign(split=split, heldout=table["label"].isin(heldout)), heldout


def manifest_hash(manifest: pd.DataFrame) -> str:
    """Content hash of a manifest: rows (incl. each FLAC's sha256) in clip_id order."""
    rows = manifest.sort_values("clip_id").to_dict(orient="records")
    return json_sha256([{k: _plain(v) for k, v in row.items()} for row in rows])


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def build_source_library(
    params: Params, out_dir: Path | None = None, base_dir: Path = Path(), workers: int | None = None
) -> SourceLibrarySummary:
    """Build the library into `out_dir` (default `sources.out_dir`); returns the summary.

    With `sources.skip_bad`, undecodable files are skipped and listed in the summary;
    otherwise the first one stops the build with an `AudioError` naming it, and nothing is
    written.
    """
    sources = params.sources
    out_dir = Path(out_dir) if out_dir is not None else base_dir / sources.out_dir
    raw_clips, reports = gather_raw_clips(params, base_dir)
    kept_out = [*sources.held_out_sources, *sources.validation_sources]  # of training, val and test
    raw_clips = cap_per_label(raw_clips, sources.max_clips_per_label, sources.splits.seed, kept_out)
    workers = workers or min(os.cpu_count() or 1, 8)
    rows: list[dict[str, Any]] = []
    rejected: list[dict[str, str]] = []
    skipped: list[dict[str, str]] = []
    with atomic_dir(out_dir) as staging:
        (staging / "clips").mkdir()
        # fork: workers inherit the imported modules (torch alone takes seconds to import);
        # each worker limits torch to one thread, as torch's own DataLoader workers do.
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init) as pool:
            futures = [pool.submit(_condition_and_write, raw, staging, params) for raw in raw_clips]
            for raw, future in track(
                list(zip(raw_clips, futures, strict=True)),
                description="conditioning clips",
                disable=not interactive(),
            ):
                try:
                    row, reason = future.result()
                except AudioError as exc:
                    if not sources.skip_bad:
                        for pending in futures:
                            pending.cancel()
                        raise
                    skipped.append({"clip": f"{raw.source_package}/{raw.origin}", "error": str(exc)})
                    continue
                if row is None:
                    rejected.append({"clip": f"{raw.source_package}/{raw.origin}", "reason": str(reason)})
                else:
                    rows.append(row)
        rows = _drop_duplicates(rows, staging, rejected)
        if not any(r["kind"] == "event" for r in rows):
            raise DataError("the source library would hold no event clip; check sources.* params")
        events = [r for r in rows if r["kind"] == "event"]
        if held_out_source_mask(
            [r["source_package"] for r in events], [r["origin"] for r in events], kept_out
        ).all():
            raise DataError(
                "the source library would hold no event clip outside sources.held_out_sources and"
                f" sources.validation_sources {kept_out}: nothing to train on"
            )
        table = pd.DataFrame(rows).sort_values("clip_id", ignore_index=True)
        table, heldout = assign_splits(
            table, sources.splits, sources.held_out_sources, sources.validation_sources
        )
        for name in ("held_out_sources", "validation_sources"):
            missing = [
                entry
                for entry in getattr(sources, name)
                if not held_out_source_mask(table["source_package"], table["origin"], [entry]).any()
            ]
            if missing:
                raise DataError(
                    f"sources.{name} names {missing}, which gave the library no clip: name sources "
                    f"it builds from (these ones: {sorted(set(table['source_package']))})"
                )
        builder_captions = {c.label: (c.kind, c.captions) for c in raw_clips}
        captions = caption_table(builder_captions, params.captions, base_dir)
        table["captions"] = table["label"].map(captions)
        manifest = table[list(MANIFEST_COLUMNS)]
        manifest.to_parquet(staging / "manifest.parquet", index=False)
        summary = SourceLibrarySummary(
            schema_version=SCHEMA_VERSION,
            profile=params.profile,
            params_hash=params.section_hash("audio", "sources", "captions"),
            manifest_hash=manifest_hash(manifest),
            heldout_labels=heldout,
            packages=reports,
            rejected=rejected,
            skipped_bad_files=skipped,
            stats=library_stats(manifest),
        )
        atomic_write_text(staging / "summary.json", json.dumps(summary.to_json(), indent=2))
    return summary


def _drop_duplicates(
    rows: list[dict[str, Any]], staging: Path, rejected: list[dict[str, str]]
) -> list[dict[str, Any]]:
    """Keep one clip per distinct audio content (packages ship byte-identical copies).

    A copy left in would be able to sit in train and test at once. The first clip id wins.
    """
    first_of: dict[str, str] = {}
    kept = []
    for row in sorted(rows, key=lambda r: r["clip_id"]):
        original = first_of.setdefault(row["sha256"], row["clip_id"])
        if original == row["clip_id"]:
            kept.append(row)
            continue
        (staging / row["path"]).unlink()
        rejected.append(
            {"clip": f"{row['source_package']}/{row['origin']}", "reason": f"duplicate of {original}"}
        )
    return kept


def load_manifest(library_dir: Path) -> pd.DataFrame:
    path = Path(library_dir) / "manifest.parquet"
    if not path.is_file():
        raise DataError(
            f"no source library at {library_dir} (missing manifest.parquet); run `flam sources build`"
        )
    manifest = pd.read_parquet(path)
    missing = set(MANIFEST_COLUMNS) - set(manifest.columns)
    if missing:
        raise DataError(f"{path}: missing column(s) {sorted(missing)}")
    return manifest


def library_stats(manifest: pd.DataFrame) -> dict[str, Any]:
    """Counts per kind, split, label and package, and the held-out share of event labels."""
    events = manifest[manifest["kind"] == "event"]
    event_labels = sorted(events["label"].unique())
    heldout = sorted(events.loc[events["heldout"], "label"].unique())
    heldout_val = sorted(events.loc[events["heldout"] & (events["split"] == "val"), "label"].unique())
    return {
        "n_clips": len(manifest),
        "n_event_clips": len(events),
        "n_backgrounds": int((manifest["kind"] == "background").sum()),
        "n_event_labels": len(event_labels),
        "n_background_labels": int(manifest.loc[manifest["kind"] == "background", "label"].nunique()),
        "heldout_labels": heldout,
        "heldout_val_labels": heldout_val,  # val_unseen's labels; the others are test_unseen's
        "heldout_label_fraction": round(len(heldout) / max(len(event_labels), 1), 4),
        "total_duration_s": round(float(manifest["duration_s"].sum()), 2),
        "per_kind_split": {
            f"{kind}/{split}": int(n)
            for (kind, split), n in manifest.groupby(["kind", "split"]).size().items()
        },
        "per_package": {k: int(v) for k, v in manifest["source_package"].value_counts().sort_index().items()},
        "per_label": {k: int(v) for k, v in manifest["label"].value_counts().sort_index().items()},
    }


def check_readable(manifest: pd.DataFrame, library_dir: Path) -> list[str]:
    """Clip ids whose FLAC is missing, undecodable, or not at the manifest's rate/length."""
    bad = []
    for row in manifest.itertuples(index=False):
        try:
            info = sf.info(str(Path(library_dir) / row.path))
        except (sf.LibsndfileError, RuntimeError, OSError):
            bad.append(row.clip_id)
            continue
        if info.samplerate != row.sample_rate or abs(info.frames / info.samplerate - row.duration_s) > 1e-3:
            bad.append(row.clip_id)
    return bad
