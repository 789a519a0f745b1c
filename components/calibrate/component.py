"""Stage `calibrate`: decision thresholds and calibration of FLAM on the val splits."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components.image import FLAM_IMAGE


@dsl.component(base_image=FLAM_IMAGE, install_kfp_package=False)
def calibrate_model(
    params: Input[Artifact],
    model: Input[Model],
    library: Input[Dataset],
    recipes: Input[Dataset],
    features: Input[Dataset],
    real_set: Input[Dataset],
    calibrated: Output[Model],
    calibration_report: Output[Dataset],
    metrics: Output[Metrics],
):
    """`flam_core.calibrate.calibrate(params, model_dir, features, library, recipes, report_dir,
    real_dir)`; `real_set` is the real-recording validation set (an empty folder: none).

    Input artifacts are read-only: the model folder is copied to `calibrated`, which receives
    `calibration.json` and `cohort.npz` next to the weights.
    """
    import shutil
    from pathlib import Path

    from flam_core.calibrate import calibrate
    from flam_core.config import Params

    resolved = Params.model_validate_json(Path(params.path).read_text())
    shutil.copytree(model.path, calibrated.path, ignore=shutil.ignore_patterns("checkpoints"))
    result = calibrate(
        resolved,
        model_dir=Path(calibrated.path),
        features_dir=Path(features.path),
        library_dir=Path(library.path),
        recipes_dir=Path(recipes.path),
        report_dir=Path(calibration_report.path),
        real_dir=Path(real_set.path) if (Path(real_set.path) / "summary.json").is_file() else None,
    )
    logged = {
        "threshold": result.threshold,
        "threshold_segment_f1_macro": result.threshold_segment_f1_macro,
        "threshold_unseen": result.threshold_unseen,
        "threshold_event_f1_macro": result.threshold_event_f1_macro,
        "threshold_seen": result.threshold_seen,
        "beta_prior_spearman": result.beta_prior_spearman,
    }
    if result.score_norm is not None:
        logged |= {f"score_norm.{key}": result.score_norm[key] for key in ("scale", "shift")}
    for key, value in logged.items():
        if value is not None:
            metrics.log_metric(key, float(value))
    for system, figures in (result.val_real or {}).items():
        if system != "set":
            for key in ("frame_auroc_macro", "frame_auroc_pooled", "event_found"):
                if figures["recordings"][key] is not None:
                    metrics.log_metric(f"val_real.{system}.{key}", float(figures["recordings"][key]))
    for kind, value in result.ece_balanced.items():
        metrics.log_metric(f"ece_balanced.{kind}", float(value))
    calibrated.metadata.update(dict(model.metadata) | {"threshold": result.threshold})
