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

    z = (cos(f, t_k) - mu_k) / sigma_k        score = sigmoid(a * (z + lambda * beta_k) + b)

`z` says how far above ordinary audio the frame stands for this prompt, in the prompt's own
units. `beta_k`, the head's bias for the prompt, is its learned prior logit (rain is long, a door
slam is short; `sigmoid(beta)` tracks each training label's frame prior), predicted from the text
for any prompt: with weight `lambda` (`prior_weight`, `calibration.prior_weight`) a common, long
sound needs less evidence than a rare, short one. `a` and `b`, one pair for every prompt, map
the logit to a probability (fitted by `flam calibrate` on the novel labels of `val_unseen`, each
label's positive and negative frames weighted equally, as the unbiased score's even prior).
Folded into the head's form, the detector scores `sigmoid(alpha'_k * cos + beta'_k)` with
`alpha'_k = a / sigma_k` and `beta'_k = b + a * (lambda * beta_k - mu_k / sigma_k)`: a
per-prompt scale from the cohort, and a bias from the cohort and the head's prior. Within one
prompt the order of frames is the head's own (macro AUROC and the event-found rate do not
change); across prompts the scores line up.

Why the prior, when the unbiased score divides it out: the z-score lines up ordinary audio
across prompts but weighs a frame of "rain" like a frame of "door slam", and an ambience plays
under every training mixture, so against the cohort its own frames stand only a little above
the rest. On `val_real` (two training seeds) `lambda = 0.5` raises pooled frame AUROC from 0.70 /
0.71 to 0.76 / 0.76, all of it from ambience and event prompts lining up (among event prompts
alone pooled AUROC does not move), and pooled AUROC on `val` and `val_unseen` a little too
(BENCHMARKS.md, "The head's prior added to the cohort z-score").

Fused with the backbone's classifier (`flam_core.model.fusion`), the frame vector is `[f; l]`
(the unit embedding and the classifier's logits) and the prompt vector `[t; c]` (text embedding
and class weights). Each part is first put in the prompt's own units over the cohort, then
weighed (`direction`: `q = [t / sigma_t; w c / sigma_c]`, each sigma from its block of the
covariance), and `q`'s score is normalised as above: still linear in the frame vector, still
exact for any prompt.

