"""The AudioSet teacher: its targets are the backbone classifier's output on the cached features,
its losses are the frame and prior losses with probabilities for labels, and training uses it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flam_core.errors import ConfigError
from flam_core.losses import prior_loss, sed_loss, soft_frame_loss, soft_prior_loss
from flam_core.model.yamnet import load_yamnet
from flam_core.teacher import AudioSetTeacher
from flam_core.train import read_loss_csv, train
from tests.conftest import smoke_params


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def test_the_soft_frame_loss_is_the_frame_loss_on_hard_targets():
    g = torch.Generator().manual_seed(0)
    frames, texts = _unit(torch.randn(3, 5, 8, generator=g)), _unit(torch.randn(4, 8, generator=g))
    alpha, beta = torch.rand(4, generator=g) * 10, torch.randn(4, generator=g)
    labels = torch.rand(3, 4, 5, generator=g) > 0.6
    hard = sed_loss(frames, texts, alpha, beta, labels, torch.ones(4, dtype=torch.bool))
    soft = soft_frame_loss(frames, texts, alpha, beta, labels.float())
    torch.testing.assert_close(soft, hard)
    assert torch.isclose(
        soft_prior_loss(beta, labels.float()), prior_loss(beta, labels, torch.ones(4, dtype=torch.bool))
    )


def test_the_soft_losses_by_hand_and_where_they_are_minimal():
    frames = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # one audio, two frames
    texts = torch.tensor([[1.0, 0.0]])  # cos = 1 on frame 0, 0 on frame 1
    alpha, beta = torch.tensor([2.0], requires_grad=True), torch.tensor([-1.0], requires_grad=True)
    q = torch.tensor([[[0.9, 0.2]]])
    h = torch.tensor([1.0, -1.0])  # 2 * cos - 1
    expected = -(q[0, 0] * F.logsigmoid(h) + (1 - q[0, 0]) * F.logsigmoid(-h)).mean()
    loss = soft_frame_loss(frames, texts, alpha, beta, q)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert beta.grad is None or float(beta.grad.abs().sum()) == 0.0  # beta detached, as in sed_loss
    at_prior = torch.logit(torch.tensor([0.55])).requires_grad_(True)  # the mean of q
    soft_prior_loss(at_prior, q).backward()
    assert abs(float(at_prior.grad)) < 1e-6


def test_teacher_targets_are_the_classifier_on_the_cached_features(smoke_features):
    features = torch.from_numpy(
        np.load(smoke_features / "train.features.npy", mmap_mode="r")[:4].astype(np.float32)
    )
    teacher = AudioSetTeacher.load(n_texts=16)
    yamnet = load_yamnet()
    with torch.no_grad():
        expected = torch.sigmoid(yamnet.classifier(features))
    torch.testing.assert_close(teacher.posteriors(features), expected, rtol=1e-5, atol=1e-6)
    names, targets = teacher.targets(features)
    peak = expected.amax(dim=(0, 1))
    chosen = [teacher.names.index(n) for n in names]
    assert targets.shape == (4, 16, features.shape[1]) and len(set(names)) == 16
    assert float(peak[chosen].min()) >= float(np.delete(peak.numpy(), chosen).max())
    torch.testing.assert_close(targets, expected[:, :, chosen].transpose(1, 2))
    assert len(teacher.names) == 521 and teacher.names[0] == "Speech"


def test_equal_activity_is_ordered_by_class_index():
    names = tuple(f"class {c}" for c in range(6))
    teacher = AudioSetTeacher(
        names, torch.zeros(6, 3), torch.tensor([0.0, 2.0, 1.0, 2.0, 0.0, 2.0]), n_texts=3
    )
    chosen, targets = teacher.targets(torch.zeros(2, 4, 3))
    assert chosen == ["class 1", "class 3", "class 5"]
    assert torch.allclose(targets, torch.sigmoid(torch.tensor(2.0)).expand(2, 3, 4))
    with pytest.raises(ConfigError, match="texts per batch"):
        AudioSetTeacher(names, torch.zeros(6, 3), torch.zeros(6), n_texts=7)


def test_training_with_the_teacher_logs_its_terms(smoke_features, tmp_path):
    params = smoke_params(
        "train.w_teacher=50", "train.teacher_texts=8", "train.steps=10", "train.log_every=5"
    )
    result = train(
        params, features_dir=smoke_features, out_dir=tmp_path / "m", report_dir=tmp_path / "r", track=False
    )
    rows = read_loss_csv(tmp_path / "r" / "loss.csv")
    assert result is not None and len(rows) == 10
    assert all(
        np.isfinite(r["teacher"]) and r["teacher"] > 0 and np.isfinite(r["teacher_prior"]) for r in rows
    )
    assert all(r["loss"] > r["teacher"] * 50 for r in rows)  # the synthetic terms are still there


def test_the_teacher_reads_cached_yamnet_features_only(smoke_features):
    from flam_core.features import FeatureCache
    from flam_core.train import build_teacher

    cache = FeatureCache(smoke_features, "train")
    assert build_teacher(smoke_params("train.w_teacher=50"), cache) is not None
    for overrides in (
        ("train.w_teacher=0",),
        ("train.w_teacher=50", "train.mode=global"),  # FLAM-Global has no frame term
        ("train.w_teacher=50", "model.audio_encoder=cnn", "model.frozen_audio=false"),
    ):
        assert build_teacher(smoke_params(*overrides), cache) is None, overrides
    assert build_teacher(smoke_params("train.w_teacher=50"), object()) is None  # audio mixed on the fly
