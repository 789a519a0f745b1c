import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from flam_core.config import SynthParams
from flam_core.data.recipes import (
    RECIPE_COLUMNS,
    RECIPE_SPLITS,
    TIME_GRID,
    ClipPool,
    max_concurrency,
    read_recipes,
    sample_chunk,
)
from flam_core.data.sources import load_manifest
from flam_core.errors import DataError


def synthetic_pool(rng: np.random.Generator, n_events: int = 60, n_backgrounds: int = 5) -> ClipPool:
    return ClipPool(
        event_ids=np.array([f"e{i:03d}" for i in range(n_events)]),
        event_labels=np.array([f"label {i % 20}" for i in range(n_events)]),
        event_durations=rng.uniform(0.1, 4.0, n_events),  # mean ~2 s, as in the source library
        event_n_captions=rng.integers(1, 7, n_events),
        background_ids=np.array([f"b{i}" for i in range(n_backgrounds)]),
        background_labels=np.array([f"bg {i}" for i in range(n_backgrounds)]),
        background_durations=rng.uniform(2.0, 30.0, n_backgrounds),
    )


@pytest.fixture(scope="module")
def sampled():
    rng = np.random.default_rng(0)
    pool = synthetic_pool(rng)
    synth = SynthParams()
    frames = [sample_chunk(pool, synth, 2500, first, seed).to_pandas() for first, seed in ((0, 1), (2500, 2))]
    return pool, synth, pd.concat(frames, ignore_index=True)


def test_schema_and_one_background_per_mixture(sampled):
    _, synth, table = sampled
    assert tuple(table.columns) == RECIPE_COLUMNS
    backgrounds = table[table["kind"] == "background"]
    assert backgrounds["mixture_id"].is_unique and len(backgrounds) == 5000
    assert (backgrounds["onset_s"] == 0).all() and (backgrounds["duration_s"] == synth.mixture_s).all()
    assert (backgrounds["gain_db"] == 0).all() and (backgrounds["caption_id"] == -1).all()
    # rows come per mixture: background first, then events by onset
    first_rows = table.groupby("mixture_id").head(1)
    assert (first_rows["kind"] == "background").all()
    assert (table.groupby("mixture_id")["onset_s"].apply(lambda s: s.iloc[1:].is_monotonic_increasing)).all()


def test_randomized_invariants_over_thousands_of_mixtures(sampled):
    pool, synth, table = sampled
    events = table[table["kind"] == "event"]
    end = events["onset_s"] + events["duration_s"]
    assert (events["onset_s"] >= 0).all() and (end <= synth.mixture_s).all()
    assert (events["duration_s"] > 0).all()
    assert events["gain_db"].between(synth.min_snr_db, synth.max_snr_db).all()
    assert (events["fade_s"] == synth.fade_s).all()
    # times sit on the float32-exact grid
    for column in ("onset_s", "duration_s", "clip_offset_s"):
        assert np.array_equal(events[column] * TIME_GRID, np.round(events[column] * TIME_GRID))
    peak = max_concurrency(
        events["mixture_id"].to_numpy(), events["onset_s"].to_numpy(float), end.to_numpy(float), 5000
    )
    assert peak.max() <= synth.max_overlap and peak.min() >= 1
    n_events = events.groupby("mixture_id")["event_index"].nunique()
    assert n_events.min() >= synth.min_events and n_events.max() <= synth.max_events
    assert n_events.mean() == pytest.approx(5.5, abs=0.2)  # U{1..10}: few events fail to fit
    # pieces come from inside their clip, captions exist
    durations = dict(zip(pool.event_ids, pool.event_durations, strict=True))
    n_captions = dict(zip(pool.event_ids, pool.event_n_captions, strict=True))
    clip_ids = events["clip_id"].astype(str)
    # offset and end are each rounded to the grid: up to two grid steps past the clip (the mixer clamps)
    assert (events["clip_offset_s"] + events["duration_s"] <= clip_ids.map(durations) + 2 / TIME_GRID).all()
    assert (events["caption_id"] < clip_ids.map(n_captions)).all() and (events["caption_id"] >= 0).all()


