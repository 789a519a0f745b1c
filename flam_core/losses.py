"""FLAM training objectives: global CLIP InfoNCE, frame-wise SED loss, per-text prior loss; and
MGA-CLAP's hard-negative-guided CLIP loss, for that baseline.

Shapes (one training step; see `flam_core.data.loader` for the batch):

    frame_emb   [B, L, D]  L2-normalised frame embeddings e_l(x_i)
    audio_emb   [B, D]     L2-normalised global audio embeddings
    text_emb    [K, D]     L2-normalised text embeddings e_t(y_k); K = text slots (S in the loader)
    alpha       [K]        per-text logit scale alpha(y_k) > 0
    beta        [K]        per-text logit bias beta(y_k)
    labels      [B, K, L]  bool, labels[i, k, l]: text k is active in frame l of audio i
    text_mask   [K]        bool, True for real texts (False for padded slots)

Frame logit `h[i, k, l] = alpha_k * cos(e_l(x_i), e_t(y_k)) + beta_k`; with z = +1/-1 from the
labels, `L_SED = -1/N sum log sigmoid(z h)` over valid (i, k, l), N = B * K_valid * L, with beta
detached; `L_p` trains beta towards the log-odds of each text's frame prior.

Conventions shared by every function here:

- The loss math runs in float32 with autocast disabled, whatever the input dtype (bf16 inputs
  under `torch.autocast` are upcast); gradients come back in each input's own dtype.
- Padded text slots are dropped before any arithmetic (`index_select` of the valid slots), so
  their embeddings, alpha and beta may hold anything, even NaN, and receive exactly zero
  gradient. Listing the valid slots costs one host-device sync per call on GPU.
- No finiteness checks (they would sync the GPU on every step): a NaN or inf in a valid input
  gives a non-finite loss and non-finite gradients, returned as is. The trainer must check
  `torch.isfinite(loss)` and skip the step.
- With no valid text (or no valid audio for the prior), a loss is 0, still attached to the graph.
- Audio batches are never padded (the loader emits real mixtures only), so only `prior_loss`
  takes an `audio_mask` (it defines "valid audios" in r_k).

Data-parallel training (`gather_texts`, `remote_labels`): each rank all-gathers the text
embeddings with alpha and beta (never the logits) and scores its local audios against every
text of every rank; remote texts are labelled against local mixtures by label identity.
The distributed objective is the mean over ranks of each rank's loss, which is what DDP's
gradient averaging optimises. With equal local batch sizes, the SED and prior terms of that
mean equal the single-process losses over the concatenated batch exactly (both are linear in
the per-rank sums); for the CLIP term to match, each rank also gathers the global audio
embeddings (`all_gather_with_grad`) and computes the CLIP loss over the whole global batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from flam_core.errors import FlamError

Mode = Literal["flam", "global", "mga_clap", "frame"]
MODES: tuple[str, ...] = ("flam", "global", "mga_clap", "frame")


class LossInputError(FlamError, ValueError):
    """Tensors given to a loss have inconsistent shapes or types."""


# ----------------------------------------------------------------------------- helpers


def _fp32(device: torch.device) -> AbstractContextManager[Any]:
    """Autocast off on `device`, so the loss math stays in float32 inside a bf16 region."""
    return torch.autocast(device_type=device.type, enabled=False)


def _valid_index(text_mask: Tensor, device: torch.device) -> Tensor:
    """`[K]` bool -> `[K_valid]` int64 indices of the real text slots, on `device`."""
    return torch.nonzero(text_mask.to(device=device, dtype=torch.bool), as_tuple=False).flatten()


def _check_frame_inputs(
    frame_emb: Tensor, text_emb: Tensor, alpha: Tensor, beta: Tensor, labels: Tensor | None = None
) -> None:
    if frame_emb.dim() != 3 or text_emb.dim() != 2:
        raise LossInputError(
            f"frame_emb must be [B, L, D] and text_emb [K, D], got {tuple(frame_emb.shape)} and "
            f"{tuple(text_emb.shape)}"
        )
    b, n_frames, d = frame_emb.shape
    k = text_emb.shape[0]
    if text_emb.shape[1] != d:
        raise LossInputError(f"embedding sizes differ: frame_emb D={d}, text_emb D={text_emb.shape[1]}")
    if alpha.shape != (k,) or beta.shape != (k,):
        raise LossInputError(
            f"alpha and beta must be [K={k}], got {tuple(alpha.shape)} and {tuple(beta.shape)}"
        )
    if labels is not None and labels.shape != (b, k, n_frames):
        raise LossInputError(f"labels must be [B, K, L] = {(b, k, n_frames)}, got {tuple(labels.shape)}")
    if labels is not None and labels.dtype != torch.bool:
        raise LossInputError(f"labels must be a bool tensor, got {labels.dtype}")


def _check_text_mask(text_mask: Tensor, k: int) -> None:
    if text_mask.shape != (k,):
        raise LossInputError(f"text_mask must be [K={k}], got {tuple(text_mask.shape)}")


# ----------------------------------------------------------------------------- frame logits


def frame_logits(frame_emb: Tensor, text_emb: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """Frame-wise logits `h = alpha * cos + beta` (float32).

    Args:
        frame_emb: `[B, L, D]` L2-normalised frame embeddings (cosine = dot product).
        text_emb: `[K, D]` L2-normalised text embeddings.
        alpha: `[K]` per-text scale.
        beta: `[K]` per-text bias.

    Returns:
        `[B, K, L]` float32 logits `h[i, k, l]`.
    """
    _check_frame_inputs(frame_emb, text_emb, alpha, beta)
    with _fp32(frame_emb.device):
        cos = torch.einsum("bld,kd->bkl", frame_emb.float(), text_emb.float())
        return torch.addcmul(beta.float()[:, None], alpha.float()[:, None], cos)


# ----------------------------------------------------------------------------- SED loss


def sed_loss(
    frame_emb: Tensor,
    text_emb: Tensor,
    alpha: Tensor,
    beta: Tensor,
    labels: Tensor,
    text_mask: Tensor,
    chunk_size: int | None = None,
) -> Tensor:
    """Frame-wise SED loss `-1/N sum log sigmoid(z * h)` over valid (i, k, l), beta detached.

    Args:
        frame_emb: `[B, L, D]` L2-normalised frame embeddings.
        text_emb: `[K, D]` L2-normalised text embeddings.
        alpha: `[K]` per-text scale (receives gradient).
        beta: `[K]` per-text bias (stop-gradient here: it gets no gradient from this loss).
        labels: `[B, K, L]` bool frame labels (z = +1 where True, -1 elsewhere).
        text_mask: `[K]` bool, True for real texts; N = B * K_valid * L.
        chunk_size: None for the naive form (materialises `[B, K, L]` logits and lets autograd
            keep several tensors of that size). An int for the memory-efficient form
            (`_ChunkedSedLoss`): K is walked in chunks of `chunk_size` valid texts, gradients
            are computed in closed form during forward, and at most a few `[B, chunk, L]`
            blocks are alive at a time. Same value and gradients (float32 rounding apart);
            double backward is not supported in the chunked form.

    Returns:
        Scalar float32 loss.
    """
    _check_frame_inputs(frame_emb, text_emb, alpha, beta, labels)
    _check_text_mask(text_mask, text_emb.shape[0])
    if chunk_size is not None and chunk_size < 1:
        raise LossInputError(f"chunk_size must be a positive int or None, got {chunk_size}")
    device = frame_emb.device
    valid = _valid_index(text_mask, device)
    labels = labels.to(device)
    if chunk_size is not None:
        loss: Tensor = _ChunkedSedLoss.apply(
            frame_emb, text_emb, alpha, beta.detach(), labels, valid, chunk_size, torch.is_grad_enabled()
        )
        return loss
    b, n_frames, _ = frame_emb.shape
    with _fp32(device):
        text = text_emb.index_select(0, valid).float()
        scale = alpha.index_select(0, valid).float()
        bias = beta.detach().index_select(0, valid).float()
        cos = torch.einsum("bld,kd->bkl", frame_emb.float(), text)  # [B, Kv, L]
        logits = torch.addcmul(bias[:, None], scale[:, None], cos)
        sign = labels.index_select(1, valid).float() * 2 - 1
        n_terms = max(b * valid.numel() * n_frames, 1)
        return -F.logsigmoid(sign * logits).sum() / n_terms


class _ChunkedSedLoss(torch.autograd.Function):
    """Memory-efficient `sed_loss`: forward computes the loss and its gradients chunk by chunk.

    dloss/dh = -z * sigmoid(-z h) / N in closed form, so each `[B, L, Kc]` block is scored and
    differentiated at once and then freed; only the gradients w.r.t. frame_emb `[B, L, D]`,
    text_emb `[K, D]` and alpha `[K]` are saved for backward, which scales them by grad_output.
    Per chunk: one float32 block (cos -> z*h -> z*sigmoid(-z h), in place), one for z, and the
    transient output of logsigmoid. Blocks are laid out `[B, L, Kc]` so that the three products
    are single GEMMs on `[B*L, D]`; the frame gradient accumulates in place (`addmm_`), and
    alpha's gradient comes from the pulled-back `[Kc, D]` matrix (no extra pass over a block).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        frame_emb: Tensor,
        text_emb: Tensor,
        alpha: Tensor,
        beta: Tensor,
        labels: Tensor,
        valid: Tensor,
        chunk_size: int,
        grad_enabled: bool,
    ) -> Tensor:
        b, n_frames, d = frame_emb.shape
        k = text_emb.shape[0]
        # Forward runs in no-grad mode: the caller's grad mode comes in as `grad_enabled`.
        need_frame, need_text, need_alpha = (grad_enabled and flag for flag in ctx.needs_input_grad[:3])
        with _fp32(frame_emb.device):
            frames = frame_emb.float().reshape(b * n_frames, d)  # [B*L, D]
            n_valid = valid.numel()
            inv_n = 1.0 / max(b * n_valid * n_frames, 1)
            total = torch.zeros((), dtype=torch.float32, device=frame_emb.device)
            grad_frames = torch.zeros_like(frames) if need_frame else None
            grad_text = torch.zeros(k, d, dtype=torch.float32, device=frame_emb.device) if need_text else None
            grad_alpha = torch.zeros(k, dtype=torch.float32, device=frame_emb.device) if need_alpha else None
            for start in range(0, n_valid, chunk_size):
                idx = valid[start : start + chunk_size]
                text = text_emb.index_select(0, idx).float()  # [Kc, D]
                scale = alpha.index_select(0, idx).float()  # [Kc]
                bias = beta.index_select(0, idx).float()
                lab = labels.index_select(1, idx).transpose(1, 2)  # [B, L, Kc] bool
                sign = torch.where(lab, 1.0, -1.0).contiguous()  # z
                signed = (frames @ text.T).view(b, n_frames, -1)  # cos, [B, L, Kc]
                signed.mul_(scale).add_(bias).mul_(sign)  # z * h, in place
                total -= F.logsigmoid(signed).sum()
                if not (need_frame or need_text or need_alpha):
                    continue
                # dloss/dh = -z * sigmoid(-z h) / N. Here u = z * sigmoid(-z h), in place, and the
                # factors -alpha_k / N go into the small [Kc, D] side of each product.
                u = signed.neg_().sigmoid_().mul_(sign).view(b * n_frames, -1)  # [B*L, Kc]
                del sign
                if need_frame:
                    grad_frames.addmm_(u, text * (scale * -inv_n)[:, None])  # type: ignore[union-attr]
                if need_text or need_alpha:
                    # G_k = sum_n u_nk f_n; since cos_nk = f_n . t_k, dloss/dalpha_k = -G_k . t_k / N.
                    pulled = u.T @ frames  # [Kc, D]
                    if need_text:
                        grad_text.index_copy_(0, idx, pulled * (scale * -inv_n)[:, None])  # type: ignore[union-attr]
                    if need_alpha:
                        grad_alpha.index_copy_(0, idx, (pulled * text).sum(dim=1) * -inv_n)  # type: ignore[union-attr]
            loss = total * inv_n
        ctx.frame_dtype, ctx.text_dtype, ctx.alpha_dtype = frame_emb.dtype, text_emb.dtype, alpha.dtype
        ctx.save_for_backward(
            *(
                g if g is not None else torch.empty(0)
                for g in (
                    grad_frames.view(b, n_frames, d) if grad_frames is not None else None,
                    grad_text,
                    grad_alpha,
                )
            )
        )
        ctx.has_grad = (need_frame, need_text, need_alpha)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        dtypes = (ctx.frame_dtype, ctx.text_dtype, ctx.alpha_dtype)
        grads = tuple(
            (g * grad_output).to(dtype) if has else None
            for g, dtype, has in zip(saved, dtypes, ctx.has_grad, strict=True)
        )
        return (*grads, None, None, None, None, None)


