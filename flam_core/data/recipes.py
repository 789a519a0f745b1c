"""Mixture recipes: the dataset of record.

A recipe row places one piece of one source clip into one mixture; a mixture is its rows:
one background row (onset 0, the whole mixture, looped from `clip_offset_s`) and the event
pieces. Sampling is vectorised over chunks of `synth.chunk_mixtures` mixtures, each chunk
with its own seeded generator, and streamed to Parquet chunk by chunk, so a million
mixtures take seconds and bounded memory.

Level reference: every clip carries its active RMS level (`active_rms_dbfs` in the source
manifest). The mixer scales the background so that its active RMS is `synth.background_dbfs`
and each event so that its active RMS is `gain_db` above that (the event-to-background
ratio, drawn from U(min_snr_db, max_snr_db)). Background rows have `gain_db = 0`.

Per mixture (FLAM_SPEC "Data"): N ~ U{min_events, max_events} events, each a clip of the
split; a `split_prob` share of events is cut into 2-3 consecutive pieces with gaps, a
`repeat_prob` share is played 2-3 times; at most `max_overlap` pieces sound at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from rich.progress import Progress

from flam_core.config import Params, SynthParams
from flam_core.data.sources import load_manifest
from flam_core.errors import ConfigError, DataError
from flam_core.utils import atomic_dir, atomic_write_text, file_sha256, interactive, stable_seed

SCHEMA_VERSION = 1
RECIPE_SPLITS = ("train", "val", "val_unseen", "test_seen", "test_unseen")
# Recipe splits of held-out labels (never trained on), and the source split each draws from.
UNSEEN_SPLITS = ("val_unseen", "test_unseen")
SOURCE_SPLIT_OF = {
    "train": "train",
    "val": "val",
    "val_unseen": "val",
    "test_seen": "test",
    "test_unseen": "test",
}
RECIPE_SCHEMA = pa.schema(
    [
        ("mixture_id", pa.int64()),  # 0..n-1 within the split
        ("kind", pa.dictionary(pa.int8(), pa.string())),  # "background" | "event"
        ("event_index", pa.int16()),  # event within the mixture (-1: background); pieces share it
        ("clip_id", pa.dictionary(pa.int32(), pa.string())),
        ("label", pa.dictionary(pa.int32(), pa.string())),
        ("caption_id", pa.int16()),  # index into the clip label's captions (-1: background)
        ("clip_offset_s", pa.float32()),  # where in the clip the piece starts
        ("onset_s", pa.float32()),  # where in the mixture it starts
        ("duration_s", pa.float32()),
        ("gain_db", pa.float32()),  # events: active RMS above the background's; background: 0
        ("fade_s", pa.float32()),
    ]
)
RECIPE_COLUMNS = tuple(RECIPE_SCHEMA.names)
TIME_GRID = 4096  # recipe times are multiples of 1/4096 s (exact in float32)


@dataclass(frozen=True)
class ClipPool:
    """The clips one recipe split may use: events and backgrounds, as aligned arrays."""

    event_ids: np.ndarray  # [n_events] str
    event_labels: np.ndarray  # [n_events] str
    event_durations: np.ndarray  # [n_events] float seconds
    event_n_captions: np.ndarray  # [n_events] int
    background_ids: np.ndarray
    background_labels: np.ndarray
    background_durations: np.ndarray

    @classmethod
    def for_split(cls, manifest: pd.DataFrame, split: str) -> ClipPool:
        """train/val: clips of that split; val_unseen / test_unseen: val / test clips of held-out
        labels; test_seen: test clips of the other labels."""
        if split not in RECIPE_SPLITS:
            raise DataError(f"unknown recipe split {split!r}; allowed: {list(RECIPE_SPLITS)}")
        source_split = SOURCE_SPLIT_OF[split]
        in_split = manifest["split"] == source_split
        events = manifest[in_split & (manifest["kind"] == "event")]
        events = events[events["heldout"] == (split in UNSEEN_SPLITS)]
        backgrounds = manifest[in_split & (manifest["kind"] == "background")]
        for what, table in (("event", events), ("background", backgrounds)):
            if table.empty:
                raise DataError(
                    f"recipe split {split!r}: the source library has no {what} clip for it "
                    f"(source split {source_split!r}); build a larger library or change sources.splits"
                )
        return cls.of(events, backgrounds)

    @classmethod
    def of(cls, events: pd.DataFrame, backgrounds: pd.DataFrame) -> ClipPool:
        """The pool of the given manifest rows (event clips, background clips), by clip id."""
        events = events.sort_values("clip_id")
        backgrounds = backgrounds.sort_values("clip_id")
        return cls(
            event_ids=events["clip_id"].to_numpy(str),
            event_labels=events["label"].to_numpy(str),
            event_durations=events["duration_s"].to_numpy(float),
            event_n_captions=events["captions"].map(len).to_numpy(int),
            background_ids=backgrounds["clip_id"].to_numpy(str),
            background_labels=backgrounds["label"].to_numpy(str),
            background_durations=backgrounds["duration_s"].to_numpy(float),
        )


@dataclass(frozen=True)
class RecipesSummary:
    """What `build_recipes` (or `merge_recipe_shards`) wrote; `to_json()` is the folder's `summary.json`."""

    schema_version: int
    profile: str
    params_hash: str  # of the synth section
    sources_manifest_hash: str  # the library's manifest hash the recipes were sampled from
    mixture_s: float
    # per recipe split: n_mixtures, n_rows, n_event_pieces, n_event_labels, n_event_clips,
    # n_background_clips, bytes (of the Parquet file), sha256
    splits: dict[str, dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _to_grid(seconds: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(seconds) * TIME_GRID) / TIME_GRID


def _segment_starts(counts: np.ndarray) -> np.ndarray:
    return np.concatenate(([0], np.cumsum(counts)[:-1]))


def _rank_within(counts: np.ndarray) -> np.ndarray:
    """For groups of sizes `counts` laid out consecutively: 0..size-1 inside each group."""
    total = int(counts.sum())
    return np.arange(total) - np.repeat(_segment_starts(counts), counts)


def max_concurrency(mixture: np.ndarray, onsets: np.ndarray, ends: np.ndarray, n_mixtures: int) -> np.ndarray:
    """Largest number of intervals sounding at once, per mixture (`[n_mixtures]` int).

    A sweep over all mixtures at once: interval ends sort before starts at equal times,
    so touching intervals do not count as overlapping.
    """
    result = np.zeros(n_mixtures, dtype=np.int64)
    if len(onsets) == 0:
        return result
    times = np.concatenate((onsets, ends))
    delta = np.concatenate((np.ones(len(onsets), np.int64), -np.ones(len(ends), np.int64)))
    owner = np.concatenate((mixture, mixture))
    order = np.lexsort((delta, times, owner))
    running = np.cumsum(delta[order])  # each mixture's sweep returns to 0 before the next
    owner_sorted = owner[order]
    starts = np.flatnonzero(np.concatenate(([True], owner_sorted[1:] != owner_sorted[:-1])))
    result[owner_sorted[starts]] = np.maximum.reduceat(running, starts)
    return result


def _place_in_lanes(
    rng: np.random.Generator,
    event_mixture: np.ndarray,
    span: np.ndarray,
    n_mixtures: int,
    n_lanes: int,
    length: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Block onsets such that at most `n_lanes` event blocks sound at once.

    Each mixture has `n_lanes` lanes; blocks never overlap within a lane, so no instant has
    more than `n_lanes` events. Blocks go to the least-loaded lane, longest first; within a
    lane they come in random order, separated by uniform random spacings of the lane's free
    time (the distribution of uniformly placed, non-overlapping intervals). A block that
    fits no lane (only when the mixture's events add up to more than `n_lanes` x `length`)
    gets lane -1 and is dropped by the caller.

    Returns `(lane [n_events] int, block_onset [n_events] float)`.
    """
    n_ev = len(span)
    by_length = np.lexsort((-span, event_mixture))  # per mixture, longest block first
    rank = np.empty(n_ev, dtype=np.int64)
    rank[by_length] = _rank_within(np.bincount(event_mixture, minlength=n_mixtures))
    load = np.zeros((n_mixtures, n_lanes))
    lane = np.full(n_ev, -1, dtype=np.int64)
    for r in range(int(rank.max(initial=-1)) + 1):
        events = np.flatnonzero(rank == r)
        mixtures = event_mixture[events]
        best = np.argmin(load[mixtures], axis=1)
        fits = load[mixtures, best] + span[events] <= length + 1e-9
        lane[events[fits]] = best[fits]
        load[mixtures[fits], best[fits]] += span[events[fits]]
    placed = np.flatnonzero(lane >= 0)
    group = event_mixture[placed] * n_lanes + lane[placed]
    order = placed[np.argsort(group + rng.random(len(placed)), kind="stable")]  # random order in lane
    group = event_mixture[order] * n_lanes + lane[order]
    counts = np.bincount(group, minlength=n_mixtures * n_lanes)
    # Uniform spacings: n + 1 exponential draws per lane, scaled to the lane's free time.
    weights = rng.exponential(1.0, len(order))
    trailing = rng.exponential(1.0, n_mixtures * n_lanes)
    free = np.maximum(length - load.ravel(), 0.0)
    scale = free / (np.bincount(group, weights=weights, minlength=len(free)) + trailing)
    gaps = weights * scale[group]
    first = np.repeat(_segment_starts(counts), counts)  # each row's first row in its lane
    spans_sorted = span[order]
    spans_before = np.cumsum(spans_sorted) - spans_sorted  # exclusive running sums
    gaps_through = np.cumsum(gaps)  # inclusive: the gap before a block belongs to it
    onset_sorted = (spans_before - spans_before[first]) + (gaps_through - (gaps_through - gaps)[first])
    block_onset = np.zeros(n_ev)
    block_onset[order] = onset_sorted
    return lane, block_onset


def sample_chunk(pool: ClipPool, synth: SynthParams, n_mixtures: int, first_id: int, seed: int) -> pa.Table:
    """Recipes for mixtures `first_id .. first_id + n_mixtures - 1` as a `RECIPE_SCHEMA` table."""
    rng = np.random.default_rng(seed)
    length = synth.mixture_s
    # --- events ---------------------------------------------------------------------------
    n_events = rng.integers(synth.min_events, synth.max_events + 1, n_mixtures)
    event_mixture = np.repeat(np.arange(n_mixtures), n_events)
    n_ev = len(event_mixture)
    clip = rng.integers(0, len(pool.event_ids), n_ev)
    clip_duration = np.minimum(pool.event_durations[clip], length)
    caption = (rng.random(n_ev) * pool.event_n_captions[clip]).astype(np.int16)
    gain = rng.uniform(synth.min_snr_db, synth.max_snr_db, n_ev)
    mode = rng.random(n_ev)
    is_split = mode < synth.split_prob
    is_repeat = (mode >= synth.split_prob) & (mode < synth.split_prob + synth.repeat_prob)
    pieces = np.where(is_split | is_repeat, rng.integers(synth.min_pieces, synth.max_pieces + 1, n_ev), 1)
    # --- pieces: rows of the recipe -------------------------------------------------------
    row_event = np.repeat(np.arange(n_ev), pieces)
    piece_index = _rank_within(pieces)
    k = pieces[row_event]
    d = clip_duration[row_event]
    repeat_len = np.minimum(d, length / k)
    duration = np.where(is_split[row_event], d / k, np.where(is_repeat[row_event], repeat_len, d))
    clip_offset = np.where(is_split[row_event], piece_index * d / k, 0.0)
    gap = np.where(piece_index > 0, rng.uniform(0.1, 1.0, len(row_event)), 0.0)
    # Squeeze gaps where the pieces and gaps of one event would not fit the mixture.
    busy = np.bincount(row_event, weights=duration, minlength=n_ev)
    gaps = np.bincount(row_event, weights=gap, minlength=n_ev)
    squeeze = np.where(busy + gaps > length, np.maximum(length - busy, 0) / np.maximum(gaps, 1e-9), 1.0)
    gap = gap * squeeze[row_event]
    advance = gap + duration  # each piece: its gap after the previous piece, then itself
    before = np.cumsum(advance) - advance  # exclusive running sum over all rows
    local_onset = before - before[_segment_starts(pieces)][row_event] + gap  # within its event
    span = np.bincount(row_event, weights=advance, minlength=n_ev)  # block length per event
    # --- placement under the overlap bound --------------------------------------------------
    lane, block_onset = _place_in_lanes(rng, event_mixture, span, n_mixtures, synth.max_overlap, length)
    alive = lane >= 0
    # Times go to a 2^-12 s grid, which float32 holds exactly up to 4096 s: rounding is
    # monotonic, so pieces that did not overlap in float64 do not overlap once stored.
    raw_onset = block_onset[row_event] + local_onset
    onset = _to_grid(raw_onset)
    duration = _to_grid(raw_onset + duration) - onset
    clip_offset = _to_grid(clip_offset)
    keep = alive[row_event]
    event_rows = {
        "mixture_id": (event_mixture[row_event] + first_id)[keep],
        "kind_code": np.ones(int(keep.sum()), np.int8),
        "event_index": _rank_within(n_events)[row_event][keep].astype(np.int16),
        "clip": clip[row_event][keep],
        "caption_id": caption[row_event][keep],
        "clip_offset_s": clip_offset[keep],
        "onset_s": onset[keep],
        "duration_s": duration[keep],
        "gain_db": gain[row_event][keep],
    }
    # --- backgrounds ------------------------------------------------------------------------
    background = rng.integers(0, len(pool.background_ids), n_mixtures)
    background_rows = {
        "mixture_id": np.arange(n_mixtures) + first_id,
        "kind_code": np.zeros(n_mixtures, np.int8),
        "event_index": np.full(n_mixtures, -1, np.int16),
        "clip": background,
        "caption_id": np.full(n_mixtures, -1, np.int16),
        "clip_offset_s": _to_grid(rng.uniform(0, 1, n_mixtures) * pool.background_durations[background]),
        "onset_s": np.zeros(n_mixtures),
        "duration_s": np.full(n_mixtures, length),
        "gain_db": np.zeros(n_mixtures),
    }
    return _to_table(pool, background_rows, event_rows, synth.fade_s)


def _to_table(
    pool: ClipPool, background: dict[str, np.ndarray], events: dict[str, np.ndarray], fade_s: float
) -> pa.Table:
    """Background row first, then event rows by onset, per mixture; dictionary-encoded strings."""
    merged = {key: np.concatenate((background[key], events[key])) for key in background}
    is_event = merged["kind_code"] == 1
    order = np.lexsort((merged["onset_s"], merged["kind_code"], merged["mixture_id"]))
    merged = {key: value[order] for key, value in merged.items()}
    is_event = is_event[order]
    # One dictionary for both kinds: events first, then backgrounds.
    clip_codes = np.where(is_event, merged["clip"], merged["clip"] + len(pool.event_ids)).astype(np.int32)
    clip_dictionary = pa.array(np.concatenate((pool.event_ids, pool.background_ids)))
    labels = np.concatenate((pool.event_labels, pool.background_labels))
    label_dictionary, label_codes = np.unique(labels, return_inverse=True)
    n = len(order)
    columns = {
        "mixture_id": pa.array(merged["mixture_id"], pa.int64()),
        "kind": pa.DictionaryArray.from_arrays(
            pa.array(merged["kind_code"], pa.int8()), pa.array(["background", "event"])
        ),
        "event_index": pa.array(merged["event_index"], pa.int16()),
        "clip_id": pa.DictionaryArray.from_arrays(pa.array(clip_codes), clip_dictionary),
        "label": pa.DictionaryArray.from_arrays(
            pa.array(label_codes[clip_codes].astype(np.int32)), pa.array(label_dictionary)
        ),
        "caption_id": pa.array(merged["caption_id"], pa.int16()),
        "clip_offset_s": pa.array(merged["clip_offset_s"], pa.float32()),
        "onset_s": pa.array(merged["onset_s"], pa.float32()),
        "duration_s": pa.array(merged["duration_s"], pa.float32()),
        "gain_db": pa.array(merged["gain_db"], pa.float32()),
        "fade_s": pa.array(np.full(n, fade_s), pa.float32()),
    }
    return pa.table(columns, schema=RECIPE_SCHEMA)


def _write_tables(path: Path, tables: Iterable[pa.Table]) -> tuple[int, int]:
    """Stream chunk tables into one Parquet file, one row group each; returns (rows, event rows)."""
    n_rows = n_events = 0
    with pq.ParquetWriter(path, RECIPE_SCHEMA, compression="zstd") as writer:
        for table in tables:
            writer.write_table(table, row_group_size=len(table))
            n_rows += len(table)
            n_events += int(np.count_nonzero(table.column("event_index").to_numpy() >= 0))
    return n_rows, n_events


def _split_summary(pool: ClipPool, n_mixtures: int, n_rows: int, n_events: int, path: Path) -> dict[str, Any]:
    return {
        "n_mixtures": n_mixtures,
        "n_rows": n_rows,
        "n_event_pieces": n_events,
        "n_event_labels": int(len(np.unique(pool.event_labels))),
        "n_event_clips": len(pool.event_ids),
        "n_background_clips": len(pool.background_ids),
        "bytes": path.stat().st_size,
    }


def write_split(
    pool: ClipPool,
    synth: SynthParams,
    split: str,
    n_mixtures: int,
    path: Path,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Sample and stream one split to Parquet, chunk by chunk; returns its summary."""
    chunk = synth.chunk_mixtures
    task = progress.add_task(f"recipes {split}", total=n_mixtures) if progress else None

    def tables() -> Iterator[pa.Table]:
        for index, first in enumerate(range(0, n_mixtures, chunk)):
            count = min(chunk, n_mixtures - first)
            yield sample_chunk(pool, synth, count, first, stable_seed(synth.seed, split, index))
            if progress is not None and task is not None:
                progress.advance(task, count)

    n_rows, n_events = _write_tables(path, tables())
    return _split_summary(pool, n_mixtures, n_rows, n_events, path)


def _load_library(params: Params, library_dir: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The library's manifest and summary, checked against `synth` (clips must fit a mixture)."""
    manifest = load_manifest(library_dir)
    too_long = manifest.loc[manifest["kind"] == "event", "duration_s"].max()
    if too_long > params.synth.mixture_s:
        raise DataError(f"event clips up to {too_long:.2f} s do not fit {params.synth.mixture_s} s mixtures")
    summary_path = library_dir / "summary.json"
    if not summary_path.is_file():
        raise DataError(f"source library summary not found: {summary_path}; run `flam sources build`")
    return manifest, json.loads(summary_path.read_text())


def _recipes_summary(
    params: Params, sources_summary: dict[str, Any], splits: dict[str, Any]
) -> RecipesSummary:
    return RecipesSummary(
        schema_version=SCHEMA_VERSION,
        profile=params.profile,
        params_hash=params.section_hash("synth"),
        sources_manifest_hash=sources_summary["manifest_hash"],
        mixture_s=params.synth.mixture_s,
        splits=splits,
    )


def build_recipes(
    params: Params, library_dir: Path | None = None, out_dir: Path | None = None
) -> RecipesSummary:
    """Sample every recipe split into `synth.out_dir`; returns the summary (also `summary.json`)."""
    synth = params.synth
    library_dir = Path(library_dir or params.sources.out_dir)
    out_dir = Path(out_dir or synth.out_dir)
    manifest, sources_summary = _load_library(params, library_dir)
    splits: dict[str, Any] = {}
    with atomic_dir(out_dir) as staging, Progress(disable=not interactive()) as progress:
        for split in RECIPE_SPLITS:
            pool = ClipPool.for_split(manifest, split)
            n = getattr(synth.n_mixtures, split)
            splits[split] = write_split(pool, synth, split, n, staging / f"{split}.parquet", progress)
            splits[split]["sha256"] = file_sha256(staging / f"{split}.parquet")
        summary = _recipes_summary(params, sources_summary, splits)
        atomic_write_text(staging / "summary.json", json.dumps(summary.to_json(), indent=2))
    return summary


# --- sharded sampling ------------------------------------------------------------------------
# The unit of work is one chunk of one split: `(split, chunk index)`, sampled with the same seed
# as `build_recipes` gives it. `plan_recipe_shards` deals the units round-robin to shards;
# `build_recipe_shard` samples one shard's units into Arrow IPC files (exact tables, dictionaries
# included); `merge_recipe_shards` streams them, in split and chunk order, through the same
# Parquet writer, so its folder is byte-identical to `build_recipes`' output.

SHARD_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class RecipeShard:
    """One sampled shard of the recipes; `to_json()` is its `shard.json`."""

    schema_version: int
    shard: int
    n_shards: int  # shards in the plan (at most the n_shards asked for)
    units: list[tuple[str, int]]  # (split, chunk index) sampled into this shard, in plan order
    params_hash: str  # of the synth section
    sources_manifest_hash: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"units": [list(unit) for unit in self.units]}


def recipe_units(params: Params) -> list[tuple[str, int]]:
    """Every `(split, chunk index)` of the recipes, in the order `build_recipes` writes them."""
    chunk = params.synth.chunk_mixtures
    return [
        (split, index)
        for split in RECIPE_SPLITS
        for index in range(-(-getattr(params.synth.n_mixtures, split) // chunk))
    ]


def plan_recipe_shards(params: Params, n_shards: int) -> list[list[tuple[str, int]]]:
    """The units of each shard: round-robin over `recipe_units`, no empty shard.

    At most `n_shards` shards, and no more than there are units (`synth.chunk_mixtures` sets
    how many chunks a split has).
    """
    if n_shards < 1:
        raise ConfigError(f"n_shards must be at least 1 (got {n_shards})")
    units = recipe_units(params)
    count = min(n_shards, len(units))
    return [units[i::count] for i in range(count)]


def _unit_table(pool: ClipPool, synth: SynthParams, split: str, index: int) -> pa.Table:
    first = index * synth.chunk_mixtures
    count = min(synth.chunk_mixtures, getattr(synth.n_mixtures, split) - first)
    return sample_chunk(pool, synth, count, first, stable_seed(synth.seed, split, index))


def _unit_file(split: str, index: int) -> str:
    return f"{split}-{index:06d}.arrow"


def build_recipe_shard(
    params: Params,
    shard: int,
    n_shards: int,
    library_dir: Path | None = None,
    out_dir: Path | None = None,
) -> RecipeShard:
    """Sample shard `shard` of `plan_recipe_shards(params, n_shards)` into `out_dir`.

    Writes one Arrow IPC file per unit and `shard.json` (the units, the synth hash and the
    library's manifest hash); returns what it holds.
    """
    library_dir = Path(library_dir or params.sources.out_dir)
    if out_dir is None:
        raise ConfigError("build_recipe_shard needs an out_dir")
    plan = plan_recipe_shards(params, n_shards)
    if not 0 <= shard < len(plan):
        raise ConfigError(f"recipe shard {shard} does not exist: the plan has {len(plan)} shard(s)")
    manifest, sources_summary = _load_library(params, library_dir)
    pools: dict[str, ClipPool] = {}
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with atomic_dir(Path(out_dir)) as staging:
        for split, index in plan[shard]:
            if split not in pools:
                pools[split] = ClipPool.for_split(manifest, split)
            table = _unit_table(pools[split], params.synth, split, index)
            path = staging / _unit_file(split, index)
            with pa.ipc.new_file(path, RECIPE_SCHEMA, options=options) as writer:
                writer.write_table(table)
        info = RecipeShard(
            schema_version=SHARD_SCHEMA_VERSION,
            shard=shard,
            n_shards=len(plan),
            units=list(plan[shard]),
            params_hash=params.section_hash("synth"),
            sources_manifest_hash=sources_summary["manifest_hash"],
        )
        atomic_write_text(staging / "shard.json", json.dumps(info.to_json(), indent=2))
    return info


def _read_unit(path: Path) -> pa.Table:
    with pa.ipc.open_file(path) as reader:
        return reader.read_all()


def merge_recipe_shards(
    params: Params,
    shard_dirs: Sequence[Path],
    library_dir: Path | None = None,
    out_dir: Path | None = None,
) -> RecipesSummary:
    """Merge `build_recipe_shard` folders into the recipe folder `build_recipes` would write.

    Raises `DataError` when a shard was sampled with other synth parameters or from another
    library, or when a unit is missing or present twice.
    """
    library_dir = Path(library_dir or params.sources.out_dir)
    out_dir = Path(out_dir or params.synth.out_dir)
    manifest, sources_summary = _load_library(params, library_dir)
    expected_hash = params.section_hash("synth")
    files: dict[tuple[str, int], Path] = {}
    for folder in map(Path, shard_dirs):
        info_path = folder / "shard.json"
        if not info_path.is_file():
            raise DataError(f"recipe shard manifest not found: {info_path}")
        info = json.loads(info_path.read_text())
        if info.get("params_hash") != expected_hash:
            raise DataError(f"{info_path}: sampled with other synth parameters than these")
        if info.get("sources_manifest_hash") != sources_summary["manifest_hash"]:
            raise DataError(f"{info_path}: sampled from another source library than {library_dir}")
        for split, index in info["units"]:
            unit = (str(split), int(index))
            if unit in files:
                raise DataError(f"recipe unit {unit} is in two shards: {files[unit].parent} and {folder}")
            path = folder / _unit_file(*unit)
            if not path.is_file():
                raise DataError(f"recipe shard file not found: {path}")
            files[unit] = path
    expected = recipe_units(params)
    missing = [unit for unit in expected if unit not in files]
    extra = sorted(set(files) - set(expected))
    if missing or extra:
        raise DataError(f"recipe shards do not cover the plan: missing {missing}, unexpected {extra}")
    splits: dict[str, Any] = {}
    with atomic_dir(out_dir) as staging:
        for split in RECIPE_SPLITS:
            pool = ClipPool.for_split(manifest, split)
            path = staging / f"{split}.parquet"
            units = [unit for unit in expected if unit[0] == split]
            n_rows, n_events = _write_tables(path, (_read_unit(files[unit]) for unit in units))
            n = getattr(params.synth.n_mixtures, split)
            splits[split] = _split_summary(pool, n, n_rows, n_events, path)
            splits[split]["sha256"] = file_sha256(path)
        summary = _recipes_summary(params, sources_summary, splits)
        atomic_write_text(staging / "summary.json", json.dumps(summary.to_json(), indent=2))
    return summary


def read_recipes(path: Path) -> pd.DataFrame:
    """A recipe split as a DataFrame (string columns as categoricals)."""
    if not Path(path).is_file():
        raise DataError(f"recipe file not found: {path}; run `flam synth recipes`")
    table = pq.read_table(path)
    missing = set(RECIPE_COLUMNS) - set(table.column_names)
    if missing:
        raise DataError(f"{path}: missing recipe column(s) {sorted(missing)}")
    return table.to_pandas()
