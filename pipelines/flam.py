"""The FLAM Kubeflow pipeline: the DVC stages as KFP components, with a recipe fan-out and a GPU pool.

    python -m pipelines.flam compile [--output pipelines/flam.yaml]
    python -m pipelines.flam run-local [--profile smoke] [--pipeline-root DIR] [-S key=value ...]
    python -m pipelines.flam submit --host URL [--experiment NAME] [--profile gpu] [-S key=value ...]

Pipeline parameters: `profile` and `overrides` ("key=value", as `dvc exp run -S`) resolve the
parameters once (component `resolve_params`); `n_mixtures` (> 0) sets `synth.n_mixtures.train`;
`n_shards` is the width of the recipe fan-out; `gpus` the GPUs of each training task.

Images: `components.image` (env `FLAM_IMAGE`, `FLAM_CUDA_IMAGE` at import time).
"""

import argparse
import hashlib
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kfp import compiler, dsl, kubernetes

from components.calibrate.component import calibrate_model
from components.evaluate.component import evaluate_models
from components.features.component import build_features
from components.monitor.component import monitor_drift
from components.outcome.component import record_outcome
from components.params.component import resolve_params
from components.recipes.component import merge_recipe_shards, plan_recipe_shards, sample_recipe_shard
from components.register.component import register_model
from components.shards.component import write_shards
from components.sources.component import build_sources
from components.test_real.component import build_real_set
from components.train.component import plan_baselines, train_model
from components.validate.component import fail_on_invalid_data, validate_data

PIPELINE_NAME = "flam"
PIPELINE_DESCRIPTION = (
    "FLAM: synthesize mixtures with exact event boundaries, train FLAM and its baselines, calibrate, "
    "evaluate, register in MLflow (champion gate) and monitor drift."
)
PACKAGE_PATH = Path(__file__).with_name("flam.yaml")

# The GPU pool (infra/k8s/gpu-node-pool.md) and the Secrets (infra/README.md, step 5).
GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_LABEL = ("flam.ai/pool", "gpu")
GPU_TAINT = {"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"}
MLFLOW_SECRET = "flam-mlflow"
MLFLOW_KEYS = ("MLFLOW_TRACKING_URI",)
S3_SECRET = "flam-s3-credentials"
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
OUTCOME_EXPERIMENT = "flam"


def on_gpu_pool(task: dsl.PipelineTask, gpus: Any) -> dsl.PipelineTask:
    """`gpus` x nvidia.com/gpu, on nodes labelled flam.ai/pool=gpu, tolerating their taint."""
    task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(gpus)
    kubernetes.add_node_selector(task, *GPU_NODE_LABEL)
    kubernetes.add_toleration(task, **GPU_TAINT)
    return task


def with_secrets(task: dsl.PipelineTask, s3: bool = False) -> dsl.PipelineTask:
    """MLflow's tracking URI (and the S3 credentials) from the cluster's Secrets as env variables."""
    secrets = [(MLFLOW_SECRET, MLFLOW_KEYS)] + ([(S3_SECRET, S3_KEYS)] if s3 else [])
    for name, keys in secrets:
        kubernetes.use_secret_as_env(task, secret_name=name, secret_key_to_env={key: key for key in keys})
    return task


@dsl.pipeline(name=PIPELINE_NAME, description=PIPELINE_DESCRIPTION)
def flam_pipeline(
    profile: str = "default",
    overrides: list[str] = [],  # noqa: B006 - a KFP pipeline parameter default, never mutated
    n_mixtures: int = 0,
    n_shards: int = 4,
    gpus: int = 1,
):
    outcome = with_secrets(record_outcome(experiment=OUTCOME_EXPERIMENT)).set_caching_options(False)
    with dsl.ExitHandler(outcome, name="flam-run"):
        params = resolve_params(profile=profile, overrides=overrides, n_mixtures=n_mixtures)
        params.set_caching_options(False)  # params.yaml lives in the image: re-read it every run
        p = params.outputs["params"]
        library = build_sources(params=p).outputs["library"]
        plan = plan_recipe_shards(params=p, n_shards=n_shards)
        with dsl.ParallelFor(plan.output, name="recipe-shards") as shard:
            part = sample_recipe_shard(params=p, library=library, shard=shard, n_shards=n_shards)
        recipes = merge_recipe_shards(
            params=p, library=library, shards=dsl.Collected(part.outputs["recipe_shard"])
        ).outputs["recipes"]
        shards = write_shards(params=p, library=library, recipes=recipes).outputs["shards"]
        gate = validate_data(params=p, library=library, recipes=recipes, shards=shards)
        with dsl.If(gate.outputs["Output"] == "passed", name="data-valid"):
            data = {
                "params": p,
                "library": library,
                "recipes": recipes,
                "features": build_features(params=p, library=library, recipes=recipes).outputs["features"],
            }
            # `gpus` goes in as an input too: it wires the loop's accelerator count into the loop DAG.
            flam = train_model(**data, mode="flam", gpus=gpus).set_display_name("train-flam")
            with_secrets(on_gpu_pool(flam, gpus))
            val_real = build_real_set(params=p, library=library, split="val_real")
            val_real.set_display_name("build-val-real-set")
            calibrated = calibrate_model(
                **data, model=flam.outputs["model"], real_set=val_real.outputs["real_set"]
            ).outputs["calibrated"]
            with dsl.ParallelFor(plan_baselines(params=p).output, name="baselines") as mode:
                baseline = train_model(**data, mode=mode, gpus=gpus).set_display_name("train-baseline")
                with_secrets(on_gpu_pool(baseline, gpus))
            real_set = build_real_set(params=p, library=library).outputs["real_set"]
            evaluation = evaluate_models(
                **data,
                real_set=real_set,
                val_real_set=val_real.outputs["real_set"],
                flam_model=calibrated,
                baseline_models=dsl.Collected(baseline.outputs["model"]),
            ).outputs["evaluation"]
            register = register_model(params=p, model=calibrated, evaluation=evaluation, recipes=recipes)
            with_secrets(register, s3=True).set_caching_options(False)
            monitor_drift(params=p, model=calibrated, library=library, recipes=recipes)
        with dsl.Else(name="data-invalid"):
            fail_on_invalid_data(report=gate.outputs["report"])


