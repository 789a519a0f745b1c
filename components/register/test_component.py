import json

import pytest
from kfp.dsl import Artifact, Dataset, Metrics, Model

from components.register.component import register_model
from flam_core.errors import ConfigError
from tests.conftest import smoke_params


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A real MLflow store: SQLite in tmp_path (artifacts beside it), as `$MLFLOW_TRACKING_URI`."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri


def run_register(tmp_path, smoke_models, smoke_recipes, gate: dict[str, float]):
    (tmp_path / "params.json").write_text(smoke_params().model_dump_json())
    evaluation = tmp_path / "evaluation"
    evaluation.mkdir()
    (evaluation / "metrics.json").write_text(
        json.dumps({"gate": gate, "test_set_hash": "a1b2-c3d4", "models": {}})
    )
    outputs = {
        "decision": Artifact(uri=str(tmp_path / "decision")),
        "metrics": Metrics(uri=str(tmp_path / "m")),
    }
    uri = register_model.python_func(
        params=Artifact(uri=str(tmp_path / "params.json")),
        model=Model(uri=str(smoke_models / "flam")),
        evaluation=Dataset(uri=str(evaluation)),
        recipes=Dataset(uri=str(smoke_recipes[0])),
        **outputs,
    )
    return uri, outputs


@pytest.mark.slow
def test_registers_the_first_model_as_champion(store, smoke_models, smoke_recipes, tmp_path):
    from mlflow import MlflowClient

    gate = {metric: 0.5 for metric in smoke_params().registry.gate_metrics}
    uri, outputs = run_register(tmp_path, smoke_models, smoke_recipes, gate)
    name = smoke_params().registry.model_name
    assert uri == f"models:/{name}/1"
    assert outputs["metrics"].metadata == {"version": 1.0, "promoted": 1.0}
    assert outputs["decision"].metadata == {
        "model": name,
        "version": 1,
        "promoted": True,
        "reason": "no champion yet",
    }
    decision = json.loads((tmp_path / "decision" / "decision.json").read_text())
    assert decision["promoted"] is True and decision["tags"]["test_set_hash"] == "a1b2-c3d4"
    client = MlflowClient(store)
    assert int(client.get_model_version_by_alias(name, "champion").version) == 1
    assert client.get_model_version(name, "1").tags["gate.decision"] == "promoted"


def test_evaluation_metrics_without_the_gate_metrics_are_refused(
    store, smoke_models, smoke_recipes, tmp_path
):
    with pytest.raises(ConfigError, match=r"registry\.gate_metrics"):
        run_register(tmp_path, smoke_models, smoke_recipes, {"retrieval.t2a_R@5": 0.3})
    assert not (tmp_path / "decision").exists() and not (tmp_path / "mlruns.db").exists()
