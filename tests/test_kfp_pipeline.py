"""The Kubeflow pipeline: compiled YAML (fresh, deterministic, cluster settings), `submit`, a local run."""

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from tests.conftest import ROOT

COMMITTED = ROOT / "pipelines" / "flam.yaml"


def compile_in_subprocess(out: Path, hash_seed: str) -> None:
    """`python -m pipelines.flam compile` with the default image names and a given hash seed."""
    env = {k: v for k, v in os.environ.items() if k not in ("FLAM_IMAGE", "FLAM_CUDA_IMAGE")}
    env["PYTHONHASHSEED"] = hash_seed
    command = [sys.executable, "-m", "pipelines.flam", "compile", "--output", str(out)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_compile_is_deterministic_and_the_committed_yaml_is_fresh(tmp_path):
    compile_in_subprocess(tmp_path / "a.yaml", "1")
    compile_in_subprocess(tmp_path / "b.yaml", "2")
    first = (tmp_path / "a.yaml").read_text()
    assert first == (tmp_path / "b.yaml").read_text()
    assert first == COMMITTED.read_text(), (
        "pipelines/flam.yaml is stale: run `python -m pipelines.flam compile`"
    )


# --- the compiled pipeline ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled() -> tuple[dict, dict]:
    spec, platform = yaml.safe_load_all(COMMITTED.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def all_tasks(spec: dict) -> dict[str, tuple[str, dict]]:
    """Every task of every DAG: task name -> (owning component, task spec)."""
    dags = {"root": spec["root"]} | spec["components"]
    return {
        name: (owner, task)
        for owner, component in dags.items()
        for name, task in component.get("dag", {}).get("tasks", {}).items()
    }


def baselines_loop_name(tasks: dict[str, tuple[str, dict]]) -> str:
    return next(name for name, (_, task) in tasks.items() if task["taskInfo"]["name"] == "baselines")


def executor_of(spec: dict, task: dict) -> str:
    return spec["components"][task["componentRef"]["name"]]["executorLabel"]


def test_train_tasks_ask_for_gpus_on_the_gpu_pool(compiled):
    spec, platform = compiled
    tasks = all_tasks(spec)
    trains = {name: task for name, (_, task) in tasks.items() if name.startswith("train-model")}
    assert len(trains) == 2  # flam, and the baselines' loop
    for task in trains.values():
        executor = executor_of(spec, task)
        container = spec["deploymentSpec"]["executors"][executor]["container"]
        assert container["image"].endswith("-cuda")
        accelerator = container["resources"]["accelerator"]
        assert accelerator["resourceType"] == "nvidia.com/gpu"
        assert accelerator["resourceCount"] == "{{$.inputs.parameters['pipelinechannel--gpus']}}"
        assert task["inputs"]["parameters"]["pipelinechannel--gpus"] == {
            "componentInputParameter": "pipelinechannel--gpus"
        }
        k8s = platform[executor]
        assert k8s["nodeSelector"]["labels"] == {"flam.ai/pool": "gpu"}
        assert k8s["tolerations"] == [
            {"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Equal", "value": "present"}
        ]
        assert [s["secretName"] for s in k8s["secretAsEnv"]] == ["flam-mlflow"]
    # The baselines' loop DAG receives `gpus`, so its accelerator count resolves.
    owner = next(owner for name, (owner, _) in tasks.items() if name == "train-model-2")
    assert "pipelinechannel--gpus" in spec["components"][owner]["inputDefinitions"]["parameters"]
    cpu_images = {
        e["container"]["image"] for k, e in spec["deploymentSpec"]["executors"].items() if "train" not in k
    }
    assert cpu_images == {"ghcr.io/flam-project/flam:latest-cpu"}


def test_register_gets_the_mlflow_and_s3_secrets_and_is_never_cached(compiled):
    spec, platform = compiled
    secrets = {s["secretName"]: s for s in platform["exec-register-model"]["secretAsEnv"]}
    assert secrets["flam-mlflow"]["keyToEnv"] == [
        {"envVar": "MLFLOW_TRACKING_URI", "secretKey": "MLFLOW_TRACKING_URI"}
    ]
    s3_keys = {item["secretKey"] for item in secrets["flam-s3-credentials"]["keyToEnv"]}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} <= s3_keys
    tasks = all_tasks(spec)
    for name in ("register-model", "record-outcome", "resolve-params"):
        assert not tasks[name][1]["cachingOptions"].get("enableCache"), name


def test_recipes_fan_out_in_a_parallel_loop_and_are_collected(compiled):
    spec, _ = compiled
    tasks = all_tasks(spec)
    loops = {name: task for name, (_, task) in tasks.items() if "parameterIterator" in task}
    shard_loop = next(task for task in loops.values() if task["taskInfo"]["name"] == "recipe-shards")
    iterator = shard_loop["parameterIterator"]
    assert iterator["items"]["inputParameter"] == "pipelinechannel--plan-recipe-shards-Output"
    body = spec["components"][shard_loop["componentRef"]["name"]]["dag"]["tasks"]
    assert set(body) == {"sample-recipe-shard"}
    merged = tasks["merge-recipe-shards"][1]["inputs"]["artifacts"]["shards"]["taskOutputArtifact"]
    assert merged["producerTask"].startswith("for-loop-")
    baselines = next(task for task in loops.values() if task["taskInfo"]["name"] == "baselines")
    assert "plan-baselines" in baselines["parameterIterator"]["items"]["inputParameter"]
    collected = tasks["evaluate-models"][1]["inputs"]["artifacts"]["baseline_models"]
    assert collected["taskOutputArtifact"]["producerTask"] == baselines_loop_name(tasks)


def test_validation_gate_and_exit_handler(compiled):
    spec, _ = compiled
    tasks = all_tasks(spec)
    valid, invalid = tasks["condition-5"][1], tasks["condition-6"][1]
    assert valid["taskInfo"]["name"] == "data-valid" and invalid["taskInfo"]["name"] == "data-invalid"
    condition = "inputs.parameter_values['pipelinechannel--validate-data-Output'] == 'passed'"
    assert valid["triggerPolicy"]["condition"] == condition
    assert invalid["triggerPolicy"]["condition"] == f"!({condition})"
    invalid_body = spec["components"][invalid["componentRef"]["name"]]["dag"]["tasks"]
    assert set(invalid_body) == {"fail-on-invalid-data"}
    gated = spec["components"][valid["componentRef"]["name"]]["dag"]["tasks"]
    assert {"build-features", "train-model", "evaluate-models", "register-model", "monitor-drift"} <= set(
        gated
    )
    owner, outcome = tasks["record-outcome"]
    assert owner == "root" and outcome["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert outcome["inputs"]["parameters"]["status"] == {
        "taskFinalStatus": {"producerTask": "exit-handler-1"}
    }
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert {name: p.get("defaultValue") for name, p in parameters.items()} == {
        "profile": "default",
        "overrides": [],
        "n_mixtures": 0.0,
        "n_shards": 4.0,
        "gpus": 1.0,
    }


# --- submit ----------------------------------------------------------------------------------


class FakeKfp(BaseHTTPRequestHandler):
    """The few KFP v2beta1 REST calls `submit` makes; records every request."""

    requests: list[dict]
    pipelines: dict[str, str]

    def log_message(self, *args) -> None:
        pass

    def _reply(self, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _record(self) -> tuple[str, dict, bytes]:
        url = urlparse(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        self.requests.append({"method": self.command, "path": url.path, "query": query, "body": body})
        return url.path, query, body

    def do_GET(self) -> None:
        path, query, _ = self._record()
        if path == "/apis/v2beta1/healthz":
            self._reply({"multi_user": False})
        elif path == "/apis/v2beta1/pipelines":
            predicate = json.loads(query["filter"])["predicates"][0]
            name = predicate.get("stringValue") or predicate.get("string_value")
            found = (
                [{"pipeline_id": self.pipelines[name], "display_name": name}]
                if name in self.pipelines
                else []
            )
            self._reply({"pipelines": found} if found else {})
        elif path.endswith("/versions"):
            self._reply({"pipeline_versions": [{"pipeline_id": "p-1", "pipeline_version_id": "v-1"}]})
        elif path == "/apis/v2beta1/experiments":
            self._reply({})
        else:
            self.send_error(404)

    def do_POST(self) -> None:
        path, query, body = self._record()
        if path == "/apis/v2beta1/pipelines/upload":
            self.pipelines[query["name"]] = "p-1"
            self._reply({"pipeline_id": "p-1", "display_name": query["name"]})
        elif path == "/apis/v2beta1/pipelines/upload_version":
            self._reply({"pipeline_id": query["pipelineid"], "pipeline_version_id": "v-2"})
        elif path == "/apis/v2beta1/experiments":
            self._reply({"experiment_id": "e-1", "display_name": json.loads(body)["display_name"]})
        elif path == "/apis/v2beta1/runs":
            self._reply({"run_id": "r-1", "display_name": json.loads(body)["display_name"]})
        else:
            self.send_error(404)


@pytest.fixture
def fake_kfp():
    handler = type("Handler", (FakeKfp,), {"requests": [], "pipelines": {}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


def test_submit_uploads_a_version_and_starts_a_run(fake_kfp, tmp_path, monkeypatch, capsys):
    import kfp

    from pipelines.flam import main, submit

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.config/kfp/context.json
    url, handler = fake_kfp
    arguments = {"profile": "gpu", "overrides": ["train.steps=100"], "gpus": 8}
    ids = submit(kfp.Client(host=url), COMMITTED, arguments, experiment="flam-test")
    assert ids == {"pipeline_id": "p-1", "version_id": "v-1", "experiment_id": "e-1", "run_id": "r-1"}
    upload = next(r for r in handler.requests if r["path"] == "/apis/v2beta1/pipelines/upload")
    assert upload["query"]["name"] == "flam"
    assert COMMITTED.read_bytes() in upload["body"]  # the compiled YAML, as a multipart file
    run = json.loads(next(r for r in handler.requests if r["path"] == "/apis/v2beta1/runs")["body"])
    assert run["experiment_id"] == "e-1"
    assert run["pipeline_version_reference"] == {"pipeline_id": "p-1", "pipeline_version_id": "v-1"}
    assert run["runtime_config"]["parameters"] == arguments
    experiment = next(r for r in handler.requests if r["path"] == "/apis/v2beta1/experiments" and r["body"])
    assert json.loads(experiment["body"])["display_name"] == "flam-test"

    # Second time, through the CLI: the pipeline exists, so a new version is uploaded and run.
    handler.requests.clear()
    argv = ["submit", "--host", url, "--profile", "smoke", "-S", "train.steps=5", "--gpus", "2"]
    assert main([*argv, "--version-name", "v-test", "--experiment", "ci"]) == 0
    assert "run_id=r-1" in capsys.readouterr().out
    paths = [r["path"] for r in handler.requests]
    assert "/apis/v2beta1/pipelines/upload" not in paths
    version = next(r for r in handler.requests if r["path"] == "/apis/v2beta1/pipelines/upload_version")
    assert version["query"] == {"name": "v-test", "pipelineid": "p-1"}
    assert b"pipelineInfo" in version["body"]
    run = json.loads(next(r for r in handler.requests if r["path"] == "/apis/v2beta1/runs")["body"])
    assert run["pipeline_version_reference"] == {"pipeline_id": "p-1", "pipeline_version_id": "v-2"}
    assert run["runtime_config"]["parameters"] == {
        "profile": "smoke",
        "overrides": ["train.steps=5"],
        "gpus": 2,
    }


# --- the whole pipeline, locally -------------------------------------------------------------

LOCAL_OVERRIDES = [
    "train.steps=10",
    "train.warmup_steps=2",
    "train.log_every=5",
    "loader.num_workers=0",
    "evaluation.baselines=[flam, global]",
    "evaluation.heatmaps=0",
    "monitor.reference_mixtures=10",
    "synth.chunk_mixtures=16",
]


def task_output(run_dir: Path, task: str) -> dict:
    """The executor output of a task, found anywhere under the run (loop iterations included)."""
    (path,) = run_dir.glob(f"**/{task}/executor_output.json")
    return json.loads(path.read_text())


@pytest.mark.slow
def test_pipeline_runs_locally_on_the_smoke_profile(tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from pipelines.flam import run_local

    project = tmp_path / "project"  # params.yaml + profiles, as in the image's WORKDIR
    project.mkdir()
    (project / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (project / "profiles").mkdir()
    for overlay in (ROOT / "profiles").glob("*.yaml"):
        (project / "profiles" / overlay.name).write_text(overlay.read_text())
    monkeypatch.chdir(project)
    store = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("CI", "1")

    run_local(
        tmp_path / "root", profile="smoke", overrides=LOCAL_OVERRIDES, n_mixtures=32, n_shards=2, gpus=1
    )

    (run_dir,) = (tmp_path / "root").iterdir()
    params = json.loads(next(run_dir.glob("resolve-params/params")).read_text())
    assert params["profile"] == "smoke" and params["synth"]["n_mixtures"]["train"] == 32
    assert params["train"]["steps"] == 10
    shards = sorted(run_dir.glob("for-loop-*-iteration-*/sample-recipe-shard/recipe_shard/shard.json"))
    assert len(shards) == 2  # 2 train chunks + val + test_seen + test_unseen, dealt to 2 shards
    recipes = json.loads(next(run_dir.glob("merge-recipe-shards/recipes/summary.json")).read_text())
    assert recipes["splits"]["train"]["n_mixtures"] == 32
    assert task_output(run_dir, "validate-data")["parameterValues"]["Output"] == "passed"
    assert (run_dir / "calibrate-model" / "calibrated" / "calibration.json").is_file()
    trained = {
        json.loads((p / "config.json").read_text())["params"]["train"]["mode"]
        for p in run_dir.glob("**/train-model*/model")
    }
    assert trained == {"flam", "global"}

    evaluation = json.loads((run_dir / "evaluate-models" / "evaluation" / "metrics.json").read_text())
    assert set(evaluation["models"]) == {
        "flam",
        "global",
        "audioset",
    }  # with the untrained AudioSet classifier
    assert set(evaluation["test_real"]) == {"set", "flam", "global", "audioset"}  # the held-out sources' test
    assert (run_dir / "build-real-set" / "real_set" / "summary.json").is_file()
    logged = task_output(run_dir, "evaluate-models")["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    for key, value in evaluation["gate"].items():
        assert logged[key] == pytest.approx(value)
        if not key.split(".")[-1].startswith("n_"):  # counts (retrieval.n_pairs) are not scores
            assert 0.0 <= value <= 1.0, key

    mlflow.set_tracking_uri(store)
    client = MlflowClient()
    model = client.get_registered_model("flam-sed")
    assert {k: str(v) for k, v in model.aliases.items()} == {"challenger": "1", "champion": "1"}  # first run
    version = client.get_model_version("flam-sed", "1")
    for metric in ("test_unseen.frame_auroc_macro", "test_unseen.psds1"):
        assert float(version.tags[f"metric.{metric}"]) == pytest.approx(evaluation["gate"][metric])
    assert version.tags["gate.decision"] == "promoted" and version.tags["profile"] == "smoke"
    decision = json.loads((run_dir / "register-model" / "decision" / "decision.json").read_text())
    assert decision["version"] == 1 and decision["promoted"]
    drift = task_output(run_dir, "monitor-drift")["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert 0.0 <= drift["drift_share"] <= 1.0
    assert "<html" in (run_dir / "monitor-drift" / "drift_html").read_text().lower()

    # The exit handler ran after everything else and recorded the outcome.
    assert task_output(run_dir, "record-outcome")["parameterValues"]["Output"] == "SUCCEEDED"
    (outcome,) = mlflow.search_runs(
        experiment_names=["flam"],
        filter_string="attributes.run_name = 'pipeline-outcome'",
        output_format="list",
    )
    assert outcome.data.tags["pipeline.state"] == "SUCCEEDED"
