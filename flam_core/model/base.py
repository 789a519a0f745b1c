"""What every audio frame encoder is, apart from any one of them (`audio_encoder`, `htsat`)."""

from __future__ import annotations

from torch import nn


class AudioEncoder(nn.Module):
    """Base class: `forward(waveform [B, n]) -> [B, L, out_dim]`."""

    out_dim: int
    sample_rate: int

    def n_frames(self, n_samples: int) -> int:
        raise NotImplementedError
