"""Stage `register`: MLflow model version, alias `challenger`, and the champion gate."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components.image import FLAM_IMAGE


@dsl.component(base_image=FLAM_IMAGE, install_kfp_package=False)
def register_model(
    params: Input[Artifact],
    model: Input[Model],
    evaluation: Input[Dataset],
    recipes: Input[Dataset],
    decision: Output[Artifact],
    metrics: Output[Metrics],
) -> str:
    """`flam_core.registry.register(params, model_dir, eval_metrics, recipes_dir, out_dir)`.

    The MLflow store is `$MLFLOW_TRACKING_URI` (the `flam-mlflow` Secret in the cluster).
    Returns `models:/<name>/<version>`.
    """
    from pathlib import Path

    from flam_core.config import Params
    from flam_core.registry import register

    resolved = Params.model_validate_json(Path(params.path).read_text())
    result = register(
        resolved,
        model_dir=Path(model.path),
        eval_metrics=Path(evaluation.path) / "metrics.json",
        recipes_dir=Path(recipes.path),
        out_dir=Path(decision.path),
    )
    metrics.log_metric("version", float(result.version))
    metrics.log_metric("promoted", 1.0 if result.promoted else 0.0)
    for key in ("model", "version", "promoted", "reason"):
        decision.metadata[key] = getattr(result, key)
    verdict = "promoted to champion" if result.promoted else "stays challenger"
    print(f"{result.model} v{result.version} {verdict}: {result.reason}")
    return f"models:/{result.model}/{result.version}"
