"""Sharded recipe sampling (the KFP fan-out): merged shards equal `build_recipes`' output."""

import json
import shutil

import pytest

from flam_core.data.recipes import (
    RECIPE_SPLITS,
    build_recipe_shard,
    build_recipes,
    merge_recipe_shards,
    plan_recipe_shards,
    recipe_units,
)
from flam_core.errors import ConfigError, DataError
from tests.conftest import smoke_params

# smoke counts (64/16/16/16) in chunks of 16: 4 train chunks + 1 per other split = 7 units
CHUNKED = ("synth.chunk_mixtures=16",)


def test_plan_deals_every_unit_once_without_empty_shards():
    params = smoke_params(*CHUNKED)
    units = recipe_units(params)
    assert units == [("train", i) for i in range(4)] + [
        ("val", 0),
        ("val_unseen", 0),
        ("test_seen", 0),
        ("test_unseen", 0),
    ]
    for n_shards in (1, 3, 7, 50):
        plan = plan_recipe_shards(params, n_shards)
        assert len(plan) == min(n_shards, len(units))
        assert all(plan) and sorted(u for shard in plan for u in shard) == sorted(units)
    with pytest.raises(ConfigError, match="n_shards must be at least 1"):
        plan_recipe_shards(params, 0)


@pytest.mark.parametrize("n_shards", [3, 7])
def test_merged_shards_equal_build_recipes(smoke_library, tmp_path, n_shards):
    library, _ = smoke_library
    params = smoke_params(*CHUNKED)
    reference = build_recipes(params, library_dir=library, out_dir=tmp_path / "reference")
    shard_dirs = [tmp_path / f"s{shard}" for shard in range(len(plan_recipe_shards(params, n_shards)))]
    for shard, folder in enumerate(shard_dirs):
        info = build_recipe_shard(params, shard, n_shards, library_dir=library, out_dir=folder)
        assert info.shard == shard and info.units
        assert json.loads((folder / "shard.json").read_text()) == info.to_json()
    merged = merge_recipe_shards(params, shard_dirs[::-1], library_dir=library, out_dir=tmp_path / "merged")
    assert merged == reference
    for name in [f"{split}.parquet" for split in RECIPE_SPLITS] + ["summary.json"]:
        assert (tmp_path / "merged" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()


def test_merge_rejects_missing_duplicate_and_foreign_shards(smoke_library, tmp_path):
    library, _ = smoke_library
    params = smoke_params(*CHUNKED)
    dirs = [tmp_path / f"s{i}" for i in range(2)]
    for shard, folder in enumerate(dirs):
        build_recipe_shard(params, shard, 2, library_dir=library, out_dir=folder)
    with pytest.raises(DataError, match="missing"):
        merge_recipe_shards(params, dirs[:1], library_dir=library, out_dir=tmp_path / "out")
    with pytest.raises(DataError, match="is in two shards"):
        merge_recipe_shards(params, [*dirs, dirs[0]], library_dir=library, out_dir=tmp_path / "out")
    with pytest.raises(DataError, match="other synth parameters"):
        merge_recipe_shards(
            smoke_params(*CHUNKED, "synth.seed=2"), dirs, library_dir=library, out_dir=tmp_path / "out"
        )
    broken = tmp_path / "broken"
    shutil.copytree(dirs[1], broken)
    info = json.loads((broken / "shard.json").read_text())
    split, index = info["units"][0]
    (broken / f"{split}-{index:06d}.arrow").unlink()
    with pytest.raises(DataError, match="recipe shard file not found"):
        merge_recipe_shards(params, [dirs[0], broken], library_dir=library, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="does not exist"):
        build_recipe_shard(params, 2, 2, library_dir=library, out_dir=tmp_path / "s2")
