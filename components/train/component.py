"""Stage `train`: one model per `evaluation.baselines` mode, on the GPU pool (CUDA image).

The task's settings (`train.mode`, the data folders of its input artifacts and, for DeepSpeed,
`train.backend`) are applied to the resolved parameters in Python. With more than one visible GPU
the component writes them to a JSON file and starts DeepSpeed data-parallel training through
`torchrun --standalone --nproc_per_node N -m flam_core.cli --resolved FILE train`; with one GPU
or none it calls `flam_core.train.train` in-process. Either way it resumes: the
model folder is this task's own output, so checkpoints found there are those of an earlier
attempt of the same task (a retried pod on mounted storage), which it continues.
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components.image import FLAM_CUDA_IMAGE, FLAM_IMAGE


@dsl.component(base_image=FLAM_IMAGE, install_kfp_package=False)
def plan_baselines(params: Input[Artifact]) -> list[str]:
    """The modes of `evaluation.baselines` after `flam` (which the pipeline trains and calibrates apart)."""
    from pathlib import Path

    from flam_core.config import Params
    from flam_core.errors import ConfigError

    resolved = Params.model_validate_json(Path(params.path).read_text())
    others = [mode for mode in resolved.evaluation.baselines if mode != "flam"]
    if not others:
        raise ConfigError("evaluation.baselines: the pipeline compares flam with at least one baseline")
    return others


@dsl.component(base_image=FLAM_CUDA_IMAGE, install_kfp_package=False)
def train_model(
    params: Input[Artifact],
    library: Input[Dataset],
    recipes: Input[Dataset],
    features: Input[Dataset],
    mode: str,
    gpus: int,
    model: Output[Model],
    train_report: Output[Dataset],
    metrics: Output[Metrics],
):
    """`flam_core.train.train(params with train.mode=mode and the artifacts' folders)` -> model folder
    + loss curve.

    `gpus` is what the pipeline asked the scheduler for; the process count is the number of GPUs
    the container sees (`torch.cuda.device_count()`).
    """
    import json
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import torch

    from flam_core.config import Params, deep_merge
    from flam_core.train import TrainResult, train

    n_gpus = torch.cuda.device_count()
    print(f"train {mode}: {n_gpus} visible GPU(s), {gpus} requested", flush=True)
    # Every setting of this task in the parameters themselves, so that the model's config.json
    # (and each torchrun process) sees exactly what ran.
    settings: dict = {
        "train": {"mode": mode, "features_dir": features.path},
        "sources": {"out_dir": library.path},
        "synth": {"out_dir": recipes.path},
    }
    if n_gpus > 1:
        settings["train"]["backend"] = "deepspeed"
    resolved = Params.model_validate(deep_merge(json.loads(Path(params.path).read_text()), settings))
    out, reports = Path(model.path), Path(train_report.path)
    if n_gpus > 1:
        with tempfile.TemporaryDirectory() as tmp:
            resolved_file = Path(tmp) / "params.json"
            resolved_file.write_text(resolved.model_dump_json())
            launcher = [shutil.which("torchrun") or sys.executable]
            if launcher[0] == sys.executable:
                launcher.extend(["-m", "torch.distributed.run"])
            command = [
                *launcher,
                "--standalone",
                f"--nproc_per_node={n_gpus}",
                "-m",
                "flam_core.cli",
                "--resolved",
                str(resolved_file),
                "train",
                "--out",
                str(out),
                "--reports",
                str(reports),
                "--resume",
            ]
            print(" ".join(command), flush=True)
            subprocess.run(command, check=True)
        result = TrainResult.from_json(json.loads((reports / "metrics.json").read_text()))
    else:
        result = train(resolved, out_dir=out, report_dir=reports, resume=True)
    for key, value in result.to_json().items():
        if isinstance(value, int | float):
            metrics.log_metric(key, float(value))
    model.metadata.update({"mode": mode, "framework": "pytorch", "processes": max(n_gpus, 1)})
