"""Prompts grounded in the backbone's AudioSet classifier: what a text sounds like, by the
classifier's own account, next to what the text encoder says it means.

The text side of FLAM learns its map from the text encoder (MiniLM) into the audio space from a
few hundred training labels; a prompt far from all of them lands wherever that map extrapolates.
The frozen backbone already holds an audio-side description of 521 everyday concepts: the rows of
its 1024 -> 521 classifier, one direction in its feature space per AudioSet class. Grounding
gives every text, before the head's text projection and its scale and bias networks, the mean of
those rows (each unit norm) weighted by the softmax of the text's cosines to the 521 class names
(over `TEMPERATURE`):

    g(t) = softmax(cos(t, names) / T) @ normalize(W_classifier)
    head input = [t, g(t)]    ([K, Dt + 1024])

A prompt near a class name ("dog barking" -> "Bark") arrives with that class's acoustic
direction; a prompt between classes, with a blend. The map is smooth (a softmax, not the top-k
of `flam_core.model.fusion.class_weights`), so texts that differ a little are grounded alike.

The 521 class-name features and classifier rows are buffers of the head, saved with every model:
a model reads back the grounding it was trained with whatever YAMNet weights sit beside it.
Measured on `val_unseen` and `val_real` in BENCHMARKS.md ("Prompts grounded in the backbone's
classifier").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flam_core.errors import ConfigError
from flam_core.model.text_encoder import TextEncoder
from flam_core.model.yamnet import default_weights_path, load_class_names, load_yamnet

# Softmax temperature over the 521 class-name cosines: most weight on the nearest few classes.
TEMPERATURE = 0.05


class TextGrounding(nn.Module):
    """`[K, Dt]` text features -> `[K, Dt + Da]`: the features, then their grounding `g(t)`.

    `keys` `[C, Dt]`: the class names' unit text features; `values` `[C, Da]`: the classifier's
    unit rows. Built empty (zeros) to be filled by a saved state, or filled by `of`."""

    def __init__(self, n_classes: int, text_dim: int, audio_dim: int) -> None:
        super().__init__()
        self.register_buffer("keys", torch.zeros(n_classes, text_dim))
        self.register_buffer("values", torch.zeros(n_classes, audio_dim))

    @classmethod
    def of(cls, class_features: torch.Tensor, classifier_weight: torch.Tensor) -> TextGrounding:
        """From the class names' text features `[C, Dt]` and the classifier's weight `[C, Da]`."""
        if (
            class_features.ndim != 2
            or classifier_weight.ndim != 2
            or (class_features.shape[0] != classifier_weight.shape[0])
        ):
            raise ConfigError(
                f"grounding needs one text feature per classifier row: class features "
                f"{tuple(class_features.shape)}, classifier {tuple(classifier_weight.shape)}"
            )
        n, text_dim = class_features.shape
        grounding = cls(n, text_dim, classifier_weight.shape[1])
        grounding.keys.copy_(F.normalize(class_features.detach().float(), dim=-1))
        grounding.values.copy_(F.normalize(classifier_weight.detach().float(), dim=-1))
        return grounding

    @property
    def dim(self) -> int:
        """The width `forward` adds to the text features."""
        return int(self.values.shape[1])

    def forward(self, text_features: torch.Tensor) -> torch.Tensor:
        cos = F.normalize(text_features.float(), dim=-1) @ self.keys.float().T
        grounded = torch.softmax(cos / TEMPERATURE, dim=-1) @ self.values.float()
        return torch.cat([text_features, grounded.to(text_features.dtype)], dim=-1)


# (weights path, its mtime, encoder source, window) -> (class-name features, classifier weight)
_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def backbone_grounding(text_encoder: TextEncoder) -> TextGrounding:
    """The grounding of the installed YAMNet: its class map's names through `text_encoder` (the
    model's own), and its classifier's rows. Kept once per process for each weights file and
    encoder (source and window): encoding the 521 names costs about a second."""
    weights = default_weights_path()
    key = (str(weights), weights.stat().st_mtime_ns, text_encoder.source, text_encoder.max_length)
    if key not in _TABLES:
        with torch.no_grad():
            class_features = text_encoder(load_class_names(weights)).detach().float().cpu()
        _TABLES[key] = (class_features, load_yamnet(weights).classifier.weight.detach().float())
    return TextGrounding.of(*_TABLES[key])