# ----------------------------------------------------------------------------- prior loss


def prior_loss(beta: Tensor, labels: Tensor, text_mask: Tensor, audio_mask: Tensor | None = None) -> Tensor:
    """Prior loss: binary cross-entropy of sigmoid(beta_k) against each text's frame prior r_k.

    `r_k = (positive frames of text k over valid audios) / (valid audios * L)`,
    `L_p = -1/K_valid * sum_k [r_k log sigmoid(beta_k) + (1 - r_k) log sigmoid(-beta_k)]`,
    minimised at `beta_k = logit(r_k)`. Gradients flow to beta only.

    Args:
        beta: `[K]` per-text bias.
        labels: `[B, K, L]` bool frame labels.
        text_mask: `[K]` bool, True for real texts.
        audio_mask: `[B]` bool, True for real audios; None = all B are real.

    Returns:
        Scalar float32 loss.
    """
    if labels.dim() != 3 or beta.shape != (labels.shape[1],):
        raise LossInputError(
            f"beta must be [K] and labels [B, K, L], got {tuple(beta.shape)} and {tuple(labels.shape)}"
        )
    b, k, n_frames = labels.shape
    _check_text_mask(text_mask, k)
    device = beta.device
    valid = _valid_index(text_mask, device)
    labels = labels.to(device).index_select(1, valid)  # [B, Kv, L]
    if audio_mask is not None:
        if audio_mask.shape != (b,):
            raise LossInputError(f"audio_mask must be [B={b}], got {tuple(audio_mask.shape)}")
        audio_mask = audio_mask.to(device=device, dtype=torch.bool)
        labels = labels & audio_mask[:, None, None]
        n_audio = audio_mask.sum().float()
    else:
        n_audio = torch.tensor(float(b), device=device)
    with _fp32(device):
        ratio = labels.sum(dim=(0, 2)).float() / (n_audio * n_frames).clamp_min(1.0)  # [Kv]
        bias = beta.index_select(0, valid).float()
        bce = ratio * F.logsigmoid(bias) + (1 - ratio) * F.logsigmoid(-bias)
        return -bce.sum() / max(valid.numel(), 1)


