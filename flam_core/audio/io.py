"""Reading, writing and resampling audio, whole or block by block.

Files are read with soundfile (libsndfile: WAV, FLAC, OGG/Vorbis, MP3); `torchaudio.load`
needs FFmpeg/torchcodec, which this project does not depend on. Resampling uses
`torchaudio.functional.resample` (windowed-sinc, deterministic on CPU), and scipy's polyphase
`resample_poly` for odd rates whose ratio barely reduces (22254 Hz), where torchaudio's kernel
would take gigabytes.

Memory stays bounded for audio of any length: `iter_audio_blocks` decodes a few seconds at a
time (never the length a header declares), downmixes each block in float32 and resamples it with
`StreamingResampler`, whose concatenated output equals `resample` of the whole signal.
`read_audio` is that stream concatenated.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import torch
from torchaudio.functional import resample as _torchaudio_resample
from torchaudio.transforms import Resample

from flam_core.errors import AudioError, AudioTooLongError

Pathlike = str | Path
AudioSource = str | Path | BinaryIO  # a path, or a binary file-like object (io.BytesIO, an open file)

DEFAULT_BLOCK_S = 10.0  # seconds of the file decoded at a time
MAX_BLOCK_SAMPLES = 1 << 21  # samples of all channels together in one decoded block (8 MB of float32)
# torchaudio's resampling kernel holds new/g x (orig/g + 2 x width) taps (g = gcd of the rates):
# 76k for 44.1 -> 16 kHz, 582k for 11025 -> 32000 Hz, but rates whose ratio barely reduces
# (22254 -> 16000 Hz: 89M taps; 44101 -> 16000 Hz: 706M) would need gigabytes and hours of
# compute. Those go through scipy's polyphase resampler instead (`resample_poly`: one windowed
# sinc of 20 x max(up, down) + 1 taps, ~28 multiply-adds per output sample and ~9 MB for
# 22254 -> 16000) up to MAX_POLYPHASE_TAPS; rates beyond that (44101 Hz: 882k taps, 35 MB to
# design the filter) are refused.
MAX_KERNEL_TAPS = 1 << 20
MAX_POLYPHASE_TAPS = 1 << 19
# torchaudio's resampling defaults, to size its kernel before building it.
_LOWPASS_FILTER_WIDTH = 6
_ROLLOFF = 0.99
# What soundfile raises on unreadable input (libsndfile errors, bad file objects, bad headers).
_DECODE_ERRORS = (sf.SoundFileError, RuntimeError, OSError, ValueError, TypeError)


def source_name(source: AudioSource) -> str:
    """How errors name an audio source: its path, a file object's name, else "audio stream"."""
    if isinstance(source, str | Path):
        return str(source)
    name = getattr(source, "name", None)
    return str(name) if isinstance(name, str | Path) else "audio stream"


def read_audio(
    path_or_file: AudioSource,
    sample_rate: int | None = None,
    mono: bool = True,
    max_duration_s: float | None = None,
) -> tuple[np.ndarray, int]:
    """Decode a file (path or binary file-like object) to float32 in [-1, 1].

    Returns `(samples, rate)`: `samples` is `[n]` when `mono` (channels averaged) else
    `[channels, n]`; `rate` is `sample_rate` when given (resampled), else the file's rate.
    Raises `AudioError` naming the file when it cannot be decoded, is empty or holds NaN/inf,
    and `AudioTooLongError` once more than `max_duration_s` seconds have been decoded.
    The samples are the blocks of `iter_audio_blocks` concatenated.
    """
    name = source_name(path_or_file)
    with _open(path_or_file, name) as handle:
        rate = int(handle.samplerate) if sample_rate is None else int(sample_rate)
        blocks = list(_decode(handle, name, rate, DEFAULT_BLOCK_S, max_duration_s, mono))
    return np.concatenate(blocks, axis=-1), rate


def iter_audio_blocks(
    path_or_file: AudioSource,
    sample_rate: int | None,
    block_s: float = DEFAULT_BLOCK_S,
    max_duration_s: float | None = None,
    mono: bool = True,
) -> Iterator[np.ndarray]:
    """Decode a file block by block: float32 `[n_i]` (mono) or `[channels, n_i]` at `sample_rate`.

    Each block of the file (`block_s` seconds, at most `MAX_BLOCK_SAMPLES` samples over all
    channels) is downmixed in float32 and resampled with `StreamingResampler`: the concatenated
    blocks equal decoding the whole file, downmixing and resampling it at once, and memory stays
    bounded at any length. Blocks may be empty. `sample_rate=None` keeps the file's rate.

    Raises `AudioError` naming the file when it cannot be decoded, holds no samples or holds
    NaN/inf (when the bad block is reached), and `AudioTooLongError` as soon as more than
    `max_duration_s` seconds are decoded: a header declaring more frames than the file holds
    never makes it allocate the declared size.
    """
    name = source_name(path_or_file)
    with _open(path_or_file, name) as handle:
        rate = int(handle.samplerate) if sample_rate is None else int(sample_rate)
        yield from _decode(handle, name, rate, block_s, max_duration_s, mono)


