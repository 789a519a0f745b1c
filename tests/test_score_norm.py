"""Cohort score normalisation: exact cohort moments, the folded scale and bias, one scale for
prompts whose raw scores sit at different levels, and the model folder's cohort file."""

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
    cos = torch.einsum("bld,kd->bkl", frames, texts)
    brute = (cohort @ texts.T).double()
    z = (cos.double() - brute.mean(0)[None, :, None]) / brute.std(0)[None, :, None]
    expected = torch.sigmoid(1.7 * z - 0.4)
    torch.testing.assert_close(norm.scores(frames, texts).double(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(norm.z(cos, texts).double(), z, atol=1e-5, rtol=0)
    alpha, beta = norm.scale_bias(texts)
    folded = torch.sigmoid(alpha[None, :, None] * cos + beta[None, :, None])
    torch.testing.assert_close(folded.double(), expected, atol=1e-6, rtol=0)


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
    z = norm.z((cohort @ texts.T).T[None], texts)[0]
    np.testing.assert_allclose(z.mean(1).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std(1).numpy(), 1.0, atol=1e-3)
    mu, sigma = norm.moments(texts)
    standout = (mu + 3 * sigma).float()  # 3 cohort SDs above ordinary audio, for each prompt
    frames = torch.zeros(1, 2, d)
    frames[0, 0, 0], frames[0, 1, 1] = standout[0], standout[1]
    scores = norm.with_map(2.0, -1.0).scores(frames, texts)[0]  # [K, L]
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
    text_emb, _, _ = detector.prompt_embeddings(["dog barking", "rain"])
    expected = norm.scores(torch.from_numpy(frames)[None], text_emb)[0].numpy()
    np.testing.assert_allclose(detector.score(frames, ["dog barking", "rain"]), expected, atol=1e-6)
    (folder / COHORT_FILE).unlink()
    with pytest.raises(ConfigError, match="run `flam calibrate` again"):
        load_model(folder)
