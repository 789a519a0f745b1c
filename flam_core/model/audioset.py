"""The frozen backbone's own AudioSet classifier, as a detector of any prompt: the baseline every
comparison carries, and the teacher's class names (`flam_core.teacher`).

YAMNet ends in a 1024 -> 521 sigmoid classifier over AudioSet's class names. Applied to each of
the frame features the model reads (one per 0.32 s; the same features the feature cache holds)
it gives 521 class posteriors per frame, with no training of ours. YAMNet scores a 0.96 s patch
by the classifier on the mean of its frame activations; the classifier is linear, so a patch's
logit is the mean of the per-frame logits used here.

A prompt is matched to the class names by the project's text encoder (MiniLM): the cosine of
its mean-pooled features with each class name's; the `TOP_K` (3) nearest classes, weighted by
the softmax of their cosines over `TEMPERATURE` (`flam_core.model.fusion.class_weights`, which the
fused detector shares), equal cosines ordered by class index. A
prompt's frame score is that weighted sum of the three classes' posteriors; its clip embedding
(retrieval, zero-shot) the mean of the frame posteriors, and a text's the same class weights
over all 521 classes, so similarity is the weighted posterior.

`AudioSetHead` has the interface of `flam_core.model.flam.FlamHead` that scoring uses
(`contextualise`, `frame_embeddings`, `global_embedding`, `text_embeddings`, `text_scale_bias`,
`detector_scores`), so `audioset_model` is a `FlamModel` that `FlamDetector` and the evaluation
run unchanged: through files as `flam detect` does, and on the cached test features.

Class names: `yamnet_class_map.csv`, the SavedModel's own asset, extracted next to the
converted weights (`flam_core.model.yamnet.load_class_names`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from flam_core.errors import ConfigError
from flam_core.model.flam import FlamModel
from flam_core.model.fusion import class_weights
from flam_core.model.text_encoder import TextEncoder
from flam_core.model.yamnet import EMBEDDING_SIZE, NUM_CLASSES, default_weights_path, load_class_names

if TYPE_CHECKING:
    from flam_core.config import Params


@dataclass(frozen=True)
class AudioSetHeadConfig:
    """What users of a head read from its config: the frame embedding's width (one per class)."""

    embed_dim: int = NUM_CLASSES


class AudioSetHead(nn.Module):
    """The classifier per frame and the prompt-to-class matching, behind `FlamHead`'s interface."""

    def __init__(self, classifier: nn.Linear, class_features: torch.Tensor, names: list[str]) -> None:
        super().__init__()
        if classifier.weight.shape != (NUM_CLASSES, EMBEDDING_SIZE) or class_features.shape[0] != NUM_CLASSES:
            raise ConfigError("the AudioSet head needs YAMNet's 1024 -> 521 classifier and 521 class names")
        self.classifier = classifier.requires_grad_(False)
        self.register_buffer("class_features", class_features.float())
        self.names = list(names)
        self.config = AudioSetHeadConfig()
        # `FlamDetector` and the evaluation cast inputs to this parameter's dtype, as for FLAM
        self.logit_scale = nn.Parameter(torch.zeros(1), requires_grad=False)

    def contextualise(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def frame_embeddings(self, frames: torch.Tensor) -> torch.Tensor:
        """`[B, L, 1024]` -> `[B, L, 521]` class posteriors."""
        return torch.sigmoid(self.classifier(frames.float()))

    def global_embedding(self, frames: torch.Tensor) -> torch.Tensor:
        """`[B, L, 1024]` -> `[B, 521]`: the mean frame posterior, unit norm (for cosine retrieval)."""
        return F.normalize(self.frame_embeddings(frames).mean(dim=1), dim=-1)

    def text_embeddings(self, text_features: torch.Tensor) -> torch.Tensor:
        """`[K, Dt]` -> `[K, 521]` class weights (`class_weights`)."""
        return class_weights(text_features, self.class_features)

    def text_scale_bias(self, text_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = text_features.shape[0]
        return torch.ones(k), torch.zeros(k)

    @staticmethod
    def detector_scores(
        frame_emb: torch.Tensor, text_emb: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor
    ) -> torch.Tensor:
        """`[B, L, 521]` posteriors, `[K, 521]` class weights -> `[B, K, L]` prompt scores."""
        return torch.einsum("blc,kc->bkl", frame_emb, text_emb)

    @staticmethod
    def approximate_scores(
        frame_emb: torch.Tensor, text_emb: torch.Tensor, alpha: torch.Tensor
    ) -> torch.Tensor:
        return torch.einsum("blc,kc->bkl", frame_emb, text_emb)


# A label is "near" AudioSet when its nearest class name has at least this MiniLM cosine: the
# median over the default library's training labels (0.709), rounded; chosen on training labels,
# never on a test split. Near labels are where the backbone's own knowledge can carry a prompt.
NEAR_SIMILARITY = 0.7


@torch.no_grad()
def nearest_classes(model: FlamModel, labels: list[str]) -> dict[str, tuple[float, str]]:
    """Each label's highest cosine to a class name and that class (the `audioset_model` head's)."""
    head = model.head
    if not isinstance(head, AudioSetHead):
        raise ConfigError("nearest_classes needs the AudioSet classifier model (`audioset_model`)")
    cos = (
        F.normalize(model.text_encoder(list(labels)).float(), dim=-1)
        @ F.normalize(head.class_features, dim=-1).T
    )
    best = cos.max(dim=1)
    return {
        label: (round(float(v), 4), head.names[int(i)])
        for label, v, i in zip(labels, best.values, best.indices, strict=True)
    }


def audioset_model(params: Params) -> FlamModel:
    """The AudioSet classifier baseline as a `FlamModel`: YAMNet's encoder, the classifier and
    the text encoder of `params.model` (cached YAMNet features are scored by the head alone)."""
    from flam_core.model.audio_encoder import YamnetEncoder
    from flam_core.model.yamnet import load_yamnet

    if params.model.audio_encoder != "yamnet":
        raise ConfigError(
            "the AudioSet classifier baseline reads YAMNet features (model.audio_encoder=yamnet)"
        )
    weights = default_weights_path()
    names = load_class_names(weights)
    text_encoder = TextEncoder(params.model.text_encoder, params.model.text_max_length)
    with torch.no_grad():
        class_features = text_encoder.encode(names)
    yamnet = load_yamnet(weights)
    head = AudioSetHead(yamnet.classifier, class_features, names)
    return FlamModel(head, text_encoder, YamnetEncoder(str(weights))).eval()  # type: ignore[arg-type]
