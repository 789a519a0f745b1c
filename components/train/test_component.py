import json

import pytest
from kfp.dsl import Artifact, Dataset, Metrics, Model

from components.train.component import plan_baselines, train_model
from flam_core.errors import ConfigError
from tests.conftest import ROOT, smoke_params


def write_params(tmp_path, *overrides: str) -> Artifact:
    (tmp_path / "params.json").write_text(smoke_params(*overrides).model_dump_json())
    return Artifact(uri=str(tmp_path / "params.json"))


def run_train(tmp_path, params: Artifact, features, mode: str, gpus: int, **outputs) -> None:
    """The train component's function on cached features (library and recipes unused)."""
    train_model.python_func(
        params=params,
        library=Dataset(uri=str(tmp_path / "unused-library")),
        recipes=Dataset(uri=str(tmp_path / "unused-recipes")),
        features=Dataset(uri=str(features)),
        mode=mode,
        gpus=gpus,
        **outputs,
    )


def test_plan_baselines_leaves_flam_out(tmp_path):
    params = write_params(tmp_path, "evaluation.baselines=[flam, global, no_text_bias]")
    assert plan_baselines.python_func(params=params) == ["global", "no_text_bias"]
    with pytest.raises(ConfigError, match="at least one baseline"):
        plan_baselines.python_func(params=write_params(tmp_path, "evaluation.baselines=[flam]"))


@pytest.mark.slow
def test_more_than_one_gpu_trains_through_torchrun_and_deepspeed(smoke_features, tmp_path, monkeypatch):
    """Two visible "GPUs" (patched count, CPU processes with gloo): the torchrun path with the
    resolved parameters gives the same outputs as the in-process path."""
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    params = write_params(
        tmp_path,
        f"train.deepspeed_config={ROOT / 'infra/deepspeed/zero2.json'}",
        "train.steps=4",
        "train.warmup_steps=1",
        "train.log_every=2",
        "loader.batch_size=4",
    )
    model, report = Model(uri=str(tmp_path / "model")), Dataset(uri=str(tmp_path / "report"))
    metrics = Metrics(uri=str(tmp_path / "metrics"))
    run_train(
        tmp_path, params, smoke_features, "global", 2, model=model, train_report=report, metrics=metrics
    )
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["params"]["train"]["mode"] == "global"
    assert config["params"]["train"]["backend"] == "deepspeed"
    assert config["params"]["profile"] == "smoke" and config["params"]["train"]["steps"] == 4
    assert config["params"]["train"]["features_dir"] == str(smoke_features)
    assert (tmp_path / "model" / "model.pt").is_file() and (tmp_path / "report" / "loss.csv").is_file()
    assert metrics.metadata["steps"] == 4.0 and model.metadata["processes"] == 2


@pytest.mark.slow
def test_a_retried_task_continues_its_own_run(smoke_features, tmp_path, monkeypatch):
    """One process in-process; a second attempt over the first's outputs (a retried pod on mounted
    storage) resumes from its last checkpoint instead of refusing the folder or training again."""
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    params = write_params(tmp_path, "train.steps=4", "train.warmup_steps=1", "train.checkpoint_every=2")
    outputs = {
        "model": Model(uri=str(tmp_path / "model")),
        "train_report": Dataset(uri=str(tmp_path / "report")),
    }
    results = []
    for attempt in range(2):
        metrics = Metrics(uri=str(tmp_path / f"metrics-{attempt}"))
        run_train(tmp_path, params, smoke_features, "flam", 0, metrics=metrics, **outputs)
        state = tmp_path / "model" / "checkpoints" / "step-0000004" / "state.pt"
        # The checkpoint file is replaced only by training its steps again.
        results.append({**metrics.metadata, "train_seconds": None, "checkpoint": state.stat().st_ino})
    assert results[0] == results[1] and results[1]["steps"] == 4.0
    assert (tmp_path / "report" / "loss.csv").read_text().count("\n") == 5  # header and four steps