# ----------------------------------------------------------------------------- soft targets


def soft_frame_loss(
    frame_emb: Tensor, text_emb: Tensor, alpha: Tensor, beta: Tensor, targets: Tensor
) -> Tensor:
    """Frame loss against probabilities: `-1/N sum [q log sigmoid(h) + (1 - q) log sigmoid(-h)]`
    over every (i, k, l), N = B * K * L, with `h = alpha * cos + beta` and beta detached, as in
    `sed_loss` (which is this loss for q in {0, 1}).

    It trains frames on a teacher's frame posteriors `q` (the backbone's AudioSet classifier on
    the same frames) for the teacher's class names as texts; all K texts are real.

    Args:
        frame_emb: `[B, L, D]`; text_emb: `[K, D]`; alpha, beta: `[K]`.
        targets: `[B, K, L]` float in [0, 1].

    Returns:
        Scalar float32 loss.
    """
    _check_frame_inputs(frame_emb, text_emb, alpha, beta)
    b, n_frames, _ = frame_emb.shape
    if targets.shape != (b, text_emb.shape[0], n_frames):
        raise LossInputError(
            f"targets must be [B, K, L] = {(b, text_emb.shape[0], n_frames)}, got {tuple(targets.shape)}"
        )
    with _fp32(frame_emb.device):
        cos = torch.einsum("bld,kd->bkl", frame_emb.float(), text_emb.float())
        logits = torch.addcmul(beta.detach().float()[:, None], alpha.float()[:, None], cos)
        return F.binary_cross_entropy_with_logits(logits, targets.float().to(logits.device))


