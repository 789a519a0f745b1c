"""Log-mel features with torchaudio (the audio encoder's front end)."""

from __future__ import annotations

import torch
import torchaudio

from flam_core.config import FeatureParams


class LogMel(torch.nn.Module):
    """`[..., n_samples]` float waveform -> `[..., n_mels, n_frames]` log(mel magnitude + offset).

    Magnitude (not power) spectra on an HTK mel scale, as YAMNet's front end computes them.

    Frames are centred every `hop_s`; with the defaults a 10 s clip at 16 kHz gives
    64 x 1001 features.
    """

    def __init__(self, params: FeatureParams, sample_rate: int) -> None:
        super().__init__()
        win = int(round(params.win_s * sample_rate))
        n_fft = 1 << (win - 1).bit_length()
        self.offset = params.log_offset
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate,
            n_fft=n_fft,
            win_length=win,
            hop_length=int(round(params.hop_s * sample_rate)),
            f_min=params.f_min,
            f_max=min(params.f_max, sample_rate / 2),
            n_mels=params.n_mels,
            power=1.0,
            mel_scale="htk",
            center=True,
        )

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        # Always float32: a model cast to bf16 (DeepSpeed) casts these buffers too; STFT needs fp32.
        mel = self.mel.float()
        return torch.log(mel(waveform.float()) + self.offset)
