"""MGA-CLAP's model parts: the modality-shared codebook and the locality-aware block.

MGA-CLAP (Li et al., "Advancing Multi-grained Alignment for Contrastive Language-Audio
Pre-training", ACM MM 2024) aligns frames with words without frame labels. Its three parts are
the two modules here and the hard-negative-guided contrastive loss
(`flam_core.losses.hard_negative_clip_loss`). Written from the paper's description; where the
paper leaves a detail open, the choice of its public code (MIT) is followed and named below.

Shapes: B sequences, T tokens per sequence (the frames of a clip, or a text's one pooled
feature), D the shared embedding width, M codewords.

- `ModalitySharedCodebook`: M learnable codewords `C [M, D]` shared by audio and text. A
  sequence of token embeddings `x [B, T, D]` is re-expressed as a sparse mixture of codewords:
  affinities `a[b, t, m] = <x_bt, c_m> / (sqrt(D) * temperature)`, max-pooled over the tokens
  (`a[b, m] = max_t a[b, t, m]`: a codeword is used when some frame, or some word, holds it),
  sparsified by sparsemax (most weights exactly 0, the rest summing to 1), and the weighted sum
  of the codewords, L2-normalised, is the sequence's embedding `[B, D]`. Public code: M = 4096
  codewords initialised from N(0, 1), temperature 1000, sparsemax (not top-k).
- `LocalityAwareBlock`: the last block of the temporal context over frames. Self-attention in
  which frame i may attend only to frames j with |i - j| <= `window` (an attention mask), a
  residual around it, and no feed-forward network: the public code drops the FFN of the
  encoder's last block and keeps `x + LayerNorm(x)` in its place. With `window` 0 each frame
  attends to itself alone, so the attention is the value projection of the frame: exactly the
  public code's value path ("utilize v as outputs"), which keeps frames from being mixed with
  the whole clip.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from flam_core.errors import ConfigError, DataError


def sparsemax(logits: Tensor, dim: int = -1) -> Tensor:
    """Sparsemax (Martins & Astudillo, 2016): the Euclidean projection of `logits` onto the
    probability simplex along `dim`.

    `p_i = max(z_i - tau, 0)`, with `tau` chosen so that the p sum to 1: sorted descending,
    the support is the largest k with `1 + k * z_(k) > sum_{j <= k} z_(j)`, and
    `tau = (sum_{j <= k} z_(j) - 1) / k`. Differentiable through autograd (the support is
    piecewise constant), which gives sparsemax's Jacobian.
    """
    z = logits - logits.amax(dim=dim, keepdim=True)  # shift-invariant; keeps the sums small
    ordered, _ = torch.sort(z, dim=dim, descending=True)
    shape = [1] * z.dim()
    shape[dim] = z.shape[dim]
    ranks = torch.arange(1, z.shape[dim] + 1, device=z.device, dtype=z.dtype).view(shape)
    cumulative = ordered.cumsum(dim=dim)
    in_support = 1 + ranks * ordered > cumulative
    support = in_support.sum(dim=dim, keepdim=True)  # k >= 1: the largest entry is always in
    tau = (cumulative.gather(dim, support - 1) - 1) / support.to(z.dtype)
    return torch.clamp(z - tau, min=0.0)


class ModalitySharedCodebook(nn.Module):
    """M codewords of width D, and the sparse mixture of them that stands for a token sequence.

    Args:
        size: M, the number of codewords.
        dim: D, their width (the shared embedding size).
        temperature: divides the scaled affinities before sparsemax; larger spreads the weight
            over more codewords.
    """

    def __init__(self, size: int, dim: int, temperature: float = 1000.0) -> None:
        super().__init__()
        if size < 2 or dim < 1 or temperature <= 0:
            raise ConfigError(
                f"the codebook needs size >= 2, dim >= 1 and temperature > 0, "
                f"got {size}, {dim}, {temperature}"
            )
        self.temperature = temperature
        self.codewords = nn.Parameter(torch.randn(size, dim))

    def weights(self, tokens: Tensor) -> Tensor:
        """`[B, T, D]` token embeddings -> `[B, M]` sparse codeword weights (rows sum to 1)."""
        d = self.codewords.shape[1]
        if tokens.dim() != 3 or tokens.shape[-1] != d:
            raise DataError(f"tokens must be [B, T, D={d}], got {tuple(tokens.shape)}")
        affinity = tokens @ self.codewords.T / (math.sqrt(d) * self.temperature)  # [B, T, M]
        return sparsemax(affinity.amax(dim=1), dim=-1)

    def forward(self, tokens: Tensor) -> Tensor:
        """`[B, T, D]` -> `[B, D]`: the weighted sum of codewords, unit norm."""
        return F.normalize(self.weights(tokens) @ self.codewords, dim=-1)


def local_attention_mask(n_frames: int, window: int, device: torch.device | None = None) -> Tensor:
    """`[L, L]` bool: True where frame i may attend to frame j, that is |i - j| <= window."""
    if window < 0:
        raise ConfigError(f"the local attention window must be >= 0 frames, got {window}")
    index = torch.arange(n_frames, device=device)
    return (index[:, None] - index[None, :]).abs() <= window


class LocalityAwareBlock(nn.Module):
    """Pre-norm self-attention over frames within `window` frames, residual, no FFN:
    `y = x + Attn(LN1(x))` with the local mask, then `y + LN2(y)` (the public code's stand-in
    for the dropped FFN). `[B, L, W]` -> `[B, L, W]`.
    """

    def __init__(self, width: int, heads: int, window: int, dropout: float) -> None:
        super().__init__()
        if window < 0:
            raise ConfigError(f"the local attention window must be >= 0 frames, got {window}")
        self.window = window
        self.norm1 = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        allowed = local_attention_mask(x.shape[1], self.window, x.device)
        y = self.norm1(x)
        # torch's boolean attn_mask marks the pairs that may NOT attend
        attended, _ = self.attention(y, y, y, attn_mask=~allowed, need_weights=False)
        x = x + self.dropout(attended)
        return x + self.norm2(x)
