"""The backbone's AudioSet classifier beside FLAM's frame embeddings: the fused detector score.

FLAM learns its open vocabulary from a few hundred training labels; the frozen backbone's own
classifier (YAMNet's 1024 -> 521 linear layer over AudioSet's class names) knows everyday
sounds those labels never cover. With `calibration.classifier_weight` w > 0 the calibrated
detector reads both: each frame's vector is FLAM's unit frame embedding `f` [D] followed by the
classifier's 521 logits `l` (a linear map of the same frame features, free to compute), and a
prompt's vector is its text embedding `t` [D] followed by its class weights `c` [521] (the
prompt's `TOP_K` nearest class names in the text encoder's space, softmax over `TEMPERATURE`,
as the AudioSet-classifier baseline matches prompts; `class_weights`). The prompt's score is
then the z-score, over the calibration cohort of training frames, of

    s = f . t / sigma_t + w * l . c / sigma_c

with `sigma_t`, `sigma_c` each part's standard deviation over the cohort: both parts in the
prompt's own units, then the sum normalised again (`flam_core.model.score_norm`). The score is
linear in the frame vector, so the cohort's mean and covariance give every prompt's moments
exactly, as for FLAM alone, and detection, search and streaming score it as before.

Why logits and not the posteriors the baseline sums: a weighted sum is linear in the frame
vector, so its cohort moments are exact for any prompt. The logits are floored first
(`floor`, `calibration.classifier_logit_floor`): below it a class is absent however far below
it sits, and this backbone's logits reach -3000 on ordinary audio, a tail that would otherwise
set the class's spread and drown the frames where it sounds. They are then centred on their
mean over the cohort (`center`): many classes sit far below zero on almost every frame, and a
search index keeps frame vectors in float16, whose absolute precision there (1/64 at 16) would
swamp a class's spread.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from flam_core.errors import ConfigError

TOP_K = 3
# Softmax temperature over the top-3 cosines, chosen on val_unseen (BENCHMARKS.md, "AudioSet
# classifier"): 0.05 puts most weight on the nearest class while a near tie shares it.
TEMPERATURE = 0.05


def class_weights(prompt_features: torch.Tensor, class_features: torch.Tensor) -> torch.Tensor:
    """`[K, Dt]` prompt features, `[C, Dt]` class-name features -> `[K, C]` weights: softmax over
    the `TOP_K` nearest classes by cosine (over `TEMPERATURE`), zero elsewhere. Equal cosines are
    ordered by class index, so the matching is deterministic."""
    cos = F.normalize(prompt_features.float(), dim=-1) @ F.normalize(class_features.float(), dim=-1).T
    order = torch.sort(-cos, dim=1, stable=True).indices[:, :TOP_K]
    top = torch.gather(cos, 1, order)
    weights = torch.zeros_like(cos)
    return weights.scatter_(1, order, torch.softmax(top / TEMPERATURE, dim=1))


@dataclass(frozen=True)
class ClassifierFusion:
    """The frozen classifier (`weight` [C, Da], `bias` [C]), its class names' text features
    (`class_features` [C, Dt]) and the cohort's mean logits (`center` [C]): the classifier's part
    of the fused frame and prompt vectors."""

    weight: torch.Tensor
    bias: torch.Tensor
    class_features: torch.Tensor
    center: torch.Tensor | None = None  # None: not centred yet (before the cohort is measured)
    floor: float | None = None  # logits below it are raised to it; None: no floor

    def __post_init__(self) -> None:
        n = self.weight.shape[0]
        center = self.center if self.center is not None else self.bias
        if (
            self.weight.ndim != 2
            or self.bias.shape != (n,)
            or self.class_features.shape[0] != n
            or center.shape != (n,)
        ):
            raise ConfigError(
                f"classifier {tuple(self.weight.shape)} / {tuple(self.bias.shape)} and class features "
                f"{tuple(self.class_features.shape)} do not fit"
            )

    @classmethod
    def of(
        cls,
        classifier: torch.nn.Linear,
        class_features: torch.Tensor,
        center: torch.Tensor | None = None,
        floor: float | None = None,
    ) -> ClassifierFusion:
        return cls(
            classifier.weight.detach().float(),
            classifier.bias.detach().float(),
            class_features.float(),
            None if center is None else center.float(),
            None if floor is None else float(floor),
        )

    def centred(self, center: torch.Tensor) -> ClassifierFusion:
        return replace(self, center=center.float())

    @property
    def n_classes(self) -> int:
        return int(self.weight.shape[0])

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """`[B, L, Da]` frame features -> `[B, L, C]` class logits, floored, less `center`."""
        logits = F.linear(features.float(), self.weight, self.bias)
        if self.floor is not None:
            logits = logits.clamp_min(self.floor)
        return logits if self.center is None else logits - self.center

    def prompt_weights(self, text_features: torch.Tensor) -> torch.Tensor:
        """`[K, Dt]` prompt features -> `[K, C]` class weights (`class_weights`)."""
        return class_weights(text_features, self.class_features)
