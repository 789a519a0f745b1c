import json

import pytest
from kfp.dsl import Artifact, Dataset, Markdown, Metrics, Model

from components.evaluate.component import evaluate_models
from flam_core.errors import DataError
from tests.conftest import smoke_params


@pytest.fixture
def run_evaluate(tmp_path, smoke_models, smoke_features, smoke_library, smoke_recipes, real_set):
    """Runs the component on the smoke artifacts with `baselines`; returns its outputs."""

    def run(baselines: list[str], val_real_dir=None):
        if val_real_dir is None:  # no validation sources: the pipeline passes an empty folder
            val_real_dir = tmp_path / "val_real"
            val_real_dir.mkdir()
        (tmp_path / "params.json").write_text(
            smoke_params("evaluation.baselines=[flam, global]").model_dump_json()
        )
        outputs = {
            "evaluation": Dataset(uri=str(tmp_path / "evaluation")),
            "results": Markdown(uri=str(tmp_path / "results.md")),
            "metrics": Metrics(uri=str(tmp_path / "metrics")),
        }
        evaluate_models.python_func(
            params=Artifact(uri=str(tmp_path / "params.json")),
            flam_model=Model(uri=str(smoke_models / "flam")),
            baseline_models=[Model(uri=str(smoke_models / mode)) for mode in baselines],
            library=Dataset(uri=str(smoke_library[0])),
            recipes=Dataset(uri=str(smoke_recipes[0])),
            features=Dataset(uri=str(smoke_features)),
            real_set=Dataset(uri=str(real_set[0])),
            val_real_set=Dataset(uri=str(val_real_dir)),
            **outputs,
        )
        return outputs

    return run


@pytest.mark.slow
def test_evaluates_flam_against_its_baseline(run_evaluate, smoke_models, val_real_set, tmp_path):
    from flam_core.evaluation.real import real_threshold
    from flam_core.inference import FlamDetector

    outputs = run_evaluate(["global"], val_real_dir=val_real_set[0])
    saved = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert set(saved["models"]) == {"flam", "global", "audioset"}  # each artifact under its config's mode
    assert set(saved["test_real"]) == {"set", "flam", "global", "audioset"}  # the real-recording test
    # the uncalibrated baseline decides at its threshold chosen on the real validation set
    baseline = FlamDetector.from_dir(smoke_models / "global")
    assert (
        saved["test_real"]["global"]["recordings"]["threshold"]
        == real_threshold(baseline, val_real_set[0])[0]
    )
    assert (tmp_path / "results.md").read_text() == (tmp_path / "evaluation" / "results.md").read_text()
    logged = outputs["metrics"].metadata
    assert saved["gate"] and all(logged[key] == value for key, value in saved["gate"].items())
    assert saved["claims"] and all(logged[f"claims.{key}"] == value for key, value in saved["claims"].items())
    assert len(logged) == len(saved["gate"]) + len(saved["claims"])
    assert outputs["evaluation"].metadata == {"test_set_hash": saved["test_set_hash"]}


def test_a_missing_baseline_fails_the_task(run_evaluate, tmp_path):
    with pytest.raises(DataError, match=r"no trained model for \['global'\]"):
        run_evaluate([])
    assert not (tmp_path / "evaluation").exists() and not (tmp_path / "results.md").exists()
