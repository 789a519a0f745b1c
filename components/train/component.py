"""Stage `train`: one model per `evaluation.baselines` mode, on the GPU pool (CUDA image).

With more than one visible GPU the component starts DeepSpeed data-parallel training through
`torchrun --standalone --nproc_per_node N -m flam_core.cli ... -S train.backend=deepspeed train`;
with one GPU or none it calls `flam_core.train.train` in-process. Either way it resumes: the
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
    """`flam_core.train.train(params with train.mode=mode, ...)` -> model folder + loss curve.

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

    from flam_core.config import Params
    from flam_core.train import train

    raw = json.loads(Path(params.path).read_text())
    raw["train"]["mode"] = mode
    resolved = Params.model_validate(raw)
    out, reports = Path(model.path), Path(train_report.path)
    n_gpus = torch.cuda.device_count()
    print(f"train {mode}: {n_gpus} visible GPU(s), {gpus} requested", flush=True)
    if n_gpus > 1:
        with tempfile.TemporaryDirectory() as tmp:
            # The parameters are already resolved: the profile overlay is empty.
            params_file = Path(tmp) / "params.yaml"
            params_file.write_text(json.dumps(raw))
            (Path(tmp) / "profiles").mkdir()
            (Path(tmp) / "profiles" / f"{resolved.profile}.yaml").write_text("{}\n")
            launcher = [shutil.which("torchrun") or sys.executable]
            if launcher[0] == sys.executable:
                launcher.extend(["-m", "torch.distributed.run"])
            command = [
                *launcher,
                "--standalone",
                f"--nproc_per_node={n_gpus}",
                "-m",
                "flam_core.cli",
                "--params",
                str(params_file),
                "-S",
                "train.backend=deepspeed",
                "-S",
                f"train.features_dir={features.path}",
                "-S",
                f"sources.out_dir={library.path}",
                "-S",
                f"synth.out_dir={recipes.path}",
                "train",
                "--out",
                str(out),
                "--reports",
                str(reports),
                "--resume",
            ]
            print(" ".join(command), flush=True)
            subprocess.run(command, check=True)
        result = json.loads((reports / "metrics.json").read_text())
    else:
        result = train(
            resolved,
            library_dir=Path(library.path),
            recipes_dir=Path(recipes.path),
            features_dir=Path(features.path),
            out_dir=out,
            report_dir=reports,
            resume=True,
        )
    for key, value in result.items():
        if isinstance(value, int | float):
            metrics.log_metric(key, float(value))
    model.metadata.update({"mode": mode, "framework": "pytorch", "processes": max(n_gpus, 1)})