def soft_prior_loss(beta: Tensor, targets: Tensor) -> Tensor:
    """`prior_loss` with probabilities for labels: sigmoid(beta_k) against the mean target of
    text k over every audio and frame, `r_k = mean_(i,l) q[i, k, l]`; minimised at logit(r_k).

    Args:
        beta: `[K]`; targets: `[B, K, L]` float in [0, 1].
    """
    if targets.dim() != 3 or beta.shape != (targets.shape[1],):
        raise LossInputError(
            f"beta must be [K] and targets [B, K, L], got {tuple(beta.shape)} and {tuple(targets.shape)}"
        )
    with _fp32(beta.device):
        ratio = targets.float().to(beta.device).mean(dim=(0, 2))
        return F.binary_cross_entropy_with_logits(beta.float(), ratio)


# ----------------------------------------------------------------------------- CLIP loss


def clip_loss(
    audio_emb: Tensor, text_emb: Tensor, positives: Tensor, text_mask: Tensor, logit_scale: Tensor
) -> Tensor:
    """Symmetric InfoNCE with multiple positives per row and column.

    Logits `s * <a_i, t_k>` over valid texts. Audio->text: for each audio with at least one
    positive valid text, the mean over its positives of `-log softmax_k` (softmax over all valid
    texts), averaged over those audios. Text->audio: for each valid text with at least one
    positive audio, the mean over its positive audios of `-log softmax_i` (over all audios),
    averaged over those texts. The loss is the mean of the two directions; with
    `positives = eye` it is the standard CLIP loss.

    Args:
        audio_emb: `[B, D]` L2-normalised audio embeddings.
        text_emb: `[K, D]` L2-normalised text embeddings.
        positives: `[B, K]` bool, text k describes audio i (for FLAM: `labels.any(-1)`).
        text_mask: `[K]` bool, True for real texts.
        logit_scale: scalar tensor, the temperature `s = exp(theta)` (already exponentiated).

    Returns:
        Scalar float32 loss (0 when no pair is positive).
    """
    logits, pos = _clip_logits(audio_emb, text_emb, positives, text_mask, logit_scale)
    with _fp32(logits.device):
        audio_to_text = _multi_positive_nll(logits.log_softmax(dim=1), pos, dim=1)
        text_to_audio = _multi_positive_nll(logits.log_softmax(dim=0), pos, dim=0)
        return (audio_to_text + text_to_audio) / 2


