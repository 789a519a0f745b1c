"""Reading, writing and resampling audio.

Files are read with soundfile (libsndfile: WAV, FLAC, OGG/Vorbis, MP3); `torchaudio.load`
needs FFmpeg/torchcodec, which this project does not depend on. Resampling uses
`torchaudio.functional.resample` (windowed-sinc, deterministic on CPU).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torchaudio.functional import resample as _torchaudio_resample

from flam_core.errors import AudioError

Pathlike = str | Path


def read_audio(path: Pathlike, sample_rate: int | None = None, mono: bool = True) -> tuple[np.ndarray, int]:
    """Decode `path` to float32 in [-1, 1].

    Returns `(samples, rate)`: `samples` is `[n]` when `mono` (channels averaged) else
    `[channels, n]`; `rate` is `sample_rate` when given (resampled), else the file's rate.
    Raises `AudioError` naming the file when it cannot be decoded, is empty or holds NaN/inf.
    """
    path = Path(path)
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as exc:
        raise AudioError(f"{path}: cannot decode audio ({exc})") from exc
    if data.shape[0] == 0:
        raise AudioError(f"{path}: file holds no samples")
    if not np.isfinite(data).all():
        raise AudioError(f"{path}: file holds NaN or infinite samples")
    samples = to_mono(data.T) if mono else np.ascontiguousarray(data.T)
    if sample_rate is not None and sample_rate != rate:
        samples = resample(samples, rate, sample_rate)
        rate = sample_rate
    return samples, int(rate)


def to_mono(samples: np.ndarray) -> np.ndarray:
    """`[channels, n]` or `[n]` -> `[n]` float32 by averaging channels."""
    if samples.ndim == 1:
        return samples.astype(np.float32, copy=False)
    return samples.mean(axis=0, dtype=np.float64).astype(np.float32)


def resample(samples: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Band-limited resampling along the last axis (float32 in, float32 out)."""
    if orig_rate == new_rate:
        return samples.astype(np.float32, copy=False)
    tensor = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    out = _torchaudio_resample(tensor, orig_freq=int(orig_rate), new_freq=int(new_rate))
    return out.numpy()


def write_flac(path: Pathlike, samples: np.ndarray, sample_rate: int) -> None:
    """Write mono float32 samples as 16-bit FLAC (values are clipped to [-1, 1])."""
    clipped = np.clip(samples, -1.0, 1.0)
    sf.write(str(path), clipped, sample_rate, format="FLAC", subtype="PCM_16")
