"""MLflow registration and the champion gate on a real SQLite store; the registered pyfunc predicts."""

from __future__ import annotations

import base64
import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from flam_core.errors import ConfigError
from flam_core.registry import gate_version, register
from tests.conftest import smoke_params

GATE = ("test_unseen.frame_auroc_macro", "test_unseen.psds1")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlruns.db'}")
        patch.chdir(folder)  # the default artifact root (./mlruns) lands here
        yield folder


def evaluation(folder, name, auroc, psds1, test_set="a1b2-c3d4"):
    """An evaluation metrics.json as `flam evaluate` writes it, with chosen gate values."""
    path = folder / name / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    gate = {GATE[0]: auroc, GATE[1]: psds1, "test_seen.frame_auroc_macro": 0.7, "retrieval.t2a_R@5": 0.3}
    path.write_text(json.dumps({"gate": gate, "test_set_hash": test_set, "models": {}}))
    return path


def test_gate_promotes_better_and_refuses_worse_challengers(store, smoke_models, smoke_recipes):
    import mlflow
    from mlflow import MlflowClient

    recipes, _ = smoke_recipes
    params = smoke_params()
    model = smoke_models / "flam"

    def run(name, auroc, psds1, **kwargs):
        return register(
            params,
            model_dir=model,
            eval_metrics=evaluation(store, name, auroc, psds1, **kwargs),
            recipes_dir=recipes,
            out_dir=store / name,
        )

    first = run("v1", 0.70, 0.10)
    assert first.promoted and first.reason == "no champion yet"
    worse = run("v2", 0.69, 0.20)  # better PSDS1 but worse AUROC: refused
    assert not worse.promoted and "test_unseen.frame_auroc_macro" in worse.reason
    other_set = run("v3", 0.95, 0.50, test_set="ffff-eeee")
    assert not other_set.promoted and "another test set" in other_set.reason
    better = run("v4", 0.75, 0.12)
    assert better.promoted and better.compared_to == 1

    client = MlflowClient(mlflow.get_tracking_uri())
    name = params.registry.model_name
    assert int(client.get_model_version_by_alias(name, "champion").version) == better.version
    assert int(client.get_model_version_by_alias(name, "challenger").version) == better.version
    refused = client.get_model_version(name, str(worse.version))
    assert refused.tags["gate.decision"] == "refused" and refused.tags["gate.compared_to"] == "1"
    assert refused.tags[f"metric.{GATE[0]}"] == "0.69"
    assert refused.tags["test_set_hash"] == "a1b2-c3d4" and refused.tags["data.recipes_hash"]
    decision = json.loads((store / "v2" / "decision.json").read_text())
    assert decision["promoted"] is False and decision["version"] == worse.version

    # A person may force it; the tag says so.
    forced = gate_version(params, worse.version, force=True)
    assert (
        forced.promoted and client.get_model_version(name, str(worse.version)).tags["gate.forced"] == "True"
    )
    with pytest.raises(ConfigError, match="no version 99"):
        gate_version(params, 99)


def test_champion_loads_and_predicts(store, smoke_models, smoke_recipes, mixer, tmp_path, monkeypatch):
    import mlflow
    import yaml

    recipes, _ = smoke_recipes
    params = smoke_params()
    if not list(store.glob("v*")):
        register(
            params,
            model_dir=smoke_models / "flam",
            eval_metrics=evaluation(store, "v1", 0.7, 0.1),
            recipes_dir=recipes,
            out_dir=store / "v1",
        )
    from flam_core.data.recipes import read_recipes

    plan = mixer.plan(read_recipes(recipes / "test_seen.parquet"))
    audio = mixer.render(plan, 1)
    path = tmp_path / "mixture.wav"
    sf.write(path, audio, 16000)
    encoded = base64.b64encode(path.read_bytes()).decode()

    # Logged from code: MLflow stores flam_core/serving.py and no pickled Python object.
    local = Path(mlflow.artifacts.download_artifacts("models:/flam-sed@champion"))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    flavor = mlmodel["flavors"]["python_function"]
    assert Path(flavor["model_code_path"]).name == "serving.py" and "python_model" not in flavor
    assert not list(local.rglob("*.pkl")) and (local / "code" / "flam_core" / "pyfunc.py").is_file()
    columns = [c["name"] for c in json.loads(mlmodel["signature"]["inputs"])]
    assert columns == ["path", "audio_base64", "prompts", "threshold", "max_duration_s"]

    monkeypatch.setenv("FLAM_SERVE_AUDIO_ROOT", str(tmp_path))  # path serving reads under this folder
    pyfunc = mlflow.pyfunc.load_model("models:/flam-sed@champion")
    prompts = ["dog barking", "speech"]
    out = pyfunc.predict(
        pd.DataFrame(
            [
                {"path": str(path), "audio_base64": "", "prompts": prompts},
                {"path": "", "audio_base64": encoded, "prompts": prompts},
            ]
        )
    )
    assert len(out) == 2
    assert out[0]["prompts"] == prompts and np.asarray(out[0]["probs"]).shape == (2, 32)
    np.testing.assert_allclose(out[0]["probs"], out[1]["probs"], atol=1e-4)  # path == uploaded bytes
    with pytest.raises(Exception, match="row 0: give path"):
        pyfunc.predict(pd.DataFrame([{"path": "", "audio_base64": "", "prompts": prompts}]))

    from flam_core.inference import FlamDetector

    detector = FlamDetector.from_uri("models:/flam-sed@champion")
    assert detector.source == "models:/flam-sed@champion"
    np.testing.assert_allclose(detector.detect(path, prompts).probs, out[0]["probs"], atol=1e-4)


def test_register_needs_evaluation_and_gate_metrics(store, smoke_models, smoke_recipes, tmp_path):
    recipes, _ = smoke_recipes
    params = smoke_params()
    with pytest.raises(Exception, match="no evaluation metrics"):
        register(
            params, model_dir=smoke_models / "flam", eval_metrics=tmp_path / "none.json", recipes_dir=recipes
        )
    path = evaluation(tmp_path, "partial", 0.7, 0.1)
    payload = json.loads(path.read_text())
    broken = copy.deepcopy(payload)
    del broken["gate"][GATE[1]]
    path.write_text(json.dumps(broken))
    with pytest.raises(ConfigError, match=r"test_unseen\.psds1"):
        register(params, model_dir=smoke_models / "flam", eval_metrics=path, recipes_dir=recipes)
    empty = tmp_path / "empty-model"
    shutil.copytree(smoke_models / "flam", empty)
    (empty / "model.pt").unlink()
    with pytest.raises(Exception, match="no trained model"):
        register(params, model_dir=empty, eval_metrics=path, recipes_dir=recipes)