Stored in a model folder as `cohort.npz` (`mean [D]`, `cov [D, D]`, float64; 2 MB at D = 512;
fused, D = 512 + 521 and the class names' text features `class_features [521, Dt]`) beside
`calibration.json`, whose `score_norm` entry holds `a`, `b`, `lambda`, the cohort's size and the
fusion (`flam_core.model.folder.load_model` reads both).
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
    # fused with the classifier: the frame embedding's width in the vectors (the classifier's
    # logits follow it), the classifier part's weight w, the class names' text features; 0: FLAM alone
    split: int = 0
    weight: float = 0.0
    class_features: torch.Tensor | None = None
    class_center: torch.Tensor | None = None  # the classifier's mean logits (`ClassifierFusion.center`)
    logit_floor: float | None = None  # `ClassifierFusion.floor`
    prior_weight: float = 0.0  # lambda: the head's bias (the prompt's prior logit) added to z

    @classmethod
    def from_frames(
        cls,
        frames: torch.Tensor,
        split: int = 0,
        weight: float = 0.0,
        class_features: torch.Tensor | None = None,
        class_center: torch.Tensor | None = None,
        logit_floor: float | None = None,
        prior_weight: float = 0.0,
    ) -> CohortNorm:
        """The moments of `[N, D]` frame vectors (N >= 2); `prior_weight` and, fused, `split`,
        `weight`, `class_features`, `class_center` and `logit_floor` as the fields say."""
        if frames.ndim != 2 or frames.shape[0] < 2:
            raise DataError(f"a cohort needs at least 2 frame embeddings [N, D], got {tuple(frames.shape)}")
        if not 0 <= split < frames.shape[1] or (split > 0) != (class_features is not None):
            raise DataError(f"a fused cohort needs 0 < split < {frames.shape[1]} and the class features")
        if split and not weight > 0:
            raise DataError(f"the classifier's weight in a fused cohort must be positive, got {weight}")
        if not 0 <= prior_weight < float("inf"):
            raise DataError(f"the prior's weight must be finite and >= 0, got {prior_weight}")
        x = frames.double()
        mean = x.mean(0)
        centred = x - mean
        return cls(
            mean=mean,
            cov=centred.T @ centred / (x.shape[0] - 1),
            n_frames=int(x.shape[0]),
            split=int(split),
            weight=float(weight),
            class_features=None if class_features is None else class_features.float(),
            class_center=None if class_center is None else class_center.float(),
            logit_floor=None if logit_floor is None else float(logit_floor),
            prior_weight=float(prior_weight),
        )

    def with_map(self, scale: float, shift: float) -> CohortNorm:
        if not scale > 0:
            raise DataError(f"the logit -> probability map must increase with the logit, got scale {scale}")
        return replace(self, scale=float(scale), shift=float(shift))

    # --- scoring -------------------------------------------------------------------------------
    @staticmethod
    def _spread(v: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        return torch.einsum("kd,de,ke->k", v, cov, v).clamp_min(1e-12).sqrt()

    def direction(self, prompt: torch.Tensor) -> torch.Tensor:
        """`[K, D]` prompt vectors -> the directions `q` (float64) whose dot product with a frame
        vector is the prompt's score before normalisation: the prompt itself, or fused,
        `[t / sigma_t; w c / sigma_c]`."""
        p = prompt.double()
        if not self.split:
            return p
        d = self.split
        t, c = p[:, :d], p[:, d:]
        t = t / self._spread(t, self.cov[:d, :d])[:, None]
        return torch.cat([t, self.weight * c / self._spread(c, self.cov[d:, d:])[:, None]], dim=1)

    def moments(self, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[K, D]` prompt vectors -> the cohort mean and standard deviation `[K]` of their scores
        before normalisation (`direction`)."""
        q = self.direction(prompt)
        return q @ self.mean, self._spread(q, self.cov)

    def _affine(
        self, prompt: torch.Tensor, beta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(`q`, gain, offset), float64: the prompt's logit before the shared map is
        `gain * (q . x) + offset` (`logits`)."""
        q = self.direction(prompt)
        mu, sigma = q @ self.mean, self._spread(q, self.cov)
        return q, 1.0 / sigma, self.prior_weight * beta.double() - mu / sigma

    def logits(self, frames: torch.Tensor, prompt: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """`[B, L, D]` frame vectors x `[K, D]` prompts (and the head's bias `[K]`) -> `[B, K, L]`
        logits before the shared map: the z-score over the cohort plus `prior_weight * beta`."""
        q, gain, offset = self._affine(prompt, beta)
        dot = torch.einsum("bld,kd->bkl", frames.double(), q)
        return (gain[None, :, None] * dot + offset[None, :, None]).to(frames.dtype)

    def scores(self, frames: torch.Tensor, prompt: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """`[B, L, D]` frame vectors x `[K, D]` prompts (and the head's bias `[K]`) -> `[B, K, L]`
        probabilities `sigmoid(a * logit + b)` (`logits`), folded into one scale and bias per
        prompt: `sigmoid(alpha' q.x + beta')`, `alpha' = a / sigma`,
        `beta' = b + a * (prior_weight * beta - mu / sigma)`."""
        q, gain, offset = self._affine(prompt, beta)
        alpha = self.scale * gain
        bias = self.scale * offset + self.shift
        # fused, the classifier's logits reach far beyond the unit embedding's range: in float64,
        # a frame's score does not depend on how many frames it is batched with
        dtype = torch.float64 if self.split else frames.dtype
        dot = torch.einsum("bld,kd->bkl", frames.to(dtype), q.to(dtype))
        scores = torch.sigmoid(alpha.to(dtype)[None, :, None] * dot + bias.to(dtype)[None, :, None])
        return scores.to(frames.dtype)

    # --- storage -------------------------------------------------------------------------------
    def entry(self) -> dict[str, Any]:
        """What `calibration.json` keeps under `score_norm` (the moments go to `COHORT_FILE`)."""
        entry: dict[str, Any] = {
            "method": METHOD,
            "scale": self.scale,
            "shift": self.shift,
            "prior_weight": self.prior_weight,
            "cohort_frames": self.n_frames,
            "file": COHORT_FILE,
        }
        if self.split:
            entry["fusion"] = {
                "frame_dim": self.split,
                "classifier_weight": self.weight,
                "logit_floor": self.logit_floor,
            }
        return entry

    def save(self, model_dir: Path | str) -> Path:
        path = Path(model_dir) / COHORT_FILE
        arrays = {"mean": self.mean.numpy(), "cov": self.cov.numpy()}
        if self.class_features is not None:
            arrays["class_features"] = self.class_features.numpy()
        if self.class_center is not None:
            arrays["class_center"] = self.class_center.numpy()
        with atomic_path(path) as tmp, tmp.open("wb") as handle:
            np.savez(handle, **arrays)
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
        fusion = entry.get("fusion") or {}
        try:
            with np.load(path) as data:
                mean, cov = np.asarray(data["mean"], np.float64), np.asarray(data["cov"], np.float64)
                classes = np.asarray(data["class_features"], np.float32) if fusion else None
                center = np.asarray(data["class_center"], np.float32) if fusion else None
        except (OSError, ValueError, KeyError) as exc:
            fields = "mean, cov, class_features, class_center" if fusion else "mean, cov"
            raise ConfigError(f"{path} is not a cohort file ({fields}): {exc}") from exc
        if mean.ndim != 1 or cov.shape != (mean.size, mean.size):
            raise ConfigError(f"{path}: mean {mean.shape} and covariance {cov.shape} do not fit")
        split = int(fusion.get("frame_dim", 0))
        fits = (
            classes is not None
            and center is not None
            and classes.shape[0] == center.size == mean.size - split
        )
        if fusion and not (0 < split < mean.size and fits):
            raise ConfigError(f"{path}: {mean.size} dimensions do not fit a fusion at frame_dim {split}")
        norm = cls(
            torch.from_numpy(mean),
            torch.from_numpy(cov),
            int(entry.get("cohort_frames", 0)),
            split=split,
            weight=float(fusion.get("classifier_weight", 0.0)),
            class_features=None if classes is None else torch.from_numpy(classes),
            class_center=None if center is None else torch.from_numpy(center),
            logit_floor=None if fusion.get("logit_floor") is None else float(fusion["logit_floor"]),
            prior_weight=float(entry.get("prior_weight", 0.0)),
        )
        return norm.with_map(float(entry["scale"]), float(entry["shift"]))