def compile_pipeline(path: Path = PACKAGE_PATH) -> Path:
    """Compile to `path` (YAML). The output depends only on the code and the image names."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline_func=flam_pipeline, package_path=str(path))
    return path


def pipeline_arguments(
    profile: str | None = None,
    overrides: Sequence[str] = (),
    n_mixtures: int | None = None,
    n_shards: int | None = None,
    gpus: int | None = None,
) -> dict[str, Any]:
    """The run's pipeline parameters; unset ones keep the compiled defaults."""
    arguments: dict[str, Any] = {"overrides": list(overrides)}
    given = {"profile": profile, "n_mixtures": n_mixtures, "n_shards": n_shards, "gpus": gpus}
    arguments |= {key: value for key, value in given.items() if value is not None}
    return arguments


def run_local(pipeline_root: Path, **arguments: Any) -> dsl.PipelineTask:
    """Run the pipeline here, each task a subprocess of this Python (`kfp.local.SubprocessRunner`).

    Task outputs go under `pipeline_root/<run>/<task>/`. Raises RuntimeError when a task fails.
    """
    from kfp import local

    root = str(Path(pipeline_root).resolve())
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=root)
    return flam_pipeline(**arguments)


def submit(
    client: Any,
    package_path: Path,
    arguments: dict[str, Any],
    experiment: str = "flam",
    pipeline_name: str = PIPELINE_NAME,
    version_name: str | None = None,
    run_name: str | None = None,
) -> dict[str, str]:
    """Upload `package_path` as a new version of `pipeline_name` (creating the pipeline the first
    time) and start a run of that version in `experiment`. `client` is a `kfp.Client`.

    Returns the ids: pipeline, version, experiment, run.
    """
    digest = hashlib.sha256(Path(package_path).read_bytes()).hexdigest()[:12]
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    version_name = version_name or f"{pipeline_name}-{digest}-{stamp}"
    pipeline_id = client.get_pipeline_id(pipeline_name)
    if pipeline_id is None:
        pipeline = client.upload_pipeline(
            str(package_path), pipeline_name=pipeline_name, description=PIPELINE_DESCRIPTION
        )
        pipeline_id = pipeline.pipeline_id
        versions = client.list_pipeline_versions(pipeline_id, sort_by="created_at desc", page_size=1)
        version_id = versions.pipeline_versions[0].pipeline_version_id
    else:
        version = client.upload_pipeline_version(
            str(package_path), pipeline_version_name=version_name, pipeline_id=pipeline_id
        )
        version_id = version.pipeline_version_id
    experiment_id = client.create_experiment(experiment).experiment_id
    run = client.run_pipeline(
        experiment_id=experiment_id,
        job_name=run_name or f"{pipeline_name}-{stamp}",
        params=arguments,
        pipeline_id=pipeline_id,
        version_id=version_id,
    )
    return {
        "pipeline_id": str(pipeline_id),
        "version_id": str(version_id),
        "experiment_id": str(experiment_id),
        "run_id": str(run.run_id),
    }


def _add_run_arguments(parser: argparse.ArgumentParser, profile: str | None) -> None:
    parser.add_argument("--profile", default=profile, help="default | smoke | gpu")
    parser.add_argument(
        "--set", "-S", dest="overrides", action="append", default=[], help="override: -S train.steps=40"
    )
    parser.add_argument("--n-mixtures", type=int, help="train mixtures (synth.n_mixtures.train)")
    parser.add_argument("--n-shards", type=int, help="width of the recipe fan-out")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.flam", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    compile_parser = commands.add_parser("compile", help="write the pipeline YAML")
    compile_parser.add_argument("--output", type=Path, default=PACKAGE_PATH)
    local_parser = commands.add_parser("run-local", help="run here with kfp.local.SubprocessRunner")
    _add_run_arguments(local_parser, profile="smoke")
    local_parser.add_argument("--pipeline-root", type=Path, default=Path(".kfp-local"))
    submit_parser = commands.add_parser("submit", help="upload a pipeline version and start a run")
    _add_run_arguments(submit_parser, profile=None)
    submit_parser.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    submit_parser.add_argument("--experiment", default="flam")
    submit_parser.add_argument("--gpus", type=int, help="GPUs per training task")
    submit_parser.add_argument("--version-name", help="default: flam-<yaml sha256[:12]>-<UTC time>")
    args = parser.parse_args(argv)

    if args.command == "compile":
        print(compile_pipeline(args.output))
        return 0
    if args.command == "run-local":
        arguments = pipeline_arguments(args.profile, args.overrides, args.n_mixtures, args.n_shards)
        run_local(args.pipeline_root, **arguments)
        print(f"pipeline finished; task outputs under {args.pipeline_root.resolve()}")
        return 0
    import kfp

    arguments = pipeline_arguments(args.profile, args.overrides, args.n_mixtures, args.n_shards, args.gpus)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(Path(tmp) / "flam.yaml")
        client = kfp.Client(host=args.host)
        ids = submit(client, package, arguments, args.experiment, version_name=args.version_name)
    print(" ".join(f"{key}={value}" for key, value in ids.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
