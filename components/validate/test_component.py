import json
import shutil

import pytest
from kfp.dsl import HTML, Artifact, Dataset, Metrics

from components.validate.component import fail_on_invalid_data, validate_data
from flam_core.data.validate import ValidationFailed
from tests.conftest import smoke_params


def test_gate_passes_on_good_data_and_the_else_branch_raises_with_the_failures(
    smoke_library, smoke_recipes, tmp_path
):
    (tmp_path / "params.json").write_text(smoke_params().model_dump_json())
    report, html = Dataset(uri=str(tmp_path / "report")), HTML(uri=str(tmp_path / "report.html"))
    metrics = Metrics(uri=str(tmp_path / "metrics"))
    result = validate_data.python_func(
        params=Artifact(uri=str(tmp_path / "params.json")),
        library=Dataset(uri=str(smoke_library[0])),
        recipes=Dataset(uri=str(smoke_recipes[0])),
        shards=Dataset(uri=str(tmp_path / "no-shards")),
        report=report,
        report_html=html,
        metrics=metrics,
    )
    assert result == "passed"
    assert metrics.metadata["n_failed"] == 0 and metrics.metadata["n_checks"] > 10
    assert "Data validation passed" in (tmp_path / "report.html").read_text()

    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "report", broken)
    payload = json.loads((broken / "validation.json").read_text())
    payload["success"] = False
    payload["checks"][0] |= {"success": False, "message": "3 clips leak", "count": 3, "examples": ["c1"]}
    (broken / "validation.json").write_text(json.dumps(payload))
    with pytest.raises(ValidationFailed, match=r"1 of \d+ checks failed") as failed:
        fail_on_invalid_data.python_func(report=Dataset(uri=str(broken)))
    assert "3 clips leak" in str(failed.value)
