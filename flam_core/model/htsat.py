"""HTS-AT frame encoder (Chen et al., ICASSP 2022): a Swin transformer over a folded log-mel image.

The FLAM paper's audio encoder: 48 kHz audio, 64-bin log-mel (n_fft 1024, hop 480, 50-14000 Hz),
10 s windows of 1001 frames, 32 output frames per window (312.5 ms each).

Per `mixture_s` window:

1. log-mel (`LogMel`, always float32), BatchNorm over mel bins;
2. the time axis resampled (bicubic) to `spec_size * freq_ratio` frames and the mel axis to
   `spec_size // freq_ratio` bins, where `freq_ratio = spec_size // n_mels` (4 for 256 / 64);
3. HTS-AT's `reshape_wav2img`: the time axis cut into `freq_ratio` chunks stacked along
   frequency, giving a `spec_size x spec_size` image (rows: chunk-major frequency, columns: time
   within the chunk);
4. 4x4 patch embedding, Swin stages (shifted-window attention with relative position bias,
   patch merging between stages), final LayerNorm;
5. the token-semantic step: the final `G x G` token grid unfolded back to time (undoing step 3)
   and averaged over frequency, giving `freq_ratio * G` frames per window (32 for the defaults).

Clips of any length: the waveform is zero-padded to a whole number of `mixture_s` windows, the
windows are encoded as one batch and their frames concatenated, the frames that cover the clip
are kept, and those are resampled along time (linear up, average-pooled down) to
`n_frames(n_samples) = max(1, round(n_frames * n_samples / (mixture_s * sample_rate)))`. A short
clip is thus padded with silence rather than stretched, and a long one keeps the time scale the
model was trained on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from flam_core.audio.features import LogMel
from flam_core.config import FeatureParams
from flam_core.errors import ConfigError
from flam_core.model.base import AudioEncoder

PATCH = 4  # patch size and stride of the embedding convolution

_PRESETS: dict[str, dict] = {
    "tiny": {"embed_dim": 48, "depths": (1, 1, 2, 1), "heads": (2, 4, 8, 16)},
    "base": {"embed_dim": 96, "depths": (2, 2, 6, 2), "heads": (4, 8, 16, 32)},
}


def htsat_config(size: str) -> dict:
    """Keyword arguments of `HtsatEncoder` for a preset: `tiny` (CPU tests) or `base` (the paper's)."""
    if size not in _PRESETS:
        raise ConfigError(f"unknown HTSAT size {size!r}; allowed: {', '.join(_PRESETS)}")
    return dict(_PRESETS[size])


def fold_spectrogram(x: torch.Tensor, freq_ratio: int) -> torch.Tensor:
    """`[B, F, T]` -> `[B, 1, freq_ratio * F, T / freq_ratio]`: time chunks stacked along frequency."""
    b, f, t = x.shape
    x = x.reshape(b, f, freq_ratio, t // freq_ratio).permute(0, 2, 1, 3)
    return x.reshape(b, 1, freq_ratio * f, t // freq_ratio)


def unfold_tokens(x: torch.Tensor, freq_ratio: int) -> torch.Tensor:
    """`[B, C, H, W]` token grid of a folded image -> `[B, freq_ratio * W, C]` frames (mean over freq)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, freq_ratio, h // freq_ratio, w).permute(0, 1, 3, 2, 4)
    return x.reshape(b, c, h // freq_ratio, freq_ratio * w).mean(dim=2).transpose(1, 2)


def _resample_time(x: torch.Tensor, size: int) -> torch.Tensor:
    """`[B, T, C]` -> `[B, size, C]`: linear interpolation up, adaptive average pooling down."""
    if x.shape[1] == size:
        return x
    y = x.transpose(1, 2)
    if size < x.shape[1]:
        y = F.adaptive_avg_pool1d(y, size)
    else:
        y = F.interpolate(y, size=size, mode="linear", align_corners=False)
    return y.transpose(1, 2)


def _window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """`[B, H, W, C]` -> `[B, n_windows, window * window, C]`."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // window) * (w // window), window * window, c)


def _window_reverse(x: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """`[B, n_windows, window * window, C]` -> `[B, H, W, C]`."""
    b, c = x.shape[0], x.shape[-1]
    x = x.view(b, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


class DropPath(nn.Module):
    """Stochastic depth: drops the residual branch per sample while training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class WindowAttention(nn.Module):
    """Multi-head self-attention within windows, with a learned relative position bias."""

    def __init__(self, dim: int, window: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"))
        coords = coords.flatten(1)  # [2, N]
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # [N, N, 2]
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * window - 1) + rel[..., 1], False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """`x [B, n_windows, N, C]`, `mask [n_windows, N, N]` (0 or -100) or None."""
        b, nw, n, c = x.shape
        qkv = self.qkv(x).view(b, nw, n, 3, self.heads, c // self.heads).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv.unbind(0)  # [B, n_windows, heads, N, d]
        bias = self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)
        if mask is not None:
            bias = bias + mask[:, None]  # [n_windows, heads, N, N]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj_drop(self.proj(out.transpose(2, 3).reshape(b, nw, n, c)))


class SwinBlock(nn.Module):
    """(Shifted-)window attention and an MLP, each pre-norm with a residual connection."""

    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        heads: int,
        window: int,
        shift: int,
        dropout: float,
        drop_path: float,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.resolution = resolution
        if min(resolution) <= window:
            window, shift = min(resolution), 0
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads, dropout)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)
        mask = None
        if shift > 0:
            h, w = resolution
            regions = torch.zeros(1, h, w, 1)
            spans = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
            for i, (hs, ws) in enumerate((hs, ws) for hs in spans for ws in spans):
                regions[:, hs, ws, :] = i
            ids = _window_partition(regions, window)[0, :, :, 0]  # [n_windows, N]
            mask = (ids[:, None, :] != ids[:, :, None]).float() * -100.0
        self.register_buffer("attn_mask", mask, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h, w = self.resolution
        y = self.norm1(x).view(b, h, w, c)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(_window_partition(y, self.window), self.attn_mask)
        y = _window_reverse(y, self.window, h, w)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + self.drop_path(y.reshape(b, n, c))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbouring tokens concatenated and projected: `[B, H*W, C]` -> `[B, H*W/4, 2C]`."""

    def __init__(self, resolution: tuple[int, int], dim: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        h, w = self.resolution
        x = x.view(b, h, w, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class BasicLayer(nn.Module):
    """One Swin stage: blocks alternating plain and shifted windows, then optional patch merging."""

    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        depth: int,
        heads: int,
        window: int,
        dropout: float,
        drop_path: Sequence[float],
        downsample: bool,
    ) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList(
            SwinBlock(dim, resolution, heads, window, 0 if i % 2 == 0 else window // 2, dropout, drop_path[i])
            for i in range(depth)
        )
        self.downsample = PatchMerging(resolution, dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = _checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x if self.downsample is None else self.downsample(x)


class PatchEmbed(nn.Module):
    """Non-overlapping 4x4 patches of the one-channel image, projected and layer-normalised."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, embed_dim, kernel_size=PATCH, stride=PATCH)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))  # [B, H*W, C]


def _key_list(keys: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', ... (+{len(keys) - limit} more)' if len(keys) > limit else ''}]"


class HtsatEncoder(AudioEncoder):
    """HTS-AT: waveform `[B, n_samples]` -> frame features `[B, n_frames(n_samples), out_dim]`.

    `out_dim = embed_dim * 2 ** (len(depths) - 1)` (768 for the base preset).
    """

    def __init__(
        self,
        features: FeatureParams,
        sample_rate: int,
        mixture_s: float = 10.0,
        n_frames: int = 32,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        heads: Sequence[int] = (4, 8, 16, 32),
        window: int = 8,
        spec_size: int = 256,
        dropout: float = 0.0,
        drop_path: float = 0.1,
        checkpoint: str | Path | None = None,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        depths, heads = tuple(depths), tuple(heads)
        n_stages = len(depths)
        if n_stages == 0 or len(heads) != n_stages:
            raise ConfigError(f"HTSAT: depths {depths} and heads {heads} must be non-empty, of equal length")
        freq_ratio = spec_size // features.n_mels
        if freq_ratio < 1:
            raise ConfigError(f"HTSAT: n_mels ({features.n_mels}) must not exceed spec_size ({spec_size})")
        grid = spec_size // PATCH
        if spec_size % (PATCH * 2 ** (n_stages - 1)):
            raise ConfigError(f"HTSAT: spec_size {spec_size} not divisible by {PATCH * 2 ** (n_stages - 1)}")
        final = grid // 2 ** (n_stages - 1)
        if final % freq_ratio:
            raise ConfigError(
                f"HTSAT: the final {final}x{final} token grid cannot unfold into {freq_ratio} time chunks "
                f"(spec_size {spec_size}, n_mels {features.n_mels})"
            )
        for i in range(n_stages):
            res = grid // 2**i
            if res % min(window, res):
                raise ConfigError(f"HTSAT: window {window} does not tile the {res}x{res} grid of stage {i}")
            if (embed_dim * 2**i) % heads[i]:
                raise ConfigError(f"HTSAT: stage {i} width {embed_dim * 2**i} not divisible by {heads[i]}")
        if mixture_s <= 0 or n_frames < 1:
            raise ConfigError(f"HTSAT: mixture_s ({mixture_s}) and n_frames ({n_frames}) must be positive")

        self.features = features
        self.sample_rate = sample_rate
        self.mixture_s = mixture_s
        self.frames_per_mixture = n_frames
        self.window_samples = int(round(mixture_s * sample_rate))
        self.freq_ratio = freq_ratio
        self.spec_shape = (spec_size // freq_ratio, spec_size * freq_ratio)  # (mel bins, frames) resampled
        self.tokens_per_window = final * freq_ratio
        self.out_dim = embed_dim * 2 ** (n_stages - 1)

        self.front_end = LogMel(features, sample_rate)
        self.bn0 = nn.BatchNorm1d(features.n_mels)
        self.patch_embed = PatchEmbed(embed_dim)
        self.pos_drop = nn.Dropout(dropout)
        rates = torch.linspace(0, drop_path, sum(depths)).tolist()
        self.layers = nn.ModuleList(
            BasicLayer(
                dim=embed_dim * 2**i,
                resolution=(grid // 2**i, grid // 2**i),
                depth=depths[i],
                heads=heads[i],
                window=window,
                dropout=dropout,
                drop_path=rates[sum(depths[:i]) : sum(depths[: i + 1])],
                downsample=i < n_stages - 1,
            )
            for i in range(n_stages)
        )
        self.norm = nn.LayerNorm(self.out_dim)
        self.apply(self._init_weights)
        self.set_grad_checkpointing(grad_checkpointing)
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each Swin block in the backward pass (less activation memory while training)."""
        for layer in self.layers:
            layer.grad_checkpointing = enabled

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        fb = self.front_end.mel.mel_scale.fb
        if fb.dtype != torch.float32:  # the log-mel front end stays float32 whatever the module dtype
            self.front_end = LogMel(self.features, self.sample_rate).to(fb.device)
        return self

    def load_checkpoint(self, path: str | Path) -> None:
        """Load a state dict saved from an encoder of the same configuration (strict)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"HTSAT checkpoint {path} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ConfigError(f"HTSAT checkpoint {path} cannot be read: {exc}") from exc
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ConfigError(f"HTSAT checkpoint {path} holds a {type(state).__name__}, not a state dict")
        own = self.state_dict()
        missing = sorted(own.keys() - state.keys())
        unexpected = sorted(state.keys() - own.keys())
        mismatched = sorted(
            f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
            for k in own.keys() & state.keys()
            if not isinstance(state[k], torch.Tensor) or state[k].shape != own[k].shape
        )
        if missing or unexpected or mismatched:
            raise ConfigError(
                f"HTSAT checkpoint {path} does not fit this encoder: missing keys {_key_list(missing)}, "
                f"unexpected keys {_key_list(unexpected)}, shape mismatches {_key_list(mismatched)}"
            )
        self.load_state_dict(state, strict=True)

    def n_frames(self, n_samples: int) -> int:
        return max(1, round(self.frames_per_mixture * n_samples / (self.mixture_s * self.sample_rate)))

    def _encode_windows(self, waveform: torch.Tensor) -> torch.Tensor:
        """`[N, window_samples]` -> `[N, tokens_per_window, out_dim]`."""
        dtype = self.patch_embed.proj.weight.dtype
        with torch.autocast(device_type=waveform.device.type, enabled=False):
            log_mel = self.front_end(waveform.float())  # [N, M, T]
        x = self.bn0(log_mel.to(dtype))
        if tuple(x.shape[1:]) != self.spec_shape:
            x = F.interpolate(x.unsqueeze(1), size=self.spec_shape, mode="bicubic", align_corners=True)[:, 0]
        x = self.pos_drop(self.patch_embed(fold_spectrogram(x, self.freq_ratio)))
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)  # [N, G*G, C]
        g = math.isqrt(x.shape[1])
        return unfold_tokens(x.transpose(1, 2).reshape(x.shape[0], -1, g, g), self.freq_ratio)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        if waveform.dim() != 2:
            raise ValueError(f"HtsatEncoder expects a [B, n_samples] waveform, got {tuple(waveform.shape)}")
        b, n = waveform.shape
        win = self.window_samples
        k = max(1, math.ceil(n / win))
        if k * win != n:
            waveform = F.pad(waveform, (0, k * win - n))
        frames = self._encode_windows(waveform.reshape(b * k, win))
        per_window = self.tokens_per_window
        frames = frames.reshape(b, k * per_window, -1)
        keep = min(k * per_window, max(1, round(per_window * n / win)))
        return _resample_time(frames[:, :keep], self.n_frames(n))
