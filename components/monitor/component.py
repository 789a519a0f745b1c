"""Stage `monitor`: evidently drift report of current audio against the training mixtures."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components.image import FLAM_IMAGE


@dsl.component(base_image=FLAM_IMAGE, install_kfp_package=False)
def monitor_drift(
    params: Input[Artifact],
    model: Input[Model],
    library: Input[Dataset],
    recipes: Input[Dataset],
    drift: Output[Dataset],
    drift_html: Output[HTML],
    metrics: Output[Metrics],
):
    """`flam_core.monitor.run_monitor(params, model_dir, current_dir, library, recipes, out_dir)`.

    The current data is `monitor.current_dir` (a folder the pod can read) or, when null, the
    test_seen mixtures. With `monitor.fail_on_drift` the task fails past `max_drift_share`.
    """
    import shutil
    from pathlib import Path

    from flam_core.config import Params
    from flam_core.monitor import check, run_monitor

    resolved = Params.model_validate_json(Path(params.path).read_text())
    result = run_monitor(
        resolved,
        model_dir=Path(model.path),
        current_dir=None,
        library_dir=Path(library.path),
        recipes_dir=Path(recipes.path),
        out_dir=Path(drift.path),
    )
    shutil.copyfile(result.html_path, drift_html.path)
    metrics.log_metric("drift_share", float(result.drift_share))
    metrics.log_metric("n_drifted_columns", float(len(result.drifted_columns)))
    metrics.log_metric("passed", 1.0 if result.passed else 0.0)
    check(result, resolved.monitor.fail_on_drift)