def hard_negative_weights(logits: Tensor, positives: Tensor, strength: float, dim: int = 1) -> Tensor:
    """MGA-CLAP's weights of the negatives in each softmax along `dim` (float32, same shape).

    For an anchor (a row when `dim` = 1: an audio; a column when `dim` = 0: a text) with
    negatives N (the entries that are not positive), a negative j weighs
    `w_j = |N| * exp(beta * z_j) / sum_{n in N} exp(beta * z_n)`: the negatives' weights average
    to 1 and grow with their logit z (the harder the negative, the larger its share of the
    denominator); a positive weighs 1. `beta` = `strength`; 0 gives every weight 1. The
    weights are not detached (the paper's code lets the gradient through them).

    Args:
        logits: `[B, K]` scaled similarities `s * <a_i, t_k>`.
        positives: `[B, K]` bool.
        strength: beta >= 0.
        dim: 1 (audio -> text) or 0 (text -> audio).
    """
    if logits.dim() != 2 or positives.shape != logits.shape or positives.dtype != torch.bool:
        raise LossInputError(
            f"logits must be [B, K] with bool positives of the same shape, got {tuple(logits.shape)} and "
            f"{positives.dtype} {tuple(positives.shape)}"
        )
    if dim not in (0, 1):
        raise LossInputError(f"dim must be 0 or 1, got {dim}")
    if strength < 0:
        raise LossInputError(f"the hard-negative strength must be >= 0, got {strength}")
    with _fp32(logits.device):
        return _hard_negative_log_weights(logits.float(), positives.to(logits.device), strength, dim).exp()


def _hard_negative_log_weights(logits: Tensor, pos: Tensor, strength: float, dim: int) -> Tensor:
    """log of `hard_negative_weights` (0 for positives), free of NaN for anchors without negatives."""
    neg = ~pos
    n_neg = neg.sum(dim=dim, keepdim=True).clamp_min(1).float()  # a constant: no gradient
    # An anchor without negatives normalises over all its entries instead (-inf everywhere would
    # give NaN gradients); none of those values is used.
    pool = neg | ~neg.any(dim=dim, keepdim=True)
    share = (strength * logits).masked_fill(~pool, float("-inf")).log_softmax(dim=dim)
    return torch.where(neg, n_neg.log() + share, 0.0)


