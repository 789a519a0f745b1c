"""Cohort score normalisation: every prompt's frame scores on one scale, so that one threshold
serves every prompt.

The head scores prompt k at a frame as `alpha_k * cos(f, t_k) + beta_k`, its scale and bias
predicted from the text. For a prompt far from the training labels both are extrapolations, and
on real recordings the scores of different prompts are not comparable: one threshold cannot
serve them all (on `val_real`, pooled frame AUROC 0.60 against a macro 0.70; BENCHMARKS.md,
"Scores comparable across prompts").

Cohort normalisation (Z-norm, as speaker verification normalises a speaker model's scores)
measures each prompt against a fixed cohort of audio instead: the frames of training mixtures,
nearly all of them negatives for any one prompt. The frame embedding `f` is what the cosine is
linear in (`cos = f . t_k`, both unit norm), so with the cohort frames' mean `m` and covariance
`C`, prompt k's cosine over the cohort has mean `mu_k = t_k . m` and standard deviation
`sigma_k = sqrt(t_k' C t_k)`, exactly, for any prompt, with no pass over the cohort:

    z = (cos(f, t_k) - mu_k) / sigma_k        score = sigmoid(a * z + b)

`z` says how far above ordinary audio the frame stands for this prompt, in the prompt's own
units; `a` and `b`, one pair for every prompt, map it to a probability (fitted by `flam
calibrate` on the novel labels of `val_unseen`, each label's positive and negative frames
weighted equally, as the unbiased score's even prior). Folded into the head's form, the
detector scores `sigmoid(alpha'_k * cos + beta'_k)` with `alpha'_k = a / sigma_k` and
`beta'_k = b - a * mu_k / sigma_k`: a per-prompt scale and bias taken from the cohort, not
predicted from the text. Within one prompt the order of frames is the head's own (macro AUROC
and the event-found rate do not change); across prompts the scores line up.

Stored in a model folder as `cohort.npz` (`mean [D]`, `cov [D, D]`, float64; 2 MB at D = 512)
beside `calibration.json`, whose `score_norm` entry holds `a`, `b` and the cohort's size
(`flam_core.model.folder.load_model` reads both).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flam_core.errors import ConfigError, DataError
from flam_core.utils import atomic_path

COHORT_FILE = "cohort.npz"
METHOD = "cohort"


@dataclass(frozen=True)
class CohortNorm:
    """A cohort's frame-embedding moments and the shared map from z to probability."""

    mean: torch.Tensor  # [D] float64
    cov: torch.Tensor  # [D, D] float64
    n_frames: int  # cohort frames the moments came from
    scale: float = 1.0  # a
    shift: float = 0.0  # b

    @classmethod
    def from_frames(cls, frames: torch.Tensor) -> CohortNorm:
        """The moments of `[N, D]` frame embeddings (N >= 2)."""
        if frames.ndim != 2 or frames.shape[0] < 2:
            raise DataError(f"a cohort needs at least 2 frame embeddings [N, D], got {tuple(frames.shape)}")
        x = frames.double()
        mean = x.mean(0)
        centred = x - mean
        return cls(mean=mean, cov=centred.T @ centred / (x.shape[0] - 1), n_frames=int(x.shape[0]))

    def with_map(self, scale: float, shift: float) -> CohortNorm:
        if not scale > 0:
            raise DataError(f"the z -> probability map must increase with z, got scale {scale}")
        return replace(self, scale=float(scale), shift=float(shift))

    # --- scoring -------------------------------------------------------------------------------
    def moments(self, text_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[K, D]` text embeddings -> each prompt's cohort mean and standard deviation `[K]`."""
        t = text_emb.double()
        mu = t @ self.mean
        var = torch.einsum("kd,de,ke->k", t, self.cov, t)
        return mu, var.clamp_min(1e-12).sqrt()

    def z(self, cos: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """`[B, K, L]` cosines of `[K, D]` prompts -> their z-scores over the cohort."""
        mu, sigma = self.moments(text_emb)
        return ((cos.double() - mu[None, :, None]) / sigma[None, :, None]).to(cos.dtype)

    def scale_bias(self, text_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[K, D]` -> (alpha' `[K]`, beta' `[K]`) with `sigmoid(alpha' cos + beta')` the score."""
        mu, sigma = self.moments(text_emb)
        alpha = self.scale / sigma
        return alpha.to(text_emb.dtype), (self.shift - alpha * mu).to(text_emb.dtype)

    def scores(self, frame_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """`[B, L, D]` frame embeddings x `[K, D]` prompts -> `[B, K, L]` probabilities."""
        alpha, beta = self.scale_bias(text_emb)
        cos = torch.einsum("bld,kd->bkl", frame_emb, text_emb)
        return torch.sigmoid(alpha[None, :, None] * cos + beta[None, :, None])

    # --- storage -------------------------------------------------------------------------------
    def entry(self) -> dict[str, Any]:
        """What `calibration.json` keeps under `score_norm` (the moments go to `COHORT_FILE`)."""
        return {
            "method": METHOD,
            "scale": self.scale,
            "shift": self.shift,
            "cohort_frames": self.n_frames,
            "file": COHORT_FILE,
        }

    def save(self, model_dir: Path | str) -> Path:
        path = Path(model_dir) / COHORT_FILE
        with atomic_path(path) as tmp, tmp.open("wb") as handle:
            np.savez(handle, mean=self.mean.numpy(), cov=self.cov.numpy())
        return path

    @classmethod
    def load(cls, model_dir: Path | str, entry: dict[str, Any]) -> CohortNorm:
        """The normalisation a model folder's `calibration.json` entry `score_norm` describes."""
        if entry.get("method") != METHOD:
            raise ConfigError(f"{model_dir}: unknown score normalisation {entry.get('method')!r}")
        path = Path(model_dir) / str(entry.get("file", COHORT_FILE))
        if not path.is_file():
            raise ConfigError(
                f"{path} is missing: calibration.json normalises scores over a cohort it no longer "
                "has; run `flam calibrate` again"
            )
        try:
            with np.load(path) as data:
                mean, cov = np.asarray(data["mean"], np.float64), np.asarray(data["cov"], np.float64)
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"{path} is not a cohort file (mean, cov): {exc}") from exc
        if mean.ndim != 1 or cov.shape != (mean.size, mean.size):
            raise ConfigError(f"{path}: mean {mean.shape} and covariance {cov.shape} do not fit")
        norm = cls(torch.from_numpy(mean), torch.from_numpy(cov), int(entry.get("cohort_frames", 0)))
        return norm.with_map(float(entry["scale"]), float(entry["shift"]))
