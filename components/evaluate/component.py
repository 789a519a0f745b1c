"""Stage `evaluate`: FLAM against its baselines on the test splits."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components.image import FLAM_IMAGE


@dsl.component(base_image=FLAM_IMAGE, install_kfp_package=False)
def evaluate_models(
    params: Input[Artifact],
    flam_model: Input[Model],
    baseline_models: Input[list[Model]],
    library: Input[Dataset],
    recipes: Input[Dataset],
    features: Input[Dataset],
    real_set: Input[Dataset],
    val_real_set: Input[Dataset],
    evaluation: Output[Dataset],
    results: Output[Markdown],
    metrics: Output[Metrics],
):
    """`flam_core.evaluation.report.evaluate(params, models_dir, features, library, recipes, out_dir,
    real_dir, val_real_dir)`; `val_real_set` is an empty folder when no validation sources are set.

    The model artifacts are linked into `<tmp>/<mode>/` (the mode from each model's config.json),
    the layout `evaluate` reads. `metrics` carries the flat gate metrics and the claims.
    """
    import json
    import shutil
    import tempfile
    from pathlib import Path

    from flam_core.config import Params
    from flam_core.evaluation.report import evaluate

    resolved = Params.model_validate_json(Path(params.path).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        for artifact in [flam_model, *baseline_models]:
            config = json.loads((Path(artifact.path) / "config.json").read_text())
            (Path(tmp) / config["params"]["train"]["mode"]).symlink_to(Path(artifact.path).resolve())
        result = evaluate(
            resolved,
            models_dir=Path(tmp),
            features_dir=Path(features.path),
            library_dir=Path(library.path),
            recipes_dir=Path(recipes.path),
            out_dir=Path(evaluation.path),
            real_dir=Path(real_set.path),
            val_real_dir=Path(val_real_set.path),
        )
    shutil.copyfile(Path(evaluation.path) / "results.md", results.path)
    for key, value in result.gate.items():
        metrics.log_metric(key, float(value))
    for key, value in result.claims.items():
        metrics.log_metric(f"claims.{key}", float(value))
    evaluation.metadata["test_set_hash"] = result.test_set_hash