def hard_negative_clip_loss(
    audio_emb: Tensor,
    text_emb: Tensor,
    positives: Tensor,
    text_mask: Tensor,
    logit_scale: Tensor,
    strength: float = 0.15,
) -> Tensor:
    """MGA-CLAP's hard-negative-guided contrastive loss: `clip_loss` with reweighted negatives.

    In each direction, the softmax denominator of an anchor weighs its negatives by
    `hard_negative_weights`: `log p_ij = z_ij - log sum_k w_ik exp(z_ik)` with `w = 1` on
    positives, then the same multi-positive mean as `clip_loss` (audio -> text over valid texts,
    text -> audio over audios, the mean of the two). With `strength` 0 every weight is 1 and this
    is `clip_loss` exactly. The paper's public code uses beta = 0.15 on the temperature-scaled
    logits; it divides each weight by the sum over the row's other entries (the positive
    included), where here an anchor's negatives are normalised among themselves so that their
    weights average to 1 (the HN-NCE form `(B - 1) exp(beta z_ij) / sum_{k != i} exp(beta z_ik)`
    for one positive per row, extended to several positives).

    Args:
        audio_emb: `[B, D]`; text_emb: `[K, D]`; positives: `[B, K]` bool; text_mask: `[K]` bool;
        logit_scale: scalar tensor `s = exp(theta)` (see `clip_loss`).
        strength: beta >= 0.

    Returns:
        Scalar float32 loss (0 when no pair is positive).
    """
    logits, pos = _clip_logits(audio_emb, text_emb, positives, text_mask, logit_scale)
    if strength < 0:
        raise LossInputError(f"the hard-negative strength must be >= 0, got {strength}")
    with _fp32(logits.device):
        directions = []
        for dim in (1, 0):
            log_weights = _hard_negative_log_weights(logits, pos, strength, dim)
            log_prob = logits - (logits + log_weights).logsumexp(dim=dim, keepdim=True)
            directions.append(_multi_positive_nll(log_prob, pos, dim=dim))
        return (directions[0] + directions[1]) / 2


def _clip_logits(
    audio_emb: Tensor, text_emb: Tensor, positives: Tensor, text_mask: Tensor, logit_scale: Tensor
) -> tuple[Tensor, Tensor]:
    """Checked clip-loss inputs -> the float32 logits `s * <a_i, t_k>` `[B, Kv]` over the valid
    texts, and the positives `[B, Kv]` of those texts."""
    _check_clip_inputs(audio_emb, text_emb, positives, text_mask, logit_scale)
    device = audio_emb.device
    valid = _valid_index(text_mask, device)
    with _fp32(device):
        text = text_emb.index_select(0, valid).float()
        pos = positives.to(device).index_select(1, valid)
        return logit_scale.float().reshape(()) * (audio_emb.float() @ text.T), pos


def _check_clip_inputs(
    audio_emb: Tensor, text_emb: Tensor, positives: Tensor, text_mask: Tensor, logit_scale: Tensor
) -> None:
    if audio_emb.dim() != 2 or text_emb.dim() != 2 or audio_emb.shape[1] != text_emb.shape[1]:
        raise LossInputError(
            f"audio_emb must be [B, D] and text_emb [K, D], got {tuple(audio_emb.shape)} and "
            f"{tuple(text_emb.shape)}"
        )
    b, k = audio_emb.shape[0], text_emb.shape[0]
    if positives.shape != (b, k) or positives.dtype != torch.bool:
        raise LossInputError(
            f"positives must be bool [B, K] = {(b, k)}, got {positives.dtype} {tuple(positives.shape)}"
        )
    _check_text_mask(text_mask, k)
    if logit_scale.numel() != 1:
        raise LossInputError(f"logit_scale must be a scalar tensor, got shape {tuple(logit_scale.shape)}")


def _multi_positive_nll(log_prob: Tensor, pos: Tensor, dim: int) -> Tensor:
    """Mean over anchors (along the other axis) of the mean over `dim`-positives of -log_prob."""
    n_pos = pos.sum(dim=dim)
    per_anchor = -torch.where(pos, log_prob, 0.0).sum(dim=dim) / n_pos.clamp_min(1)
    has_pos = n_pos > 0
    return (per_anchor * has_pos).sum() / has_pos.sum().clamp_min(1)


# ----------------------------------------------------------------------------- combined loss


