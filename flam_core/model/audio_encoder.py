"""Audio frame encoders: waveform `[B, n_samples]` -> frame features `[B, L, out_dim]`.

- `yamnet`: the AudioSet-pretrained YAMNet (MobileNet-v1) run fully convolutionally over the
  whole log-mel, so a 10 s clip at 16 kHz gives 32 frames of 1024 features (stride 0.32 s,
  the paper's 312.5 ms resolution). Frozen in the CPU profile, where its features are cached.
- `cnn`: a small convolutional encoder trained from scratch on the project's log-mel
  (`features` params), with the same total time stride of 32 log-mel frames.

Both give `ceil(n_log_mel_frames / 32)` frames; `frames.n_frames` must equal that for a
mixture (32 for 10 s at 16 kHz), which `build_audio_encoder` checks.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from flam_core.audio.features import LogMel
from flam_core.config import FeatureParams
from flam_core.errors import ConfigError


class AudioEncoder(nn.Module):
    """Base class: `forward(waveform [B, n]) -> [B, L, out_dim]`."""

    out_dim: int
    sample_rate: int

    def n_frames(self, n_samples: int) -> int:
        raise NotImplementedError


class YamnetEncoder(AudioEncoder):
    """YAMNet's front end and convolutional stack, without its patching and classifier."""

    out_dim = 1024
    sample_rate = 16000

    def __init__(self, weights: str | None = None, frozen: bool = True) -> None:
        super().__init__()
        from flam_core.model.yamnet import load_yamnet

        self.yamnet = load_yamnet(weights)
        self.frozen = frozen
        if frozen:
            self.yamnet.requires_grad_(False)
            self.yamnet.eval()

    def train(self, mode: bool = True) -> YamnetEncoder:
        super().train(mode)
        if self.frozen:
            self.yamnet.eval()  # frozen batch-norm statistics
        return self

    def n_frames(self, n_samples: int) -> int:
        return math.ceil((1 + (n_samples - 400) // 160) / 32)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        from flam_core.model.yamnet import yamnet_log_mel

        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            log_mel = yamnet_log_mel(waveform, compute_dtype=torch.float32)
            return self.yamnet.frame_features(log_mel)


class CnnEncoder(AudioEncoder):
    """Five conv blocks (3x3, BN, ReLU, 2x2 pooling) over log-mel, time stride 32, then a linear."""

    def __init__(
        self, features: FeatureParams, sample_rate: int, width: int = 32, out_dim: int = 256
    ) -> None:
        super().__init__()
        self.sample_rate = sample_rate
        self.out_dim = out_dim
        self.front_end = LogMel(features, sample_rate)
        self.hop = int(round(features.hop_s * sample_rate))
        channels = [1, width, 2 * width, 4 * width, 4 * width, 8 * width]
        blocks = []
        for c_in, c_out in itertools.pairwise(channels):
            blocks += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
        self.blocks = nn.Sequential(*blocks)
        self.proj = nn.Linear(channels[-1], out_dim)

    def n_frames(self, n_samples: int) -> int:
        frames = n_samples // self.hop + 1
        for _ in range(5):
            frames = math.ceil(frames / 2)
        return frames

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        log_mel = self.front_end(waveform)  # [B, M, F]
        x = self.blocks(log_mel.unsqueeze(1))  # [B, C, M/32, F/32]
        return self.proj(x.mean(dim=2).transpose(1, 2))  # [B, L, out_dim]


def build_audio_encoder(
    name: str, features: FeatureParams, sample_rate: int, n_frames: int, mixture_s: float, frozen: bool = True
) -> AudioEncoder:
    """The encoder named in params, checked against the label frame grid."""
    if name == "yamnet":
        if sample_rate != YamnetEncoder.sample_rate:
            raise ConfigError(f"model.audio_encoder=yamnet needs audio.sample_rate=16000 (got {sample_rate})")
        encoder: AudioEncoder = YamnetEncoder(frozen=frozen)
    elif name == "cnn":
        encoder = CnnEncoder(features, sample_rate)
    else:
        raise ConfigError(f"model.audio_encoder: unknown encoder {name!r}; allowed: yamnet, cnn")
    produced = encoder.n_frames(int(round(mixture_s * sample_rate)))
    if produced != n_frames:
        raise ConfigError(
            f"frames.n_frames={n_frames} but the {name} encoder gives {produced} frames "
            f"per {mixture_s} s mixture"
        )
    return encoder
