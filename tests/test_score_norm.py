"""Cohort score normalisation: exact cohort moments, the folded scale and bias, one scale for
prompts whose raw scores sit at different levels, the head's prior added at its weight, the fusion
with the backbone's classifier, and the model folder's cohort file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flam_core.errors import ConfigError, DataError
from flam_core.model.score_norm import COHORT_FILE, CohortNorm


def _unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _bias(k: int, seed: int) -> torch.Tensor:
    """A head's bias for `k` prompts: their learned prior logits."""
    return torch.randn(k, generator=torch.Generator().manual_seed(seed)) * 2 - 3


def test_cohort_moments_equal_the_prompts_scores_over_the_cohort():
    cohort, texts = _unit(400, 16, seed=0), _unit(5, 16, seed=1)
    norm = CohortNorm.from_frames(cohort)
    mu, sigma = norm.moments(texts)
    cos = (cohort.double() @ texts.double().T).numpy()  # [N, K]: every prompt on every cohort frame
    np.testing.assert_allclose(mu.numpy(), cos.mean(0), atol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), cos.std(0, ddof=1), rtol=1e-10)
    assert norm.n_frames == 400


def test_scores_are_the_shared_map_of_the_z_score_and_fold_into_a_scale_and_bias():
    cohort, texts, frames = _unit(300, 8, seed=2), _unit(3, 8, seed=3), _unit(2, 7, 8, seed=4)
    norm = CohortNorm.from_frames(cohort).with_map(1.7, -0.4)
    beta = _bias(3, seed=30)  # at prior weight 0 (the default) the z-score sets the bias aside
    cos = torch.einsum("bld,kd->bkl", frames, texts)
    brute = (cohort @ texts.T).double()
    z = (cos.double() - brute.mean(0)[None, :, None]) / brute.std(0)[None, :, None]
    expected = torch.sigmoid(1.7 * z - 0.4)
    torch.testing.assert_close(norm.scores(frames, texts, beta).double(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(norm.logits(frames, texts, beta).double(), z, atol=1e-5, rtol=0)
    # per prompt, an increasing function of the cosine: the head's frame order is kept
    assert (norm.direction(texts) == texts.double()).all()


def test_prompts_at_different_levels_come_out_on_one_scale():
    # Two prompts whose raw cosines run at different levels and spreads over ordinary audio: one
    # threshold on raw scores flags every frame of the first and none of the second; normalised,
    # both prompts' cohort scores have mean 0 and spread 1, and a frame that stands out by the
    # same number of standard deviations scores the same for both.
    d = 6
    rng = torch.Generator().manual_seed(5)
    texts = torch.eye(d)[:2]
    cohort = torch.randn(2000, d, generator=rng) * 0.05
    cohort[:, 0] = cohort[:, 0] * 4 + 0.6  # prompt 0: high, wide
    cohort[:, 1] = cohort[:, 1] - 0.3  # prompt 1: low, narrow
    norm = CohortNorm.from_frames(cohort)
    beta = _bias(2, seed=31)
    z = norm.logits(cohort[None], texts, beta)[0]
    np.testing.assert_allclose(z.mean(1).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std(1).numpy(), 1.0, atol=1e-3)
    mu, sigma = norm.moments(texts)
    standout = (mu + 3 * sigma).float()  # 3 cohort SDs above ordinary audio, for each prompt
    frames = torch.zeros(1, 2, d)
    frames[0, 0, 0], frames[0, 1, 1] = standout[0], standout[1]
    scores = norm.with_map(2.0, -1.0).scores(frames, texts, beta)[0]  # [K, L]
    assert scores[0, 0] == pytest.approx(scores[1, 1].item(), abs=1e-5)
    assert scores[0, 0] == pytest.approx(torch.sigmoid(torch.tensor(5.0)).item(), abs=1e-5)


def test_cohort_file_round_trip_and_clear_errors(tmp_path):
    norm = CohortNorm.from_frames(_unit(50, 4, seed=6)).with_map(0.8, 0.1)
    assert norm.save(tmp_path) == tmp_path / COHORT_FILE
    entry = json.loads(json.dumps(norm.entry()))
    again = CohortNorm.load(tmp_path, entry)
    torch.testing.assert_close(again.mean, norm.mean)
    torch.testing.assert_close(again.cov, norm.cov)
    assert (again.scale, again.shift, again.n_frames) == (0.8, 0.1, 50)
    assert not list(tmp_path.glob(".*part"))  # written through a temporary file
    with pytest.raises(ConfigError, match="unknown score normalisation"):
        CohortNorm.load(tmp_path, entry | {"method": "t-norm"})
    (tmp_path / COHORT_FILE).write_bytes(b"not a cohort")
    with pytest.raises(ConfigError, match="not a cohort file"):
        CohortNorm.load(tmp_path, entry)
    (tmp_path / COHORT_FILE).unlink()
    with pytest.raises(ConfigError, match=r"cohort\.npz is missing"):
        CohortNorm.load(tmp_path, entry)
    with pytest.raises(DataError, match="at least 2"):
        CohortNorm.from_frames(_unit(1, 4, seed=7))
    with pytest.raises(DataError, match="increase"):
        norm.with_map(0.0, 1.0)


def test_a_model_folder_with_a_cohort_scores_with_it(flam_model, tmp_path):
    from flam_core.inference import FlamDetector
    from flam_core.model.folder import load_model

    folder = tmp_path / "model"
    shutil.copytree(flam_model, folder)
    model, _, _ = load_model(folder)
    dim = model.head.config.embed_dim
    norm = CohortNorm.from_frames(_unit(200, dim, seed=8)).with_map(1.3, -2.0)
    norm.save(folder)
    (folder / "calibration.json").write_text(json.dumps({"threshold": 0.5, "score_norm": norm.entry()}))
    detector = FlamDetector.from_dir(folder)
    assert detector.model.score_norm is not None
    frames = _unit(9, dim, seed=9).numpy()
    text_emb, _, beta = detector.prompt_embeddings(["dog barking", "rain"])
    expected = norm.scores(torch.from_numpy(frames)[None], text_emb, beta)[0].numpy()
    np.testing.assert_allclose(detector.score(frames, ["dog barking", "rain"]), expected, atol=1e-6)
    (folder / COHORT_FILE).unlink()
    with pytest.raises(ConfigError, match="run `flam calibrate` again"):
        load_model(folder)


def _fused_cohort(n: int, d: int, c: int, seed: int) -> torch.Tensor:
    """Frame vectors `[n, d + c]`: unit embeddings, then logits correlated with them."""
    emb = _unit(n, d, seed=seed)
    logits = 3 * torch.randn(n, c, generator=torch.Generator().manual_seed(seed + 1)) + emb @ torch.ones(d, c)
    return torch.cat([emb, logits], 1)


def test_the_fused_score_is_the_z_score_of_the_weighted_sum_of_both_parts_z_scores():
    d, c, w = 6, 5, 0.5
    cohort = _fused_cohort(500, d, c, seed=10)
    texts = _unit(3, d, seed=12)
    weights = torch.softmax(torch.randn(3, c, generator=torch.Generator().manual_seed(13)), 1)
    prompts = torch.cat([texts, weights], 1)
    norm = CohortNorm.from_frames(cohort, split=d, weight=w, class_features=torch.zeros(c, 4))
    # brute force over the cohort: each part z-scored per prompt, summed with weight w, the sum
    # z-scored again
    parts = [(cohort[:, :d] @ texts.T).double(), (cohort[:, d:] @ weights.T).double()]
    mean, sd = [p.mean(0) for p in parts], [p.std(0) for p in parts]
    summed = (parts[0] - mean[0]) / sd[0] + w * (parts[1] - mean[1]) / sd[1]
    frames = _fused_cohort(8, d, c, seed=14)[None]
    new = [(frames[0, :, :d] @ texts.T).double(), (frames[0, :, d:] @ weights.T).double()]
    fused = (new[0] - mean[0]) / sd[0] + w * (new[1] - mean[1]) / sd[1]
    expected = ((fused - summed.mean(0)) / summed.std(0)).T[None]  # [1, K, L]
    beta = _bias(3, seed=32)
    torch.testing.assert_close(norm.logits(frames, prompts, beta).double(), expected, atol=1e-5, rtol=0)
    mapped = norm.with_map(1.5, -0.5)
    torch.testing.assert_close(
        mapped.scores(frames, prompts, beta).double(),
        torch.sigmoid(1.5 * expected - 0.5),
        atol=1e-5,
        rtol=0,
    )
    # the direction orders frames as the score does (what search retrieves by)
    order = torch.argsort(frames[0].double() @ norm.direction(prompts).T, dim=0)
    assert (order == torch.argsort(expected[0].T, dim=0)).all()
    with pytest.raises(DataError, match="class features"):
        CohortNorm.from_frames(cohort, split=d, weight=w)
    with pytest.raises(DataError, match="positive"):
        CohortNorm.from_frames(cohort, split=d, weight=0.0, class_features=torch.zeros(c, 4))


def test_the_prior_weight_adds_the_heads_bias_to_the_z_score(tmp_path):
    d, c, lam = 6, 5, 0.5
    cohort = _fused_cohort(500, d, c, seed=20)
    texts = _unit(3, d, seed=21)
    weights = torch.softmax(torch.randn(3, c, generator=torch.Generator().manual_seed(22)), 1)
    prompts = torch.cat([texts, weights], 1)
    beta = _bias(3, seed=23)
    fused = dict(split=d, weight=0.25, class_features=torch.zeros(c, 4), class_center=torch.zeros(c))
    plain = CohortNorm.from_frames(cohort, **fused)
    norm = CohortNorm.from_frames(cohort, prior_weight=lam, **fused).with_map(0.7, 0.3)
    frames = _fused_cohort(8, d, c, seed=24)[None]
    z = plain.logits(frames, prompts, beta)  # prior weight 0: the z-score, whatever the bias
    torch.testing.assert_close(z, plain.logits(frames, prompts, beta + 4.0))
    expected = z.double() + lam * beta.double()[None, :, None]
    torch.testing.assert_close(norm.logits(frames, prompts, beta).double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        norm.scores(frames, prompts, beta).double(), torch.sigmoid(0.7 * expected + 0.3), atol=1e-6, rtol=0
    )
    # a prompt with a higher prior scores higher on the same evidence; within a prompt the frame
    # order is the z-score's
    same = norm.scores(frames, prompts[:1].expand(2, -1), torch.tensor([-4.0, -1.0]))[0]
    assert (same[1] > same[0]).all()
    assert (torch.argsort(same[0]) == torch.argsort(same[1])).all()
    # the weight travels with the model folder; a folder calibrated before it reads as 0
    norm.save(tmp_path)
    entry = json.loads(json.dumps(norm.entry()))
    assert entry["prior_weight"] == lam and CohortNorm.load(tmp_path, entry).prior_weight == lam
    entry.pop("prior_weight")
    assert CohortNorm.load(tmp_path, entry).prior_weight == 0.0
    with pytest.raises(DataError, match="prior's weight"):
        CohortNorm.from_frames(cohort, prior_weight=-1.0)


def test_a_fused_cohort_file_round_trips_and_a_misfit_is_refused(tmp_path):
    d, c = 4, 3
    classes = torch.randn(c, 5, generator=torch.Generator().manual_seed(15))
    norm = CohortNorm.from_frames(
        _fused_cohort(60, d, c, seed=16),
        split=d,
        weight=0.25,
        class_features=classes,
        class_center=torch.ones(c),
        logit_floor=-5.0,
    )
    norm = norm.with_map(0.9, 0.2)
    norm.save(tmp_path)
    entry = json.loads(json.dumps(norm.entry()))
    assert entry["fusion"] == {"frame_dim": d, "classifier_weight": 0.25, "logit_floor": -5.0}
    again = CohortNorm.load(tmp_path, entry)
    assert (again.split, again.weight, again.logit_floor) == (d, 0.25, -5.0)
    torch.testing.assert_close(again.class_features, classes)
    torch.testing.assert_close(again.class_center, torch.ones(c))
    torch.testing.assert_close(again.cov, norm.cov)
    with pytest.raises(ConfigError, match="do not fit a fusion"):
        CohortNorm.load(tmp_path, entry | {"fusion": {"frame_dim": d + 1, "classifier_weight": 0.25}})
    CohortNorm.from_frames(_unit(60, d + c, seed=17)).save(tmp_path)  # no class features
    with pytest.raises(ConfigError, match="class_features"):
        CohortNorm.load(tmp_path, entry)


def test_a_model_folder_fused_with_the_classifier_scores_with_both(flam_model, smoke_features, tmp_path):
    from flam_core.inference import FlamDetector
    from flam_core.model.fusion import class_weights
    from tests.conftest import fuse_with_classifier

    folder = tmp_path / "model"
    shutil.copytree(flam_model, folder)
    fuse_with_classifier(folder, smoke_features, weight=0.5, prior_weight=0.5)
    detector = FlamDetector.from_dir(folder)
    model, norm = detector.model, detector.model.score_norm
    d = model.head.config.embed_dim
    assert model.fusion is not None and norm is not None and (norm.split, norm.weight) == (d, 0.5)
    window = np.random.default_rng(0).normal(0, 0.1, detector.window_frames * detector.frame_samples)
    vectors = detector.window_embeddings([window.astype(np.float32)])[0]  # [L, d + 521]
    assert vectors.shape[1] == model.vector_dim == d + 521
    # the frame vector: the unit embedding, then the classifier's logits less the cohort's mean
    with torch.no_grad():
        features = model.audio_encoder(torch.from_numpy(window.astype(np.float32))[None])[0]
        logits = model.audio_encoder.yamnet.classifier(features).clamp_min(-13.8) - norm.class_center
    np.testing.assert_allclose(vectors[:, d:], logits.numpy(), rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(np.linalg.norm(vectors[:, :d], axis=1), 1.0, atol=1e-5)
    prompts = ["dog barking", "rain"]
    prompt, _, beta = detector.prompt_embeddings(prompts)
    features = model.text_encoder(prompts)
    torch.testing.assert_close(prompt[:, d:], class_weights(features, norm.class_features))
    assert norm.prior_weight == 0.5
    expected = norm.scores(torch.from_numpy(vectors)[None], prompt, beta)[0].numpy()
    np.testing.assert_allclose(detector.score(vectors, prompts), expected, atol=1e-6)
