"""Materialised mixtures: WebDataset tar shards that read back bit-exactly as on-the-fly mixing.

`write_shards(params, library_dir, recipes_dir)` renders every mixture of each recipe split
with one `Mixer` and streams the samples into tar shards; `iter_shards(paths)` yields the
same `Mixture` objects that `Mixer.mix` returns, in the written order.

Layout of `shards.out_dir` (the folder holds exactly the splits of the last write):
    <split>-<n:06d>.tar    n from 0; a new shard starts once the current one passes
                           `shards.max_shard_mb` (1 MB = 10^6 bytes, tar headers included)
    summary.json           per split: n_mixtures, n_shards, bytes, shards (file names);
                           schema_version, params_hash (the recipes'), shards_params_hash

One sample per mixture, key `<split>-<mixture_id:09d>`, members:
    <key>.audio.npy   float32 `[n_samples]` at `sample_rate`, exactly `Mixer.mix(...).audio`
    <key>.json        {"mixture_id": int, "split": str, "recipe_id": "<recipes params_hash>/<split>/<id>",
                       "labels": [K] str, "captions": [K] str, "is_event": [K] bool,
                       "frames": [K][n_frames] 0/1, "n_frames": int, "n_samples": int,
                       "sample_rate": int (Hz)}
    <key>.flac        optional 16-bit preview for listening (`flac_preview=True`); never read back

Why `.npy` and not FLAC: the mixer's float32 output must round-trip bit-exactly, and FLAC
holds integers only (16-bit loses the low mantissa bits; 24-bit is not exact either for
float32 values of arbitrary exponent). Raw float32 costs 4 bytes a sample (640 kB per 10 s
mixture at 16 kHz); general-purpose compression of float32 audio saves only ~15% at ~30x
the write time, so samples are stored uncompressed.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
from rich.progress import Progress
from webdataset import TarWriter
from webdataset.tariterators import group_by_keys, tar_file_expander

from flam_core.config import Params
from flam_core.data.mixer import FrameLabels, Mixer, Mixture
from flam_core.data.recipes import RECIPE_COLUMNS
from flam_core.data.sources import load_manifest
from flam_core.errors import DataError
from flam_core.utils import atomic_dir, atomic_write_text, interactive

SCHEMA_VERSION = 1
AUDIO_MEMBER = "audio.npy"
LABELS_MEMBER = "json"
PREVIEW_MEMBER = "flac"
BYTES_PER_MB = 1_000_000
TAR_MTIME = 0.0  # fixed member times: the same recipes give byte-identical shards
_JSON_KEYS = ("mixture_id", "labels", "captions", "is_event", "frames", "n_frames", "n_samples")


@dataclass(frozen=True)
class ShardsSummary:
    """What `write_shards` wrote; `to_json()` is the folder's `summary.json`."""

    schema_version: int
    params_hash: str  # the recipes' (synth section)
    shards_params_hash: str  # of the audio, synth, frames and shards sections
    sample_rate: int
    n_frames: int
    audio_member: str
    flac_preview: bool
    splits: dict[str, dict[str, Any]]  # per split: `write_split_shards`' summary

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def sample_key(split: str, mixture_id: int) -> str:
    return f"{split}-{mixture_id:09d}"


# --------------------------------------------------------------------------------------------
# writing


class _RotatingTarWriter:
    """Tar shards `<split>-NNNNNN.tar` in a folder; a new one starts once the current passes `max_bytes`."""

    def __init__(self, folder: Path, split: str, max_bytes: float) -> None:
        self.folder, self.split, self.max_bytes = folder, split, max_bytes
        self.names: list[str] = []
        self.bytes_closed = 0
        self._file: BinaryIO | None = None
        self._tar: TarWriter | None = None

    def write(self, sample: dict[str, Any]) -> None:
        if self._file is not None and self._file.tell() >= self.max_bytes:
            self._close_current()
        if self._tar is None:
            self.names.append(shard_name(self.split, len(self.names)))
            self._file = (self.folder / self.names[-1]).open("wb")
            self._tar = TarWriter(self._file, mtime=TAR_MTIME)
        self._tar.write(sample)

    def _close_current(self) -> None:
        if self._tar is not None and self._file is not None:
            self._tar.close()  # writes the end-of-archive blocks; the file is ours to close
            self._file.close()
            self.bytes_closed += (self.folder / self.names[-1]).stat().st_size
        self._tar, self._file = None, None

    def close(self) -> None:
        self._close_current()