def _open(source: AudioSource, name: str) -> sf.SoundFile:
    try:
        return sf.SoundFile(str(source) if isinstance(source, str | Path) else source)
    except _DECODE_ERRORS as exc:
        raise AudioError(f"{name}: cannot decode audio ({exc})") from exc


def _decode(
    handle: sf.SoundFile,
    name: str,
    target_rate: int,
    block_s: float,
    max_duration_s: float | None,
    mono: bool,
) -> Iterator[np.ndarray]:
    """The blocks of an open file, downmixed (when `mono`) and resampled to `target_rate`."""
    if block_s <= 0:
        raise ValueError(f"block_s must be positive, got {block_s}")
    rate, channels = int(handle.samplerate), int(handle.channels)
    if rate <= 0 or channels <= 0:
        raise AudioError(f"{name}: cannot decode audio ({channels} channels at {rate} Hz)")
    try:
        resampler = StreamingResampler(rate, target_rate, channels=None if mono else channels)
    except ValueError as exc:
        raise AudioError(f"{name}: {exc}") from exc
    # Never more than one block in memory, whatever the header declares.
    block_frames = max(1, min(int(block_s * rate), MAX_BLOCK_SAMPLES // channels))
    limit = None if max_duration_s is None else max_duration_s * rate
    decoded = 0
    while True:
        try:
            block = handle.read(block_frames, dtype="float32", always_2d=True)
        except _DECODE_ERRORS as exc:
            raise AudioError(f"{name}: cannot decode audio after {decoded} frames ({exc})") from exc
        if len(block) == 0:
            break
        decoded += len(block)
        if limit is not None and decoded > limit:
            raise AudioTooLongError(
                f"{name}: audio lasts more than the limit of {max_duration_s:g} s; cut it into shorter files"
            )
        if not np.isfinite(block).all():
            raise AudioError(f"{name}: file holds NaN or infinite samples")
        # [frames, channels] -> [n] or [channels, n], float32 all the way.
        samples = block.mean(axis=1, dtype=np.float32) if mono else np.ascontiguousarray(block.T)
        yield resampler.push(samples)
    if decoded == 0:
        raise AudioError(f"{name}: file holds no samples")
    yield resampler.flush()


def to_mono(samples: np.ndarray) -> np.ndarray:
    """`[channels, n]` or `[n]` -> `[n]` float32 by averaging channels (in float32)."""
    if samples.ndim == 1:
        return samples.astype(np.float32, copy=False)
    return samples.mean(axis=0, dtype=np.float32)


def resample(samples: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Band-limited resampling along the last axis (float32 in, float32 out): torchaudio's
    windowed sinc, or scipy's polyphase filter for rates whose ratio does not reduce."""
    if orig_rate == new_rate:
        return samples.astype(np.float32, copy=False)
    if _needs_polyphase(int(orig_rate), int(new_rate)):
        return _polyphase(np.asarray(samples, dtype=np.float32), int(orig_rate), int(new_rate))
    tensor = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    out = _torchaudio_resample(tensor, orig_freq=int(orig_rate), new_freq=int(new_rate))
    return out.numpy()


def _reduced(orig_rate: int, new_rate: int) -> tuple[int, int]:
    gcd = math.gcd(orig_rate, new_rate)
    return orig_rate // gcd, new_rate // gcd


def _needs_polyphase(orig_rate: int, new_rate: int) -> bool:
    """Whether torchaudio's kernel for these rates is too big to build (MAX_KERNEL_TAPS); raises
    ValueError when even the polyphase filter is (MAX_POLYPHASE_TAPS)."""
    orig, new = _reduced(orig_rate, new_rate)
    width = math.ceil(_LOWPASS_FILTER_WIDTH * orig / (min(orig, new) * _ROLLOFF))
    if new * (orig + 2 * width) <= MAX_KERNEL_TAPS:
        return False
    if 2 * _POLYPHASE_HALF_WIDTH * max(orig, new) + 1 > MAX_POLYPHASE_TAPS:
        raise ValueError(
            f"cannot resample {orig_rate} Hz to {new_rate} Hz: the rate ratio does not reduce "
            f"({orig}/{new}); convert the file to a common rate (16, 44.1 or 48 kHz)"
        )
    return True


_POLYPHASE_HALF_WIDTH = 10  # scipy's resample_poly: the filter reaches 10 x max(up, down) taps each side


def _polyphase(samples: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    from scipy.signal import resample_poly

    orig, new = _reduced(orig_rate, new_rate)
    return resample_poly(samples, new, orig, axis=-1).astype(np.float32)


class StreamingResampler:
    """`torchaudio.functional.resample` of a signal that arrives in blocks of any length.

    torchaudio's windowed-sinc resampler maps each group of `orig/g` input samples (g the gcd of
    the rates) to `new/g` output samples, reading `width` samples of context on either side. Each
    `push` resamples the buffered input from `context` samples before the first group not yet
    output to the end of the last group whose right context has arrived (`context` a whole number
    of groups, so the groups stay aligned), and keeps the groups free of the slice's artificial
    edges. `flush` does the rest, with the true zero padding at the end. The concatenated outputs
    equal resampling the whole signal within float32 rounding; memory is one block plus context.
    Blocks are `[n]` (`channels=None`) or `[channels, n]` float32; time is the last axis.
    """

    def __init__(self, orig_rate: int, new_rate: int, channels: int | None = None) -> None:
        if orig_rate <= 0 or new_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {orig_rate} Hz -> {new_rate} Hz")
        self.orig_rate, self.new_rate, self.channels = int(orig_rate), int(new_rate), channels
        self.orig, self.new = _reduced(self.orig_rate, self.new_rate)
        self._resample = None
        width = 0
        if self.orig_rate != self.new_rate and _needs_polyphase(self.orig_rate, self.new_rate):
            # scipy's polyphase filter: output m depends on inputs within its half-width of
            # m x orig / new, and shifting the input by `orig` samples shifts the output by `new`,
            # so the same whole-group slicing applies.
            self._resample = lambda piece: _polyphase(piece, self.orig_rate, self.new_rate)
            width = math.ceil(_POLYPHASE_HALF_WIDTH * max(self.orig, self.new) / self.new) + 1
        elif self.orig_rate != self.new_rate:
            # `torchaudio.functional.resample`'s float32 kernel, computed once (costly for 441/320).
            kernel = Resample(self.orig_rate, self.new_rate, dtype=torch.float32)
            self._resample = lambda piece: kernel(torch.from_numpy(np.ascontiguousarray(piece))).numpy()
            width = kernel.width
        # Whole groups covering the kernel's reach (`width` before, `width + orig` after a group).
        self.context = math.ceil((width + self.orig) / self.orig) * self.orig
        self._buffer = self._empty()
        self._buffer_start = 0  # input index of the buffer's first sample (a multiple of `orig`)
        self._received = 0  # input samples pushed so far
        self._next_group = 0  # first group not yet output

    def push(self, block: np.ndarray) -> np.ndarray:
        """Append input samples; return the output samples that no later input can change."""
        block = np.asarray(block, dtype=np.float32)
        if self.orig_rate == self.new_rate:
            return block
        self._buffer = np.concatenate([self._buffer, block], axis=-1)
        self._received += block.shape[-1]
        end_group = (self._received - self.context) // self.orig + 1  # groups [next, end) are final
        if end_group <= self._next_group:
            return self._empty()
        stop = (end_group - 1) * self.orig + self.context
        out = self._resample_slice(stop, end_group)
        self._drop_consumed()
        return out

    def flush(self) -> np.ndarray:
        """The output left at the end of the signal (the whole signal's length: ceil(n x new / orig))."""
        if self.orig_rate == self.new_rate:
            return self._empty()
        out = self._resample_slice(self._received, None)
        self._buffer = self._empty()
        self._buffer_start = self._received
        return out

    def _resample_slice(self, stop: int, end_group: int | None) -> np.ndarray:
        start = max(0, self._next_group * self.orig - self.context)
        piece = self._buffer[..., start - self._buffer_start : stop - self._buffer_start]
        with torch.inference_mode():
            out = self._resample(piece)
        first = (self._next_group - start // self.orig) * self.new
        last = None if end_group is None else (end_group - start // self.orig) * self.new
        if end_group is not None:
            self._next_group = end_group
        return np.ascontiguousarray(out[..., first:last])

    def _drop_consumed(self) -> None:
        keep_from = max(0, self._next_group * self.orig - self.context)
        if keep_from > self._buffer_start:
            self._buffer = self._buffer[..., keep_from - self._buffer_start :].copy()
            self._buffer_start = keep_from

    def _empty(self) -> np.ndarray:
        return np.zeros((0,) if self.channels is None else (self.channels, 0), dtype=np.float32)


def write_flac(path: Pathlike, samples: np.ndarray, sample_rate: int) -> None:
    """Write mono float32 samples as 16-bit FLAC (values are clipped to [-1, 1])."""
    clipped = np.clip(samples, -1.0, 1.0)
    sf.write(str(path), clipped, sample_rate, format="FLAC", subtype="PCM_16")
