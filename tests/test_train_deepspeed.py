"""DeepSpeed backend: 2 processes with ZeRO-2 on CPU (gloo) train, checkpoint and resume.

The processes are started by `torchrun`, exactly as on a GPU node (`flam train` under the
launcher); the config is the project's `infra/deepspeed/zero2.json` (bf16 is switched off on
CPU). The first DeepSpeed start on a machine compiles a shared-memory op (cached under
`$FLAM_CACHE_DIR/torch_extensions`; `make install` builds it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from flam_core.train import deepspeed_config
from tests.conftest import ROOT, smoke_params

pytestmark = pytest.mark.slow

STEPS = 12


def launch(tmp_path, features, name, *extra: str, overrides=()):
    """`torchrun --nproc_per_node 2 -m flam_core.cli ... train` in `tmp_path` (outputs there)."""
    env = os.environ | {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}",
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
    }
    settings = [
        "train.backend=deepspeed",
        f"train.deepspeed_config={ROOT / 'infra/deepspeed/zero2.json'}",
        f"train.features_dir={features}",
        f"train.steps={STEPS}",
        "train.warmup_steps=2",
        "train.checkpoint_every=4",
        "train.log_every=4",
        "loader.batch_size=4",
        *overrides,
    ]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "flam_core.cli", "--params", str(ROOT / "params.yaml"), "--profile", "smoke"]
    for setting in settings:
        command += ["-S", setting]
    command += ["train", "--out", str(tmp_path / name), "--reports", str(tmp_path / f"{name}-reports")]
    command += extra
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def loss_table(tmp_path, name):
    lines = (tmp_path / f"{name}-reports" / "loss.csv").read_text().splitlines()
    return np.array([[float(v) for v in line.split(",")] for line in lines[1:]])


def test_zero2_two_processes_train_checkpoint_and_resume(smoke_features, tmp_path):
    launch(tmp_path, smoke_features, "whole")
    launch(tmp_path, smoke_features, "split", "--max-steps", "8")
    checkpoint = tmp_path / "split" / "checkpoints" / "step-0000008"
    # ZeRO-2 partitions the optimizer state: one shard per rank, plus the model states.
    shards = sorted(p.name for p in checkpoint.glob("*optim_states.pt"))
    assert len(shards) == 2 and (checkpoint / "mp_rank_00_model_states.pt").is_file()
    assert not (tmp_path / "split" / "model.pt").exists()
    assert not list((tmp_path / "split" / "checkpoints").glob(".staging-*"))
    launch(tmp_path, smoke_features, "split", "--resume")

    whole, resumed = loss_table(tmp_path, "whole"), loss_table(tmp_path, "split")
    assert whole.shape[0] == STEPS and resumed.shape[0] == STEPS
    # The logged loss is the mean over both ranks; the resumed run continues it exactly.
    np.testing.assert_allclose(resumed, whole, rtol=1e-5, atol=1e-6)
    assert whole[-4:, 2].mean() < whole[:4, 2].mean()
    metrics = json.loads((tmp_path / "split" / "metrics.json").read_text())
    assert metrics["steps"] == STEPS and 0.0 <= metrics["val_frame_auroc_micro"] <= 1.0
    a = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "model.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in a.values() if v.is_floating_point())
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_deepspeed_config_is_completed_from_params():
    params = smoke_params(f"train.deepspeed_config={ROOT / 'infra/deepspeed/zero2.json'}", "train.device=cpu")
    config = deepspeed_config(params)
    assert config["zero_optimization"]["stage"] == 2
    assert config["train_micro_batch_size_per_gpu"] == params.loader.batch_size
    assert config["gradient_clipping"] == params.train.grad_clip
    assert config["bf16"] == {"enabled": False}  # bf16 is 5x slower than fp32 on these CPUs
    assert "train_batch_size" not in config


def test_deepspeed_config_refuses_an_optimizer_section(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}))
    with pytest.raises(Exception, match="remove the 'optimizer' section"):
        deepspeed_config(smoke_params(), path)
    with pytest.raises(Exception, match="no such file"):
        deepspeed_config(smoke_params(), tmp_path / "missing.json")