class FlamLoss(torch.nn.Module):
    """The FLAM objective `w_clip * L_CLIP + w_sed * L_SED + w_prior * L_p`, with ablation modes.

    Modes:
        "flam": all three terms (the paper's FLAM).
        "global": CLIP only (FLAM-Global); frame labels matter only through `positives`.
        "mga_clap": MGA-CLAP's hard-negative CLIP term only (`hard_negative_clip_loss`), logged
            as "clip"; like "global", no frame label is read.
        "frame": SED + prior, no CLIP (the "without global loss" ablation).
    A term whose weight is 0 is not computed. The per-text scale/bias ablations are
    model-side (constant alpha or beta) and need nothing here.

    Args:
        mode: one of MODES.
        w_clip, w_sed, w_prior: term weights (openflam defaults 1, 200, 1).
        chunk_size: `sed_loss` chunk size (None = naive); see `sed_loss`.
        hard_negative_strength: beta of "mga_clap"'s CLIP term.
    """

    def __init__(
        self,
        mode: Mode = "flam",
        w_clip: float = 1.0,
        w_sed: float = 200.0,
        w_prior: float = 1.0,
        chunk_size: int | None = None,
        hard_negative_strength: float = 0.15,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise LossInputError(f"mode must be one of {MODES}, got {mode!r}")
        if hard_negative_strength < 0:
            raise LossInputError(f"the hard-negative strength must be >= 0, got {hard_negative_strength}")
        self.mode, self.chunk_size = mode, chunk_size
        self.w_clip, self.w_sed, self.w_prior = w_clip, w_sed, w_prior
        self.hard_negative_strength = hard_negative_strength

    def forward(
        self,
        *,
        audio_emb: Tensor | None,
        text_emb: Tensor,
        labels: Tensor,
        text_mask: Tensor,
        logit_scale: Tensor | None,
        frame_emb: Tensor | None = None,
        alpha: Tensor | None = None,
        beta: Tensor | None = None,
        positives: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Compute the objective.

        Args:
            audio_emb: `[B', D]` global audio embeddings for CLIP (B' = B on one device; the
                gathered global batch in data-parallel training).
            text_emb: `[K, D]`; labels: `[B, K, L]` bool; text_mask: `[K]` bool.
            logit_scale: scalar CLIP temperature `exp(theta)`.
            frame_emb: `[B, L, D]`; alpha, beta: `[K]` (needed unless mode is "global" or
                "mga_clap").
            positives: `[B', K]` bool CLIP positives; default `labels.any(-1)` (then B' = B).

        Returns:
            {"loss": weighted total (with graph), and per computed term "clip" / "sed" /
            "prior": detached float32 copies for logging}.
        """
        use_clip = self.mode in ("flam", "global", "mga_clap") and self.w_clip != 0
        use_sed = self.mode in ("flam", "frame") and self.w_sed != 0
        use_prior = self.mode in ("flam", "frame") and self.w_prior != 0
        terms: dict[str, Tensor] = {}
        total: Tensor | None = None
        if use_clip:
            if audio_emb is None or logit_scale is None:
                raise LossInputError("the CLIP term needs audio_emb and logit_scale")
            pos = positives if positives is not None else labels.any(dim=-1)
            if self.mode == "mga_clap":
                terms["clip"] = hard_negative_clip_loss(
                    audio_emb, text_emb, pos, text_mask, logit_scale, self.hard_negative_strength
                )
            else:
                terms["clip"] = clip_loss(audio_emb, text_emb, pos, text_mask, logit_scale)
            total = self.w_clip * terms["clip"]
        if use_sed or use_prior:
            if frame_emb is None or alpha is None or beta is None:
                raise LossInputError(f"mode {self.mode!r} needs frame_emb, alpha and beta")
            if use_sed:
                terms["sed"] = sed_loss(
                    frame_emb, text_emb, alpha, beta, labels, text_mask, chunk_size=self.chunk_size
                )
                weighted = self.w_sed * terms["sed"]
                total = weighted if total is None else total + weighted
            if use_prior:
                terms["prior"] = prior_loss(beta, labels, text_mask)
                weighted = self.w_prior * terms["prior"]
                total = weighted if total is None else total + weighted
        if total is None:
            raise LossInputError(f"mode {self.mode!r} with these weights computes no term")
        out = {"loss": total}
        out.update({name: value.detach().float() for name, value in terms.items()})
        return out


# ----------------------------------------------------------------------------- data parallel


class GatheredTexts(NamedTuple):
    """Texts of every rank, concatenated in rank order (rank r holds rows r*K .. (r+1)*K-1)."""

    text_emb: Tensor  # [W*K, D], gradients flow back to each rank's own shard
    alpha: Tensor  # [W*K]
    beta: Tensor  # [W*K]
    text_labels: list[str]  # [W*K], "" in padded slots
    text_mask: Tensor  # [W*K] bool


def _world(group: Any = None) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def all_gather_with_grad(tensor: Tensor, group: Any = None) -> Tensor:
    """All-gather `[n, ...]` from every rank -> `[W*n, ...]` (rank order), differentiable.

    The backward sums, over ranks, the gradients w.r.t. each rank's rows and hands them back to
    that rank (`torch.distributed.nn.functional.all_gather`: reduce-scatter on NCCL, all-to-all
    on gloo). All ranks must pass the same shape. Without an initialised process group it returns
    `tensor` unchanged.
    """
    if _world(group) == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    kwargs = {} if group is None else {"group": group}
    return torch.cat(all_gather(tensor, **kwargs), dim=0)


def gather_texts(
    text_emb: Tensor,
    alpha: Tensor,
    beta: Tensor,
    text_labels: Sequence[str],
    text_mask: Tensor | None = None,
    group: Any = None,
) -> GatheredTexts:
    """Exchange text embeddings with alpha and beta between ranks (never the logits).

    Args:
        text_emb: `[K, D]` this rank's text embeddings (the padded buffer: K equal on all ranks).
        alpha, beta: `[K]`.
        text_labels: `[K]` label named by each text ("" for padded slots).
        text_mask: `[K]` bool; default: `text_label != ""`.
        group: process group (default: the world).

    Returns:
        `GatheredTexts` with `[W*K, ...]` tensors and W*K labels, in rank order. alpha and beta
        are gathered in one collective; labels travel by `all_gather_object`.
    """
    k = text_emb.shape[0]
    if alpha.shape != (k,) or beta.shape != (k,) or len(text_labels) != k:
        raise LossInputError(
            f"alpha, beta and text_labels must have K={k} entries, got {tuple(alpha.shape)}, "
            f"{tuple(beta.shape)} and {len(text_labels)}"
        )
    if text_mask is None:
        text_mask = torch.tensor([bool(label) for label in text_labels], device=text_emb.device)
    world = _world(group)
    if world == 1:
        return GatheredTexts(text_emb, alpha, beta, list(text_labels), text_mask.bool())
    import torch.distributed as dist

    all_texts = all_gather_with_grad(text_emb, group)
    scale_bias = all_gather_with_grad(torch.stack([alpha, beta.to(alpha.dtype)], dim=1), group)
    mask = all_gather_with_grad(text_mask.to(device=text_emb.device, dtype=torch.uint8), group)
    label_lists: list[Any] = [None] * world
    dist.all_gather_object(label_lists, list(text_labels), group=group)
    labels = [label for per_rank in label_lists for label in per_rank]
    return GatheredTexts(all_texts, scale_bias[:, 0], scale_bias[:, 1].to(beta.dtype), labels, mask.bool())


class _HasFrameLabels(Protocol):
    labels: Sequence[str]
    frames: np.ndarray  # [n_labels, L] bool


def remote_labels(
    frame_labels_per_mixture: Sequence[_HasFrameLabels | Mapping[str, Any]],
    text_labels: Sequence[str],
    n_frames: int | None = None,
) -> Tensor:
    """Label (gathered) texts against local mixtures by label identity.

    A text naming a label that sounds in mixture i is positive in exactly the frames where that
    label sounds, whichever rank the text came from; other texts are negatives; "" (padding)
    never matches. This is the loader's own rule (`Collate`), applied to remote texts.

    Args:
        frame_labels_per_mixture: B local mixtures, each a `FrameLabels` (`.labels`, `.frames`
            `[n_labels, L]`) or a mapping label -> `[L]` bool frames. Use the full per-mixture
            labels (every event and the background), not only the labels of local texts.
        text_labels: K_total labels of the gathered texts.
        n_frames: L, needed only when no mixture has any label.

    Returns:
        `[B, K_total, L]` bool tensor (CPU; move it with the batch).
    """
    rows: list[dict[str, np.ndarray]] = []
    for item in frame_labels_per_mixture:
        if isinstance(item, Mapping):
            rows.append({str(name): np.asarray(frames, dtype=bool) for name, frames in item.items()})
        else:
            frames = np.asarray(item.frames, dtype=bool)
            rows.append({name: frames[j] for j, name in enumerate(item.labels)})
    lengths = {frames.shape[-1] for row in rows for frames in row.values()}
    if n_frames is not None:
        lengths.add(n_frames)
    if len(lengths) != 1:
        raise LossInputError(
            f"cannot tell L: frame label lengths {sorted(lengths)} (pass n_frames when no mixture has labels)"
        )
    (length,) = lengths
    out = np.zeros((len(rows), len(text_labels), length), dtype=bool)
    for i, row in enumerate(rows):
        for k, label in enumerate(text_labels):
            frames = row.get(label) if label else None
            if frames is not None:
                out[i, k] = frames
    return torch.from_numpy(out)
