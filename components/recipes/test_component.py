from kfp.dsl import Artifact, Dataset, Metrics

from components.recipes.component import merge_recipe_shards, plan_recipe_shards, sample_recipe_shard
from flam_core.data.recipes import RECIPE_SPLITS, build_recipes
from tests.conftest import smoke_params


def test_plan_sample_merge_equals_build_recipes(smoke_library, tmp_path):
    library_dir, _ = smoke_library
    params = smoke_params("synth.chunk_mixtures=16")
    (tmp_path / "params.json").write_text(params.model_dump_json())
    p, library = Artifact(uri=str(tmp_path / "params.json")), Dataset(uri=str(library_dir))
    shards = plan_recipe_shards.python_func(params=p, n_shards=3)
    assert shards == [0, 1, 2]
    parts = [Dataset(uri=str(tmp_path / f"shard-{i}")) for i in shards]
    for shard, part in zip(shards, parts, strict=True):
        # Loop items may come back as floats (kfp.local); the component casts them.
        sample_recipe_shard.python_func(
            params=p, library=library, shard=float(shard), n_shards=3, recipe_shard=part
        )
        assert part.metadata["units"]
    merged, metrics = Dataset(uri=str(tmp_path / "recipes")), Metrics(uri=str(tmp_path / "metrics"))
    merge_recipe_shards.python_func(params=p, library=library, shards=parts, recipes=merged, metrics=metrics)
    reference = build_recipes(params, library_dir=library_dir, out_dir=tmp_path / "reference")
    for name in [f"{split}.parquet" for split in RECIPE_SPLITS] + ["summary.json"]:
        assert (tmp_path / "recipes" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()
    assert metrics.metadata["train.n_mixtures"] == reference.splits["train"]["n_mixtures"]
    assert merged.metadata["params_hash"] == reference.params_hash
