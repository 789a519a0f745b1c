"""AudioSet knowledge transfer: the frozen backbone's own classifier as a teacher for training.

YAMNet ends in a 1024 -> 521 linear classifier over AudioSet's class names, trained on 2 million
labelled clips; the cached training features (`flam_core.features`) are the 1024-d activations
that classifier reads, one per 0.32 s frame. Applied per frame, it gives each training mixture
a 521-class posterior on the model's own frame grid for free: `sigmoid(W f + b)`. (YAMNet scores
a 0.96 s patch by the classifier on the mean of its frames; the classifier is linear, so the
patch logit is the mean of the per-frame logits used here.)

In training, the class names become extra texts and those posteriors their soft frame targets
(`losses.soft_frame_loss`, with `losses.soft_prior_loss` for their per-text bias), next to the
exact synthetic labels, which stay the primary targets. A batch takes the `n_texts` classes
most active anywhere in its frames (the rest are near zero everywhere and teach little), so the
text side sees hundreds of everyday concepts over a run instead of the library's ~200 labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from flam_core.errors import ConfigError
from flam_core.model.yamnet import default_weights_path, load_class_names


@dataclass(frozen=True, eq=False)
class AudioSetTeacher:
    """The classifier's rows and class names; `targets` picks a batch's classes and targets."""

    names: tuple[str, ...]  # [C] class display names, in the classifier's row order
    weight: torch.Tensor  # [C, Da]
    bias: torch.Tensor  # [C]
    n_texts: int  # classes per batch

    def __post_init__(self) -> None:
        c = len(self.names)
        if self.weight.dim() != 2 or self.weight.shape[0] != c or self.bias.shape != (c,):
            raise ConfigError(
                f"teacher classifier of shape {tuple(self.weight.shape)} + {tuple(self.bias.shape)} does "
                f"not fit {c} class names"
            )
        if not 1 <= self.n_texts <= c:
            raise ConfigError(f"teacher texts per batch must be in 1..{c}, got {self.n_texts}")

    @classmethod
    def load(cls, n_texts: int, weights: Path | str | None = None) -> AudioSetTeacher:
        """From YAMNet's converted weights (default: where the audio encoder finds them) and the
        class map stored next to them."""
        path = Path(weights) if weights is not None else default_weights_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        names = load_class_names(path)
        return cls(
            tuple(names), state["classifier.weight"].float(), state["classifier.bias"].float(), n_texts
        )

    def posteriors(self, features: torch.Tensor) -> torch.Tensor:
        """`[B, L, Da]` frame features -> `[B, L, C]` sigmoid class posteriors (float32)."""
        if features.dim() != 3 or features.shape[-1] != self.weight.shape[1]:
            raise ConfigError(
                f"the teacher reads [B, L, {self.weight.shape[1]}] features, got {tuple(features.shape)}"
            )
        weight = self.weight.to(features.device)
        return torch.sigmoid(
            torch.addmm(self.bias.to(features.device), features.float().flatten(0, 1), weight.T)
        ).view(*features.shape[:2], -1)

    def targets(self, features: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """The batch's `n_texts` most active classes (by their highest frame posterior in the
        batch; equal ones by class index) as texts, and their targets `[B, n_texts, L]`."""
        post = self.posteriors(features)  # [B, L, C]
        peak = post.amax(dim=(0, 1))
        order = torch.sort(-peak, stable=True).indices[: self.n_texts]
        return [self.names[int(c)] for c in order], post[:, :, order].transpose(1, 2).contiguous()