def _recipe_chunks(path: Path) -> Iterator[pd.DataFrame]:
    """The recipe rows of `path`, one Parquet row group at a time, cut at mixture boundaries.

    Rows of a mixture that continue into the next row group are carried over, so every chunk
    holds whole mixtures; ids must increase across chunks as they do within one.
    """
    if not path.is_file():
        raise DataError(f"recipe file not found: {path}; run `flam synth recipes`")
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from exc
    missing = set(RECIPE_COLUMNS) - set(parquet.schema_arrow.names)
    if missing:
        raise DataError(f"{path}: missing recipe column(s) {sorted(missing)}")
    carry: pd.DataFrame | None = None
    last_id = -1
    for group in range(parquet.num_row_groups):
        rows = parquet.read_row_group(group, columns=list(RECIPE_COLUMNS)).to_pandas()
        if carry is not None:
            rows = pd.concat([carry, rows], ignore_index=True)
        if rows.empty:
            continue
        ids = rows["mixture_id"].to_numpy(np.int64)
        if ids[0] <= last_id or (np.diff(ids) < 0).any():
            raise DataError(f"{path}: recipe rows must be sorted by mixture_id")
        tail = int(np.searchsorted(ids, ids[-1]))  # first row of the last mixture
        carry = rows.iloc[tail:].reset_index(drop=True)
        if tail > 0:
            last_id = int(ids[tail - 1])
            yield rows.iloc[:tail].reset_index(drop=True)
    if carry is not None and not carry.empty:
        yield carry


def _sample(mixture: Mixture, split: str, recipes_hash: str, sample_rate: int, flac_preview: bool) -> dict:
    labels = mixture.labels
    meta = {
        "mixture_id": mixture.mixture_id,
        "split": split,
        "recipe_id": f"{recipes_hash}/{split}/{mixture.mixture_id}",
        "labels": list(labels.labels),
        "captions": list(labels.captions),
        "is_event": [bool(e) for e in labels.is_event],
        "frames": labels.frames.astype(np.uint8).tolist(),
        "n_frames": int(labels.frames.shape[1]),
        "n_samples": len(mixture.audio),
        "sample_rate": sample_rate,
    }
    sample: dict[str, Any] = {
        "__key__": sample_key(split, mixture.mixture_id),
        AUDIO_MEMBER: mixture.audio,  # webdataset's npy encoder: numpy.lib.format, dtype kept
        LABELS_MEMBER: meta,
    }
    if flac_preview:
        buffer = io.BytesIO()
        sf.write(buffer, np.clip(mixture.audio, -1.0, 1.0), sample_rate, format="FLAC", subtype="PCM_16")
        sample[PREVIEW_MEMBER] = buffer.getvalue()
    return sample


def write_split_shards(
    mixer: Mixer,
    recipe_path: Path,
    folder: Path,
    split: str,
    max_shard_mb: float,
    recipes_hash: str = "",
    progress: Progress | None = None,
    n_mixtures: int | None = None,
    flac_preview: bool = False,
) -> dict[str, Any]:
    """Render every mixture of `recipe_path` and stream it into `folder/<split>-NNNNNN.tar`.

    Memory stays bounded: one Parquet row group of recipes and one mixture at a time.
    `n_mixtures` only sizes the progress bar. Returns the split's summary:
    `{"n_mixtures", "n_shards", "bytes", "shards": [file names]}`.
    """
    task = progress.add_task(f"shards {split}", total=n_mixtures) if progress is not None else None
    writer = _RotatingTarWriter(Path(folder), split, max_shard_mb * BYTES_PER_MB)
    count = 0
    try:
        for chunk in _recipe_chunks(Path(recipe_path)):
            try:
                plan = mixer.plan(chunk)
            except DataError as exc:
                raise DataError(f"{recipe_path}: {exc}") from exc
            for i in range(len(plan)):
                sample = _sample(mixer.mix(plan, i), split, recipes_hash, mixer.sample_rate, flac_preview)
                writer.write(sample)
                count += 1
                if progress is not None and task is not None:
                    progress.advance(task)
    finally:
        writer.close()
    names = writer.names
    return {"n_mixtures": count, "n_shards": len(names), "bytes": writer.bytes_closed, "shards": names}


