"""The FLAM model: the head (frame and global audio embeddings, text embeddings, per-text scale
and bias) and `FlamModel`, the head with its text and audio encoders, built from params.

Shapes: B audios, L frames, Da audio feature size, K texts, Dt text feature size, D the
shared embedding size (512 in the paper).

- temporal context: a linear map of the (possibly frozen) frame features to `Dc` =
  `context_dim` (identity when 0 or equal to Da), then a small trainable block over frames
  `[B, L, Dc] -> [B, L, Dc]` (pre-norm transformer layers, or residual 1-D convolutions).
  Narrowing YAMNet's 1024 features to 512 before the block makes it ~4x cheaper to train;
- `frame_embeddings`: the audio projection (Linear, ReLU, Linear) applied to every frame,
  L2-normalised: `[B, L, D]`;
- `global_embedding`: the same projection applied to the mean of the frames: `[B, D]`;
- `text_embeddings`: the text projection, L2-normalised: `[K, D]`;
- `text_scale_bias`: `alpha = exp(MLP_a(t))` (final bias ln 10, so alpha starts near 10) and
  `beta = MLP_b(t)` (final bias -8), each `[K]`. Ablations replace either by one learned
  scalar shared by every text.

MGA-CLAP (`architecture="mga_clap"`, `flam_core.model.mga_clap`), the frame-aware baseline
trained with a clip-level loss only: the last block of the temporal context is its
locality-aware block (attention within `local_window` frames, no FFN), and the global audio
and text embeddings are sparse mixtures of its modality-shared codebook (the projected frames,
or the projected pooled text feature as a one-token sequence). Frame embeddings stay the
projected frames, unit norm: the paper scores SED by the cosine of each frame's projection
with the text's codebook embedding. Its alpha and beta are never trained (constant, as
FLAM-Global's), so its frame scores are a per-prompt increasing function of that cosine, which
is all frame AUROC and PSDS read.

Scores: `p = sigmoid(alpha * cos + beta)`; the unbiased detector `p / (p + sigmoid(beta))`
removes the learned label prior, so one threshold (0.5) serves every prompt; the
approximate form `sigmoid(alpha * cos)` agrees when beta << -10.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from flam_core.config import Params
from flam_core.errors import DataError
from flam_core.model.audio_encoder import audio_encoder_from_params
from flam_core.model.base import AudioEncoder
from flam_core.model.fusion import ClassifierFusion
from flam_core.model.grounding import TextGrounding, backbone_grounding
from flam_core.model.mga_clap import LocalityAwareBlock, ModalitySharedCodebook
from flam_core.model.score_norm import CohortNorm
from flam_core.model.text_encoder import TextEncoder
from flam_core.model.yamnet import EMBEDDING_SIZE, NUM_CLASSES
from flam_core.postprocess import unbiased_scores


@dataclass(frozen=True)
class FlamConfig:
    audio_dim: int
    text_dim: int
    embed_dim: int = 512
    context_dim: int = 0  # 0: the block runs at audio_dim
    context: Literal["transformer", "conv", "none"] = "transformer"
    context_layers: int = 1
    context_heads: int = 8
    dropout: float = 0.1
    text_scale: bool = True  # False: one shared learned scale (ablation `no_text_scale`)
    text_bias: bool = True  # False: one shared learned bias (ablation `no_text_bias`)
    architecture: Literal["flam", "mga_clap"] = "flam"  # mga_clap: the MGA-CLAP baseline
    codebook_size: int = 4096  # MGA-CLAP: codewords M
    codebook_temperature: float = 1000.0  # MGA-CLAP: affinity / (sqrt(D) * this) before sparsemax
    local_window: int = 0  # MGA-CLAP: frames either side a frame attends to in the last block
    text_grounding: bool = False  # texts grounded in the backbone's classifier (`flam_core.model.grounding`)

    def to_dict(self) -> dict:
        return asdict(self)


def _mlp(d_in: int, d_hidden: int, d_out: int, activation: type[nn.Module]) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), activation(), nn.Linear(d_hidden, d_out))


class _ConvContext(nn.Module):
    """Residual 1-D convolution over frames (kernel 3), pre-norm."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv = nn.Conv1d(dim, dim, kernel_size=3, padding=1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.norm(x).transpose(1, 2)).transpose(1, 2)
        return x + self.dropout(F.gelu(y))


