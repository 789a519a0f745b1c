"""Stage `features`: the frozen audio encoder's frame features of every mixture."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from components.image import FLAM_IMAGE


@dsl.component(base_image=FLAM_IMAGE, install_kfp_package=False)
def build_features(
    params: Input[Artifact], library: Input[Dataset], recipes: Input[Dataset], features: Output[Dataset]
):
    """`flam_core.features.build_feature_cache(params, library, recipes, out_dir)`."""
    from pathlib import Path

    from flam_core.config import Params
    from flam_core.features import build_feature_cache

    resolved = Params.model_validate_json(Path(params.path).read_text())
    summary = build_feature_cache(resolved, Path(library.path), Path(recipes.path), Path(features.path))
    features.metadata.update({"encoder": summary.encoder, "dim": summary.dim, "shapes": summary.shapes})
