import json

import numpy as np
import pytest
import soundfile as sf
from kfp.dsl import HTML, Artifact, Dataset, Metrics, Model

from components.monitor.component import monitor_drift
from flam_core.monitor import REPORT_HTML, REPORT_JSON, DriftExceeded
from tests.conftest import smoke_params


def monitor_task(tmp_path, smoke_models, smoke_library, smoke_recipes, *overrides: str) -> tuple[dict, dict]:
    """The task's inputs and outputs: 10 training mixtures as the reference, two prompts."""
    params = smoke_params(
        "monitor.reference_mixtures=10", "monitor.prompts=[dog barking, speech]", *overrides
    )
    (tmp_path / "params.json").write_text(params.model_dump_json())
    inputs = {
        "params": Artifact(uri=str(tmp_path / "params.json")),
        "model": Model(uri=str(smoke_models / "flam")),
        "library": Dataset(uri=str(smoke_library[0])),
        "recipes": Dataset(uri=str(smoke_recipes[0])),
    }
    outputs = {
        "drift": Dataset(uri=str(tmp_path / "drift")),
        "drift_html": HTML(uri=str(tmp_path / "drift.html")),
        "metrics": Metrics(uri=str(tmp_path / "metrics")),
    }
    return inputs, outputs


def check_outputs(tmp_path, outputs: dict) -> dict:
    """The report's summary, after checking that the HTML and the metrics are its own."""
    summary = json.loads((tmp_path / "drift" / REPORT_JSON).read_text())["summary"]
    assert (tmp_path / "drift.html").read_bytes() == (tmp_path / "drift" / REPORT_HTML).read_bytes()
    assert outputs["metrics"].metadata == {
        "drift_share": summary["drift_share"],
        "n_drifted_columns": float(len(summary["drifted_columns"])),
        "passed": 1.0 if summary["passed"] else 0.0,
    }
    return summary


@pytest.mark.slow
def test_the_test_mixtures_stand_in_for_current_audio(smoke_models, smoke_library, smoke_recipes, tmp_path):
    inputs, outputs = monitor_task(
        tmp_path, smoke_models, smoke_library, smoke_recipes, "monitor.max_drift_share=1.0"
    )
    monitor_drift.python_func(**inputs, **outputs)
    summary = check_outputs(tmp_path, outputs)
    assert summary["passed"] and summary["n_columns"] > 2  # audio statistics and both prompts' scores


@pytest.mark.slow
def test_drifted_audio_fails_the_task_after_writing_the_report(
    smoke_models, smoke_library, smoke_recipes, tmp_path
):
    current = tmp_path / "current"  # loud white noise: nothing like the training mixtures
    current.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        sf.write(current / f"noise-{i}.wav", rng.uniform(-0.9, 0.9, 3 * 16000).astype(np.float32), 16000)
    inputs, outputs = monitor_task(
        tmp_path,
        smoke_models,
        smoke_library,
        smoke_recipes,
        f"monitor.current_dir={current}",
        "monitor.max_drift_share=0.2",
        "monitor.fail_on_drift=true",
    )
    with pytest.raises(DriftExceeded, match="data drift"):
        monitor_drift.python_func(**inputs, **outputs)
    summary = check_outputs(tmp_path, outputs)
    assert not summary["passed"] and summary["drift_share"] > 0.2