class FlamHead(nn.Module):
    """Everything of FLAM that sits on top of the audio frame features and text features."""

    def __init__(self, config: FlamConfig) -> None:
        super().__init__()
        self.config = config
        width = config.context_dim or config.audio_dim
        self.input_proj = nn.Linear(config.audio_dim, width) if width != config.audio_dim else nn.Identity()
        mga_clap = config.architecture == "mga_clap"
        # MGA-CLAP: its locality-aware block stands in for the last context layer
        n_layers = max(config.context_layers - 1, 0) if mga_clap else config.context_layers
        self.context: nn.Module = self._context(config, width, n_layers)
        if mga_clap:
            block = LocalityAwareBlock(width, config.context_heads, config.local_window, config.dropout)
            self.context = nn.Sequential(self.context, block)
        d = config.embed_dim
        # Filled from the backbone by `build_model`, or by a saved state.
        self.grounding = (
            TextGrounding(NUM_CLASSES, config.text_dim, EMBEDDING_SIZE) if config.text_grounding else None
        )
        text_in = config.text_dim + (self.grounding.dim if self.grounding is not None else 0)
        self.audio_proj = _mlp(width, d, d, nn.ReLU)
        self.text_proj = _mlp(text_in, d, d, nn.ReLU)
        self.alpha_mlp = _mlp(text_in, config.text_dim, 1, nn.GELU)
        self.beta_mlp = _mlp(text_in, config.text_dim, 1, nn.GELU)
        nn.init.constant_(self.alpha_mlp[-1].bias, math.log(10.0))
        nn.init.constant_(self.beta_mlp[-1].bias, -8.0)
        # Shared scale/bias for the ablations (unused parameters otherwise).
        # One-element vectors rather than 0-d scalars: DeepSpeed's parameter broadcast and ZeRO
        # flattening view every parameter as bytes, which 0-d tensors do not allow.
        self.shared_log_alpha = nn.Parameter(torch.full((1,), math.log(10.0)))
        self.shared_beta = nn.Parameter(torch.full((1,), -8.0))
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))  # CLIP temperature theta
        self.codebook = (
            ModalitySharedCodebook(config.codebook_size, d, config.codebook_temperature) if mga_clap else None
        )

    @staticmethod
    def _context(config: FlamConfig, width: int, n_layers: int) -> nn.Module:
        """`n_layers` of the configured temporal context at `width` (identity when none)."""
        if config.context == "transformer" and n_layers:
            layer = nn.TransformerEncoderLayer(
                width,
                config.context_heads,
                dim_feedforward=2 * width,
                dropout=config.dropout,
                batch_first=True,
                norm_first=True,
            )
            return nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        if config.context == "conv" and n_layers:
            return nn.Sequential(*[_ConvContext(width, config.dropout) for _ in range(n_layers)])
        return nn.Identity()

    # --- audio -------------------------------------------------------------------------------
    def contextualise(self, features: torch.Tensor) -> torch.Tensor:
        """`[B, L, Da]` frame features -> `[B, L, Dc]` with temporal context."""
        return self.context(self.input_proj(features))

    def frame_embeddings(self, frames: torch.Tensor) -> torch.Tensor:
        """Contextualised `[B, L, Dc]` -> `[B, L, D]`, unit norm."""
        return F.normalize(self.audio_proj(frames), dim=-1)

    def global_embedding(self, frames: torch.Tensor) -> torch.Tensor:
        """Contextualised `[B, L, Dc]` -> `[B, D]`: the projection of the frames' mean, unit norm
        (MGA-CLAP: the codebook mixture of the projected frames)."""
        if self.codebook is not None:
            return self.codebook(self.audio_proj(frames))
        return F.normalize(self.audio_proj(frames.mean(dim=1)), dim=-1)

    # --- text --------------------------------------------------------------------------------
    def text_input(self, text_features: torch.Tensor) -> torch.Tensor:
        """`[K, Dt]` text features -> what the text networks read: the features, then (grounded)
        their grounding in the backbone's classifier."""
        return text_features if self.grounding is None else self.grounding(text_features)

    def text_embeddings(self, text_features: torch.Tensor) -> torch.Tensor:
        """`[K, Dt]` -> `[K, D]`, unit norm (MGA-CLAP: the codebook mixture of the projection)."""
        text_features = self.text_input(text_features)
        if self.codebook is not None:
            return self.codebook(self.text_proj(text_features)[:, None, :])
        return F.normalize(self.text_proj(text_features), dim=-1)

    def text_scale_bias(self, text_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[K, Dt]` -> (alpha `[K]` > 0, beta `[K]`)."""
        text_features = self.text_input(text_features)
        k = text_features.shape[0]
        if self.config.text_scale:
            alpha = torch.exp(self.alpha_mlp(text_features).squeeze(-1))
        else:
            alpha = torch.exp(self.shared_log_alpha).expand(k)
        beta = (
            self.beta_mlp(text_features).squeeze(-1) if self.config.text_bias else self.shared_beta.expand(k)
        )
        return alpha, beta

    # --- scores ------------------------------------------------------------------------------
    @staticmethod
    def frame_logits(
        frame_emb: torch.Tensor, text_emb: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor
    ) -> torch.Tensor:
        """`h = alpha * cos + beta`: `[B, L, D]`, `[K, D]`, `[K]`, `[K]` -> `[B, K, L]`."""
        cos = torch.einsum("bld,kd->bkl", frame_emb, text_emb)
        return alpha[None, :, None] * cos + beta[None, :, None]

    @staticmethod
    def detector_scores(
        frame_emb: torch.Tensor, text_emb: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor
    ) -> torch.Tensor:
        """What the detector reports: the unbiased `p / (p + sigmoid(beta))` of
        `p = sigmoid(alpha * cos + beta)`, `[B, L, D]`, `[K, D]`, `[K]`, `[K]` -> `[B, K, L]`."""
        return unbiased_scores(FlamHead.frame_logits(frame_emb, text_emb, alpha, beta), beta[None, :, None])

    @staticmethod
    def approximate_scores(
        frame_emb: torch.Tensor, text_emb: torch.Tensor, alpha: torch.Tensor
    ) -> torch.Tensor:
        """`sigmoid(alpha * cos)`: `[B, K, L]`; equals the unbiased score when beta << -10."""
        cos = torch.einsum("bld,kd->bkl", frame_emb, text_emb)
        return torch.sigmoid(alpha[None, :, None] * cos)


@dataclass
class Outputs:
    """What one forward pass gives the loss and the evaluation."""

    frame_emb: torch.Tensor  # [B, L, D]
    global_emb: torch.Tensor  # [B, D]
    text_emb: torch.Tensor  # [K, D]
    alpha: torch.Tensor  # [K]
    beta: torch.Tensor  # [K]


class FlamModel(torch.nn.Module):
    """The trainable whole: an optional audio encoder (None: cached features), the head, texts."""

    def __init__(self, head: FlamHead, text_encoder: TextEncoder, audio_encoder: AudioEncoder | None) -> None:
        super().__init__()
        self.head, self.text_encoder, self.audio_encoder = head, text_encoder, audio_encoder
        # set by calibration (`flam calibrate`, read back by `load_model`): scores normalised
        # over a cohort of training frames; None: the unbiased score
        self.score_norm: CohortNorm | None = None
        # set with a cohort fused with the backbone's classifier (`flam_core.model.fusion`): frame
        # and prompt vectors carry the classifier's part after FLAM's
        self.fusion: ClassifierFusion | None = None

    # --- what the detector scores with -----------------------------------------------------------
    @property
    def vector_dim(self) -> int:
        """The width of `frame_vectors` and `prompt_vectors`: the embedding's, plus the classifier's
        classes when fused."""
        return int(self.head.config.embed_dim) + (self.fusion.n_classes if self.fusion is not None else 0)

    def frame_vectors(self, features: torch.Tensor) -> torch.Tensor:
        """`[B, L, Da]` frame features -> `[B, L, vector_dim]`: the unit frame embeddings, then
        (fused) the classifier's logits."""
        head = self.head
        emb = head.frame_embeddings(head.contextualise(features.to(head.logit_scale.dtype)))
        if self.fusion is None:
            return emb
        return torch.cat([emb.float(), self.fusion.logits(features)], dim=-1)

    def prompt_vectors(self, text_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`[K, Dt]` text features -> (`[K, vector_dim]`, alpha `[K]`, beta `[K]`): the text
        embeddings, then (fused) the prompts' class weights; the head's scale and bias."""
        head = self.head
        text_features = text_features.to(head.logit_scale.dtype)
        emb = head.text_embeddings(text_features)
        alpha, beta = head.text_scale_bias(text_features)
        if self.fusion is not None:
            emb = torch.cat([emb.float(), self.fusion.prompt_weights(text_features)], dim=-1)
        return emb, alpha, beta

    def ranking_vectors(self, prompt: torch.Tensor) -> torch.Tensor:
        """`[K, vector_dim]` prompt vectors -> `[K, vector_dim]` float32 directions whose dot
        product with a frame vector orders frames as the detector's score does (search)."""
        if self.score_norm is not None:
            return self.score_norm.direction(prompt).float()
        return prompt.float()

    def scores(
        self, frames: torch.Tensor, prompt: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor
    ) -> torch.Tensor:
        """What the detector reports, `[B, L, vector_dim]` frame vectors x `[K, vector_dim]`
        prompt vectors -> `[B, K, L]`: the cohort-normalised score when the model is calibrated
        so (`flam_core.model.score_norm`, fused or not, with the head's prior `beta`), else the
        head's unbiased score."""
        if self.score_norm is not None:
            return self.score_norm.scores(frames, prompt, beta)
        d = self.head.config.embed_dim
        return self.head.detector_scores(frames[..., :d], prompt[:, :d], alpha, beta)

    def frames(self, batch: dict[str, Any]) -> torch.Tensor:
        if "frame_features" in batch:
            return batch["frame_features"]
        if self.audio_encoder is None:
            raise DataError("batch has no cached frame features and the model has no audio encoder")
        return self.audio_encoder(batch["audio"])

    def forward(self, batch: dict[str, Any], texts: list[str]) -> Outputs:
        # Cached features and cached text embeddings are float32; a bf16 head gets bf16 inputs.
        dtype = self.head.logit_scale.dtype
        context = self.head.contextualise(self.frames(batch).to(dtype))
        text_features = self.text_encoder(texts).to(dtype)
        alpha, beta = self.head.text_scale_bias(text_features)
        return Outputs(
            frame_emb=self.head.frame_embeddings(context),
            global_emb=self.head.global_embedding(context),
            text_emb=self.head.text_embeddings(text_features),
            alpha=alpha,
            beta=beta,
        )


def build_model(params: Params, audio_dim: int | None = None, lazy_text: bool = False) -> FlamModel:
    """Text encoder, audio encoder (unless `audio_dim` is given: cached features) and the head.

    `lazy_text`: a frozen text encoder loads its transformer on first use (`TextEncoder`), so a
    model whose prompt embeddings are all cached never loads it.
    """
    model, train = params.model, params.train
    text_encoder = TextEncoder(
        model.text_encoder, model.text_max_length, model.train_text_encoder, lazy=lazy_text
    )
    audio_encoder = None
    if audio_dim is None:
        audio_encoder = audio_encoder_from_params(params)
        audio_dim = audio_encoder.out_dim
    config = FlamConfig(
        audio_dim=audio_dim,
        text_dim=text_encoder.dim,
        embed_dim=model.embed_dim,
        context_dim=model.context_dim,
        context=model.context,
        context_layers=model.context_layers,
        context_heads=model.context_heads,
        dropout=model.dropout,
        text_scale=train.mode not in ("no_text_scale", "no_text_scale_bias"),
        text_bias=train.mode not in ("no_text_bias", "no_text_scale_bias"),
        architecture="mga_clap" if train.mode == "mga_clap" else "flam",
        codebook_size=model.mga_codebook_size,
        codebook_temperature=model.mga_codebook_temperature,
        local_window=model.mga_local_window,
        text_grounding=model.text_grounding,
    )
    head = FlamHead(config)
    if head.grounding is not None and not lazy_text:  # a saved model's state holds its grounding
        head.grounding = backbone_grounding(text_encoder)
    return FlamModel(head, text_encoder, audio_encoder)