def test_split_and_repeated_events(sampled):
    _, synth, table = sampled
    events = table[table["kind"] == "event"]
    pieces = events.groupby(["mixture_id", "event_index"])
    counts = pieces.size()
    multi = counts[counts > 1]
    assert multi.max() <= synth.max_pieces and multi.min() >= synth.min_pieces
    share = len(multi) / len(counts)
    assert share == pytest.approx(synth.split_prob + synth.repeat_prob, abs=0.02)
    for _, group in list(
        events.set_index(["mixture_id", "event_index"]).loc[multi.index[:300]].groupby(level=[0, 1])
    ):
        assert group["clip_id"].nunique() == 1 and group["gain_db"].nunique() == 1
        starts, ends = group["onset_s"].to_numpy(), (group["onset_s"] + group["duration_s"]).to_numpy()
        assert (starts[1:] >= ends[:-1]).all()  # pieces of one event follow each other
        offsets = group["clip_offset_s"].to_numpy()
        assert (offsets == 0).all() or (np.diff(offsets) > 0).all()  # repeats or consecutive pieces


def test_sampling_is_deterministic_and_seeded():
    pool = synthetic_pool(np.random.default_rng(1))
    a = sample_chunk(pool, SynthParams(), 300, 0, seed=5)
    b = sample_chunk(pool, SynthParams(), 300, 0, seed=5)
    c = sample_chunk(pool, SynthParams(), 300, 0, seed=6)
    assert a.equals(b) and not a.equals(c)


def test_max_concurrency_counts_touching_intervals_once():
    mixture = np.array([0, 0, 0, 1, 1])
    onsets = np.array([0.0, 1.0, 0.5, 0.0, 0.0])
    ends = np.array([1.0, 2.0, 1.5, 5.0, 5.0])
    assert max_concurrency(mixture, onsets, ends, 3).tolist() == [2, 2, 0]


def test_smoke_recipes_respect_the_splits(smoke_library, smoke_recipes):
    library, _ = smoke_library
    recipes_dir, summary = smoke_recipes
    manifest = load_manifest(library).set_index("clip_id")
    heldout = set(manifest.loc[manifest["heldout"], "label"])
    labels_of = {}
    for split in RECIPE_SPLITS:
        table = read_recipes(recipes_dir / f"{split}.parquet")
        assert table["mixture_id"].nunique() == summary.splits[split]["n_mixtures"]
        clips = manifest.loc[table["clip_id"].astype(str)]
        event_labels = set(clips.loc[clips["kind"] == "event", "label"])
        expected_source = "test" if split.startswith("test") else split.removesuffix("_unseen")
        assert set(clips["split"]) == {expected_source}
        if split.endswith("_unseen"):
            assert event_labels <= heldout
        else:
            assert not event_labels & heldout
        labels_of[split] = event_labels
    # The labels the novel-prompt threshold is chosen on are not the labels it is tested on.
    assert labels_of["val_unseen"] and labels_of["test_unseen"]
    assert not labels_of["val_unseen"] & labels_of["test_unseen"]
    assert summary.sources_manifest_hash
    assert json.loads((recipes_dir / "summary.json").read_text()) == summary.to_json()


def test_streamed_chunks_make_row_groups(smoke_library, tmp_path):
    from flam_core.data.recipes import write_split
    from tests.conftest import smoke_params

    library, _ = smoke_library
    pool = ClipPool.for_split(load_manifest(library), "train")
    synth = smoke_params("synth.chunk_mixtures=100").synth
    info = write_split(pool, synth, "train", 250, tmp_path / "train.parquet")
    parquet = pq.ParquetFile(tmp_path / "train.parquet")
    assert parquet.metadata.num_row_groups == 3 and info["n_mixtures"] == 250
    assert read_recipes(tmp_path / "train.parquet")["mixture_id"].max() == 249


def test_a_split_without_clips_is_a_clear_error(smoke_library):
    library, _ = smoke_library
    manifest = load_manifest(library)
    no_val = manifest[manifest["split"] != "val"]
    with pytest.raises(DataError, match=r"recipe split 'val': the source library has no event clip"):
        ClipPool.for_split(no_val, "val")
    with pytest.raises(DataError, match="unknown recipe split"):
        ClipPool.for_split(manifest, "dev")
