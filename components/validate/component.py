"""Stage `validate`: the data gate. The pipeline branches on its result with `dsl.If`."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Output

from components.image import FLAM_IMAGE


@dsl.component(base_image=FLAM_IMAGE, install_kfp_package=False)
def validate_data(
    params: Input[Artifact],
    library: Input[Dataset],
    recipes: Input[Dataset],
    shards: Input[Dataset],
    report: Output[Dataset],
    report_html: Output[HTML],
    metrics: Output[Metrics],
) -> str:
    """`flam_core.data.validate.validate_all(..., raise_on_failure=False)`; returns "passed" or "failed".

    Shards are checked when `shards.enabled` or `validation.check_shards`, as in `flam validate`.
    """
    import shutil
    from pathlib import Path

    from flam_core.config import Params
    from flam_core.data.validate import validate_all

    resolved = Params.model_validate_json(Path(params.path).read_text())
    check_shards = resolved.shards.enabled or resolved.validation.check_shards
    result = validate_all(
        resolved,
        Path(library.path),
        Path(recipes.path),
        Path(report.path),
        shards_dir=Path(shards.path) if check_shards else None,
        raise_on_failure=False,
    )
    shutil.copyfile(Path(report.path) / "validation.html", report_html.path)
    metrics.log_metric("n_checks", len(result.checks))
    metrics.log_metric("n_failed", len(result.failures))
    print(result.summary_text())
    return "passed" if result.success else "failed"


@dsl.component(base_image=FLAM_IMAGE, install_kfp_package=False)
def fail_on_invalid_data(report: Input[Dataset]):
    """The `dsl.Else` branch of the gate: raise `ValidationFailed` with the report's failed checks."""
    import json
    from pathlib import Path

    from flam_core.data.validate import CheckResult, ValidationFailed, ValidationReport

    payload = json.loads((Path(report.path) / "validation.json").read_text())
    checks = [CheckResult(**check) for check in payload["checks"]]
    raise ValidationFailed(ValidationReport(payload["success"], checks, payload.get("inputs", {})))
