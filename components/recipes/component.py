"""Stage `recipes`, fanned out: plan the shards, sample each shard, merge them.

The merged folder is byte-identical to `flam_core.data.recipes.build_recipes`' output for the
same parameters and library (the shards are chunks of `synth.chunk_mixtures` mixtures, each
sampled with the seed `build_recipes` gives it).
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Output

from components.image import FLAM_IMAGE


@dsl.component(base_image=FLAM_IMAGE, install_kfp_package=False)
def plan_recipe_shards(params: Input[Artifact], n_shards: int) -> list[int]:
    """The shard indices of `flam_core.data.recipes.plan_recipe_shards(params, n_shards)`."""
    from pathlib import Path

    from flam_core.config import Params
    from flam_core.data.recipes import plan_recipe_shards

    resolved = Params.model_validate_json(Path(params.path).read_text())
    return list(range(len(plan_recipe_shards(resolved, int(n_shards)))))


@dsl.component(base_image=FLAM_IMAGE, install_kfp_package=False)
def sample_recipe_shard(
    params: Input[Artifact], library: Input[Dataset], shard: int, n_shards: int, recipe_shard: Output[Dataset]
):
    """`flam_core.data.recipes.build_recipe_shard(params, shard, n_shards, library, out_dir)`."""
    from pathlib import Path

    from flam_core.config import Params
    from flam_core.data.recipes import build_recipe_shard

    resolved = Params.model_validate_json(Path(params.path).read_text())
    info = build_recipe_shard(
        resolved, int(shard), int(n_shards), library_dir=Path(library.path), out_dir=Path(recipe_shard.path)
    )
    recipe_shard.metadata["units"] = [f"{split}/{index}" for split, index in info.units]


@dsl.component(base_image=FLAM_IMAGE, install_kfp_package=False)
def merge_recipe_shards(
    params: Input[Artifact],
    library: Input[Dataset],
    shards: Input[list[Dataset]],
    recipes: Output[Dataset],
    metrics: Output[Metrics],
):
    """`flam_core.data.recipes.merge_recipe_shards(params, shard_dirs, library, out_dir)`."""
    from pathlib import Path

    from flam_core.config import Params
    from flam_core.data.recipes import merge_recipe_shards

    resolved = Params.model_validate_json(Path(params.path).read_text())
    summary = merge_recipe_shards(
        resolved, [Path(s.path) for s in shards], library_dir=Path(library.path), out_dir=Path(recipes.path)
    )
    for split, info in summary.splits.items():
        metrics.log_metric(f"{split}.n_mixtures", info["n_mixtures"])
        metrics.log_metric(f"{split}.n_event_pieces", info["n_event_pieces"])
    recipes.metadata["params_hash"] = summary.params_hash