def write_shards(
    params: Params,
    library_dir: Path,
    recipes_dir: Path,
    out_dir: Path | None = None,
    splits: Sequence[str] | None = None,
    flac_preview: bool | None = None,
) -> ShardsSummary:
    """Materialise recipe splits (default `shards.splits`) as tar shards in `out_dir`.

    `out_dir` defaults to `shards.out_dir`; `flac_preview` (default `shards.flac_preview`) adds a
    16-bit FLAC member per sample.
    One `Mixer` is built from the library's manifest and renders `recipes_dir/<split>.parquet`
    mixture by mixture. Everything is written to a staging folder that replaces `out_dir` only
    when complete: a failure leaves the previous `out_dir` (or none) untouched. See the module
    docstring for the layout. Returns the summary (also `out_dir/summary.json`).

    Raises `DataError` naming the path when the library, a recipe file or the recipes'
    `summary.json` is missing, or when the recipes do not fit the library or the parameters.
    """
    library_dir, recipes_dir = Path(library_dir), Path(recipes_dir)
    out_dir = Path(out_dir or params.shards.out_dir)
    splits = list(params.shards.splits if splits is None else splits)
    flac_preview = params.shards.flac_preview if flac_preview is None else flac_preview
    summary_path = recipes_dir / "summary.json"
    if not summary_path.is_file():
        raise DataError(f"recipe summary not found: {summary_path}; run `flam synth recipes`")
    recipes_summary = json.loads(summary_path.read_text())
    if recipes_summary.get("mixture_s") != params.synth.mixture_s:
        raise DataError(
            f"{summary_path}: recipes are for {recipes_summary.get('mixture_s')} s mixtures, the parameters "
            f"say synth.mixture_s={params.synth.mixture_s}; rebuild the recipes with these parameters"
        )
    for split in splits:  # fail before the (slow) mixer is built
        recipe_path = recipes_dir / f"{split}.parquet"
        if not recipe_path.is_file():
            raise DataError(f"recipe file not found: {recipe_path}; run `flam synth recipes`")
    manifest = load_manifest(library_dir)
    mixer = Mixer(manifest, library_dir, params.synth, params.frames, params.audio.sample_rate)
    recipes_hash = str(recipes_summary.get("params_hash", ""))
    written: dict[str, Any] = {}
    with atomic_dir(out_dir) as staging, Progress(disable=not interactive()) as progress:
        for split in splits:
            expected = recipes_summary.get("splits", {}).get(split, {}).get("n_mixtures")
            written[split] = write_split_shards(
                mixer,
                recipes_dir / f"{split}.parquet",
                staging,
                split,
                params.shards.max_shard_mb,
                recipes_hash=recipes_hash,
                progress=progress,
                n_mixtures=expected,
                flac_preview=flac_preview,
            )
        summary = ShardsSummary(
            schema_version=SCHEMA_VERSION,
            params_hash=recipes_hash,
            shards_params_hash=params.section_hash("audio", "synth", "frames", "shards"),
            sample_rate=params.audio.sample_rate,
            n_frames=params.frames.n_frames,
            audio_member=AUDIO_MEMBER,
            flac_preview=flac_preview,
            splits=written,
        )
        atomic_write_text(staging / "summary.json", json.dumps(summary.to_json(), indent=2))
    return summary


# --------------------------------------------------------------------------------------------
# reading


def shard_paths(out_dir: Path, split: str) -> list[Path]:
    """The shards of `split` in `out_dir`, sorted (= written order). Raises `DataError` when none."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise DataError(f"shard folder not found: {out_dir}; run `flam synth shards`")
    pattern = re.compile(rf"{re.escape(split)}-\d{{6}}\.tar")
    paths = sorted(p for p in out_dir.iterdir() if pattern.fullmatch(p.name))
    if not paths:
        raise DataError(f"{out_dir}: no shards for split {split!r}; write them with `flam synth shards`")
    return paths


def _decode(sample: dict[str, Any], path: Path) -> Mixture:
    key = sample.get("__key__")
    if AUDIO_MEMBER not in sample or LABELS_MEMBER not in sample:
        raise DataError(f"{path}: sample {key} lacks {AUDIO_MEMBER!r} or {LABELS_MEMBER!r}")
    try:
        audio = np.lib.format.read_array(io.BytesIO(sample[AUDIO_MEMBER]), allow_pickle=False)
        meta = json.loads(sample[LABELS_MEMBER])
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: sample {key} cannot be decoded ({exc})") from exc
    missing = [k for k in _JSON_KEYS if k not in meta]
    if missing:
        raise DataError(f"{path}: sample {key} labels lack {missing}")
    if audio.dtype != np.float32 or audio.shape != (meta["n_samples"],):
        raise DataError(
            f"{path}: sample {key} audio is {audio.dtype} {audio.shape}, expected float32 [n_samples]"
        )
    n_labels = len(meta["labels"])
    try:
        frames = np.asarray(meta["frames"], dtype=bool).reshape(n_labels, meta["n_frames"])
    except ValueError as exc:
        raise DataError(f"{path}: sample {key} frames are not [{n_labels}, n_frames] ({exc})") from exc
    labels = FrameLabels(
        labels=tuple(meta["labels"]),
        captions=tuple(meta["captions"]),
        is_event=np.asarray(meta["is_event"], dtype=bool),
        frames=frames,
    )
    return Mixture(int(meta["mixture_id"]), audio, labels)


def iter_shards(paths: Sequence[Path]) -> Iterator[Mixture]:
    """Yield the `Mixture`s stored in `paths`, shard by shard, in the written order.

    Each equals `Mixer.mix` of its recipe: `audio` bit-identical float32 `[n_samples]`,
    labels/captions as tuples, `is_event` `[K]` bool, `frames` `[K, n_frames]` bool.
    Raises `DataError` naming the shard when it is missing or not a valid shard.
    """
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"shard not found: {path}")
        with path.open("rb") as stream:
            files = tar_file_expander(
                [{"url": str(path), "stream": stream}],
                select_files=lambda name: not name.endswith("." + PREVIEW_MEMBER),
            )
            try:
                for sample in group_by_keys(files):
                    yield _decode(sample, path)
            except (tarfile.TarError, ValueError) as exc:
                raise DataError(f"{path}: not a valid tar shard ({exc})") from exc
