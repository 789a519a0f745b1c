"""Checkpoints hold only tensors and plain containers, and loading one never runs code from it."""

import os

import numpy as np
import pytest
import torch

from flam_core.errors import DataError
from flam_core.train import (
    deepspeed_checkpoint_types,
    load_deepspeed_file,
    rng_state,
    set_rng_state,
    train,
)
from tests.conftest import smoke_params


class Payload:
    """Unpickling this object makes a folder: proof that a load ran code from the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture(autouse=True)
def mlflow_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")


def test_checkpoints_and_init_models_with_code_are_refused_unrun(smoke_features, tmp_path):
    params = smoke_params("train.steps=8", "train.checkpoint_every=4", "train.log_every=4")
    marker = tmp_path / "code-ran"
    out = tmp_path / "run"
    (out / "checkpoints" / "step-0000004").mkdir(parents=True)
    torch.save({"model": {}, "position": Payload(marker)}, out / "checkpoints" / "step-0000004" / "state.pt")
    with pytest.raises(DataError, match=r"state.pt holds objects other than tensors"):
        train(params, features_dir=smoke_features, out_dir=out, report_dir=tmp_path / "r", resume=True)
    assert not marker.exists()

    # A checkpoint of the previous format (numpy's RNG state pickled as a tuple with an array).
    torch.save(
        {"model": {}, "numpy_rng": np.random.get_state(), "position": {"step": 4}},
        out / "checkpoints" / "step-0000004" / "state.pt",
    )
    with pytest.raises(DataError, match=r"older version of flam"):
        train(params, features_dir=smoke_features, out_dir=out, report_dir=tmp_path / "r", resume=True)

    init = tmp_path / "global"
    init.mkdir()
    torch.save({"head.alpha": Payload(marker)}, init / "model.pt")
    with pytest.raises(DataError, match=r"model.pt holds objects other than tensors"):
        train(
            smoke_params("train.steps=8", f"train.init_from={init}"),
            features_dir=smoke_features,
            out_dir=tmp_path / "from-global",
            report_dir=tmp_path / "r2",
        )
    assert not marker.exists()


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    np.random.standard_normal()  # numpy caches the second gaussian: has_gauss is set
    torch.save(rng_state(torch.device("cpu")), tmp_path / "rng.pt")
    expected = (torch.rand(5), np.random.standard_normal(3), np.random.randint(0, 2**31, 4))
    torch.manual_seed(0)
    np.random.seed(0)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), torch.device("cpu"))
    again = (torch.rand(5), np.random.standard_normal(3), np.random.randint(0, 2**31, 4))
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1]) and np.array_equal(expected[2], again[2])


def test_deepspeed_checkpoints_load_their_own_types_and_nothing_else(tmp_path):
    """The ZeRO optimizer states hold loss scalers, fragment addresses and the stage enum (the
    two-process resume in test_train_deepspeed.py loads real ones); any other object is refused."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    assert set(deepspeed_checkpoint_types()) == {
        LossScaler,
        DynamicLossScaler,
        ZeroStageEnum,
        fragment_address,
    }
    state = {
        "loss_scaler": DynamicLossScaler(
            init_scale=2.0**16,
            scale_window=100,
            min_scale=1.0,
            delayed_shift=2,
            consecutive_hysteresis=False,
            dtype=torch.float16,
        ),
        "static": LossScaler(scale=1.0),
        "zero_stage": ZeroStageEnum.gradients,
        "param_slice_mappings": [{"w": fragment_address(numel=6, start=2)}],
        "fp32": torch.arange(4.0),
    }
    torch.save(state, tmp_path / "optim_states.pt")
    loaded = load_deepspeed_file(str(tmp_path / "optim_states.pt"))
    assert loaded["loss_scaler"].cur_scale == 2.0**16 and loaded["loss_scaler"].dtype == torch.float16
    assert loaded["static"].cur_scale == 1.0 and loaded["zero_stage"] is ZeroStageEnum.gradients
    assert loaded["param_slice_mappings"][0]["w"] == fragment_address(numel=6, start=2)
    assert torch.equal(loaded["fp32"], torch.arange(4.0))

    marker = tmp_path / "code-ran"
    torch.save(state | {"client_state": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match="holds objects other than tensors"):
        load_deepspeed_file(str(tmp_path / "evil.pt"))
    assert not marker.exists()
