import io
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from flam_core.data.recipes import read_recipes
from flam_core.data.shards import iter_shards, shard_paths, write_shards
from flam_core.errors import DataError
from tests.conftest import smoke_params

SPLITS = ("val", "test_unseen")


@pytest.fixture(scope="module")
def written(smoke_library, smoke_recipes, tmp_path_factory):
    library, _ = smoke_library
    recipes, _ = smoke_recipes
    out = tmp_path_factory.mktemp("shards") / "shards"
    summary = write_shards(smoke_params(), library, recipes, out_dir=out, splits=SPLITS)
    return out, summary


def test_shards_read_back_exactly_what_on_the_fly_mixing_yields(mixer, smoke_recipes, written):
    recipes, _ = smoke_recipes
    out, _ = written
    for split in SPLITS:
        plan = mixer.plan(read_recipes(recipes / f"{split}.parquet"))
        stored = list(iter_shards(shard_paths(out, split)))
        assert len(stored) == len(plan)
        for i, got in enumerate(stored):
            expected = mixer.mix(plan, i)
            assert got.mixture_id == expected.mixture_id
            assert got.audio.dtype == np.float32 and np.array_equal(got.audio, expected.audio)
            assert got.labels.labels == expected.labels.labels
            assert got.labels.captions == expected.labels.captions
            assert np.array_equal(got.labels.is_event, expected.labels.is_event)
            assert got.labels.frames.dtype == bool
            assert np.array_equal(got.labels.frames, expected.labels.frames)


def test_summary_counts_match_the_recipes(smoke_recipes, written):
    _, recipes_summary = smoke_recipes
    out, summary = written
    assert json.loads((out / "summary.json").read_text()) == summary.to_json()
    assert summary.params_hash == recipes_summary.params_hash
    assert set(summary.splits) == set(SPLITS)
    for split in SPLITS:
        entry = summary.splits[split]
        assert entry["n_mixtures"] == recipes_summary.splits[split]["n_mixtures"]
        assert entry["shards"] == [p.name for p in shard_paths(out, split)]
        assert entry["n_shards"] == len(entry["shards"]) == 1
        assert entry["bytes"] == sum((out / name).stat().st_size for name in entry["shards"])
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["summary.json", *(name for s in SPLITS for name in summary.splits[s]["shards"])]
    )


def test_tiny_max_shard_mb_splits_a_split_into_several_shards(smoke_library, smoke_recipes, tmp_path):
    library, _ = smoke_library
    recipes, recipes_summary = smoke_recipes
    params = smoke_params("shards.max_shard_mb=0.5")  # each sample holds ~0.64 MB of audio
    summary = write_shards(params, library, recipes, out_dir=tmp_path / "shards", splits=["val"])
    n_mixtures = recipes_summary.splits["val"]["n_mixtures"]
    paths = shard_paths(tmp_path / "shards", "val")
    assert summary.splits["val"]["n_shards"] == len(paths) == n_mixtures > 1
    assert [p.name for p in paths] == [f"val-{n:06d}.tar" for n in range(n_mixtures)]
    assert [m.mixture_id for m in iter_shards(paths)] == list(range(n_mixtures))


def test_flac_preview_is_a_16_bit_copy_and_is_not_read_back(smoke_library, smoke_recipes, tmp_path, mixer):
    import tarfile

    library, _ = smoke_library
    recipes, _ = smoke_recipes
    write_shards(
        smoke_params(), library, recipes, out_dir=tmp_path / "shards", splits=["val"], flac_preview=True
    )
    path = shard_paths(tmp_path / "shards", "val")[0]
    with tarfile.open(path) as tar:
        flac = tar.extractfile("val-000000000.flac").read()  # type: ignore[union-attr]
    preview, rate = sf.read(io.BytesIO(flac), dtype="float32")
    first = next(iter_shards([path]))
    assert rate == mixer.sample_rate and np.max(np.abs(preview - first.audio)) <= 1.0 / 32768


def test_a_failed_write_leaves_the_previous_output_untouched(smoke_library, smoke_recipes, tmp_path):
    library, _ = smoke_library
    recipes, _ = smoke_recipes
    broken = tmp_path / "recipes"
    broken.mkdir()
    for name in ("summary.json", "val.parquet"):
        shutil.copy(recipes / name, broken / name)
    table = read_recipes(recipes / "test_unseen.parquet")
    table["clip_id"] = table["clip_id"].astype(str)
    table.loc[len(table) - 1, "clip_id"] = "no-such-clip"
    table.to_parquet(broken / "test_unseen.parquet", index=False)

    out = tmp_path / "out"
    with pytest.raises(DataError, match="no-such-clip"):
        write_shards(smoke_params(), library, broken, out_dir=out, splits=SPLITS)
    assert list(tmp_path.iterdir()) == [broken]  # no output, no staging folder left behind

    write_shards(smoke_params(), library, broken, out_dir=out, splits=["val"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DataError, match=r"test_unseen\.parquet"):
        write_shards(smoke_params(), library, broken, out_dir=out, splits=SPLITS)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "recipes"]


def test_missing_inputs_raise_data_error_naming_the_path(smoke_library, smoke_recipes, tmp_path, written):
    library, _ = smoke_library
    recipes, _ = smoke_recipes
    partial = tmp_path / "recipes"
    partial.mkdir()
    shutil.copy(recipes / "summary.json", partial / "summary.json")
    with pytest.raises(DataError, match=r"recipes/val\.parquet"):
        write_shards(smoke_params(), library, partial, out_dir=tmp_path / "out", splits=["val"])
    with pytest.raises(DataError, match="nowhere"):
        shard_paths(tmp_path / "nowhere", "val")
    out, _ = written
    with pytest.raises(DataError, match="train"):
        shard_paths(out, "train")  # a split that was not written
    with pytest.raises(DataError, match=r"gone\.tar"):
        list(iter_shards([tmp_path / "gone.tar"]))
    (tmp_path / "junk.tar").write_bytes(b"not a tar file")
    with pytest.raises(DataError, match=r"junk\.tar"):
        list(iter_shards([tmp_path / "junk.tar"]))


def test_recipes_are_streamed_by_row_group_with_mixtures_cut_across_groups(
    mixer, smoke_library, smoke_recipes, tmp_path
):
    library, _ = smoke_library
    recipes, _ = smoke_recipes
    chopped = tmp_path / "recipes"
    chopped.mkdir()
    shutil.copy(recipes / "summary.json", chopped / "summary.json")
    table = pq.read_table(recipes / "val.parquet")
    pq.write_table(table, chopped / "val.parquet", row_group_size=7)  # mixtures straddle row groups
    assert pq.ParquetFile(chopped / "val.parquet").num_row_groups > 2
    write_shards(smoke_params(), library, chopped, out_dir=tmp_path / "shards", splits=["val"])
    plan = mixer.plan(read_recipes(recipes / "val.parquet"))
    stored = list(iter_shards(shard_paths(tmp_path / "shards", "val")))
    assert [m.mixture_id for m in stored] == plan.mixture_ids.tolist()
    for i, got in enumerate(stored):
        expected = mixer.mix(plan, i)
        assert np.array_equal(got.audio, expected.audio)
        assert np.array_equal(got.labels.frames, expected.labels.frames)
