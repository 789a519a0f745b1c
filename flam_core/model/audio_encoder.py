"""Audio frame encoders: waveform `[B, n_samples]` -> frame features `[B, L, out_dim]`.

- `yamnet`: the AudioSet-pretrained YAMNet (MobileNet-v1) run fully convolutionally over the
  whole log-mel, so a 10 s clip at 16 kHz gives 32 frames of 1024 features (stride 0.32 s,
  the paper's 312.5 ms resolution). Frozen in the CPU profile, where its features are cached.
- `cnn`: a small convolutional encoder trained from scratch on the project's log-mel
  (`features` params), with the same total time stride of 32 log-mel frames.
- `htsat`: the HTSAT Swin-transformer frame encoder of the paper (`flam_core.model.htsat`),
  32 frames per 10 s window, for the GPU profile (random init or `model.audio_checkpoint`).

Both give `ceil(n_log_mel_frames / 32)` frames; `frames.n_frames` must equal that for a
mixture (32 for 10 s at 16 kHz), which `build_audio_encoder` checks.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from flam_core.audio.features import LogMel
from flam_core.config import FeatureParams, Params
from flam_core.errors import ConfigError
from flam_core.model.base import AudioEncoder


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

        dtype = next(self.yamnet.parameters()).dtype
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            # the front end in float32 whatever the weights' dtype (bf16 on GPUs)
            log_mel = yamnet_log_mel(waveform.float(), compute_dtype=torch.float32)
            return self.yamnet.frame_features(log_mel.to(dtype))


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
        log_mel = self.front_end(waveform.float())  # [B, M, F], float32 STFT
        x = self.blocks(log_mel.unsqueeze(1).to(self.proj.weight.dtype))  # [B, C, M/32, F/32]
        return self.proj(x.mean(dim=2).transpose(1, 2))  # [B, L, out_dim]


def build_audio_encoder(
    name: str,
    features: FeatureParams,
    sample_rate: int,
    n_frames: int,
    mixture_s: float,
    frozen: bool = True,
    htsat_size: str = "base",
    checkpoint: str | None = None,
) -> AudioEncoder:
    """The encoder named in params, checked against the label frame grid."""
    if name == "yamnet":
        if sample_rate != YamnetEncoder.sample_rate:
            raise ConfigError(f"model.audio_encoder=yamnet needs audio.sample_rate=16000 (got {sample_rate})")
        encoder: AudioEncoder = YamnetEncoder(frozen=frozen)
    elif name == "cnn":
        encoder = CnnEncoder(features, sample_rate)
    elif name == "htsat":
        from flam_core.model.htsat import HtsatEncoder, htsat_config

        encoder = HtsatEncoder(
            features, sample_rate, mixture_s, n_frames, checkpoint=checkpoint, **htsat_config(htsat_size)
        )
        if frozen:
            encoder.requires_grad_(False)
    else:
        raise ConfigError(f"model.audio_encoder: unknown encoder {name!r}; allowed: yamnet, cnn, htsat")
    produced = encoder.n_frames(int(round(mixture_s * sample_rate)))
    if produced != n_frames:
        raise ConfigError(
            f"frames.n_frames={n_frames} but the {name} encoder gives {produced} frames "
            f"per {mixture_s} s mixture"
        )
    return encoder


def audio_encoder_from_params(params: Params, frozen: bool | None = None) -> AudioEncoder:
    """`build_audio_encoder` with everything from params (`frozen` defaults to model.frozen_audio)."""
    model = params.model
    return build_audio_encoder(
        model.audio_encoder,
        params.features,
        params.audio.sample_rate,
        params.frames.n_frames,
        params.synth.mixture_s,
        frozen=model.frozen_audio if frozen is None else frozen,
        htsat_size=model.htsat_size,
        checkpoint=model.audio_checkpoint,
    )
