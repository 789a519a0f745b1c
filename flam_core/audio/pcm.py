"""Audio that arrives as a byte stream (a pipe, a socket, stdin): raw PCM or a WAV stream.

`pcm_blocks` reads raw interleaved samples (`s16le`: 16-bit signed little-endian integers,
`f32le`: 32-bit little-endian floats) of a stated rate and channel count. `wav_stream` reads a
WAV file from a stream that cannot seek, with the standard library's `wave` module (it reads the
header in order and never seeks on a pipe); a stream whose length was unknown when its header was
written (a data size of 0 or 0xFFFFFFFF, as `ffmpeg` and `sox` write to a pipe) is read to its
end. Integer PCM of 8, 16, 24 or 32 bits. Both yield `[channels, n]` float32 blocks in [-1, 1) as
soon as the stream gives them (`read1`: whatever has arrived, up to a block), so a live source
is passed on without waiting for a full block.
"""

from __future__ import annotations

import wave
from collections.abc import Iterator
from typing import BinaryIO, Literal

import numpy as np

from flam_core.errors import AudioError

RawFormat = Literal["s16le", "f32le"]
RAW_FORMATS: dict[str, np.dtype] = {"s16le": np.dtype("<i2"), "f32le": np.dtype("<f4")}
BLOCK_S = 0.1  # seconds of audio asked of the stream at a time
MAX_RATE = 384_000
MAX_CHANNELS = 64


def check_stream_format(rate: int, channels: int) -> None:
    if not (isinstance(rate, int) and 1000 <= rate <= MAX_RATE):
        raise AudioError(f"the sample rate must be 1000-{MAX_RATE} Hz, got {rate!r}")
    if not (isinstance(channels, int) and 1 <= channels <= MAX_CHANNELS):
        raise AudioError(f"the channel count must be 1-{MAX_CHANNELS}, got {channels!r}")


def _read(stream: BinaryIO, n: int) -> bytes:
    """Up to `n` bytes: what has arrived (at least one byte), or b"" at the end of the stream."""
    read1 = getattr(stream, "read1", None)
    return read1(n) if read1 is not None else stream.read(n)


def _frames(data: bytes, dtype: np.dtype, channels: int, scale: float) -> np.ndarray:
    samples = np.frombuffer(data, dtype=dtype).astype(np.float32)
    if scale != 1.0:
        samples *= np.float32(1.0 / scale)
    return samples.reshape(-1, channels).T


def pcm_blocks(stream: BinaryIO, fmt: RawFormat, rate: int, channels: int) -> Iterator[np.ndarray]:
    """`[channels, n]` float32 blocks of raw interleaved PCM; a stream that ends inside a sample
    frame is an `AudioError` (the bytes do not fit the stated format)."""
    if fmt not in RAW_FORMATS:
        raise AudioError(f"raw format must be one of {list(RAW_FORMATS)}, got {fmt!r}")
    check_stream_format(rate, channels)
    dtype = RAW_FORMATS[fmt]
    frame = dtype.itemsize * channels
    want = max(frame, int(BLOCK_S * rate) * frame)
    scale = 32768.0 if fmt == "s16le" else 1.0
    pending = b""
    total = 0
    while chunk := _read(stream, want):
        pending += chunk
        total += len(chunk)
        whole = len(pending) - len(pending) % frame
        if whole:
            block = _frames(pending[:whole], dtype, channels, scale)
            pending = pending[whole:]
            if not np.isfinite(block).all():
                raise AudioError("the stream holds NaN or infinite samples")
            yield block
    if pending:
        raise AudioError(
            f"the stream ended inside a sample frame: {total} bytes are not a whole number of "
            f"{channels}-channel {fmt} frames ({frame} bytes each); check --format and --channels"
        )


def wav_stream(stream: BinaryIO) -> tuple[int, int, Iterator[np.ndarray]]:
    """(sample rate, channels, `[channels, n]` float32 blocks) of a WAV stream."""
    head = b""
    while len(head) < 12 and (more := stream.read(12 - len(head))):
        head += more
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise AudioError(
            f"not a WAV stream (it starts with {head[:12]!r}); for raw samples give --format s16le or f32le"
        )
    # The RIFF size of a stream is often 0 or wrong: `wave` is given an unbounded one.
    stream = _Prefixed(b"RIFF\xff\xff\xff\xffWAVE", stream)
    try:
        reader = wave.open(stream, "rb")  # noqa: SIM115 - its frames are read by the generator
    except (wave.Error, EOFError) as exc:
        raise AudioError(f"not a WAV stream ({exc}); for raw samples give --format s16le or f32le") from None
    rate, channels, width = reader.getframerate(), reader.getnchannels(), reader.getsampwidth()
    check_stream_format(rate, channels)
    if width not in (1, 2, 3, 4):
        raise AudioError(f"WAV sample width of {width} bytes is not supported (8, 16, 24 or 32-bit PCM)")

    frame = width * channels
    declared = reader.getnframes() * frame
    unknown = declared == 0 or declared >= 0xFFFFFFFF - frame  # a header written before the end

    def blocks() -> Iterator[np.ndarray]:
        # `wave` stops reading at the start of the data: the samples are read from the stream
        # itself, as they arrive, up to the declared size (to the end when it is unknown).
        want = max(frame, int(BLOCK_S * rate) * frame)
        left = None if unknown else declared
        pending = b""
        while left is None or left > 0:
            chunk = _read(stream, want if left is None else min(want, left))
            if not chunk:
                break
            if left is not None:
                left -= len(chunk)
            pending += chunk
            whole = len(pending) - len(pending) % frame
            if whole:
                yield _decode(pending[:whole], width, channels)
                pending = pending[whole:]

    return rate, channels, blocks()


class _Prefixed:
    """A byte stream with `prefix` read before it (the RIFF header, rewritten)."""

    def __init__(self, prefix: bytes, stream: BinaryIO) -> None:
        self.prefix, self.stream = prefix, stream

    def read(self, n: int = -1) -> bytes:
        if self.prefix:
            out, self.prefix = (self.prefix, b"") if n < 0 else (self.prefix[:n], self.prefix[n:])
            return out
        return self.stream.read(n)

    def read1(self, n: int = -1) -> bytes:
        return self.read(n) if self.prefix else _read(self.stream, n)


def _decode(data: bytes, width: int, channels: int) -> np.ndarray:
    """Little-endian integer PCM (8-bit unsigned, 16/24/32-bit signed) -> `[channels, n]` float32."""
    if width == 1:
        samples = (np.frombuffer(data, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 3:
        raw = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        value = raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)
        samples = (np.where(value >= 1 << 23, value - (1 << 24), value) / float(1 << 23)).astype(np.float32)
    else:
        dtype = np.dtype("<i2") if width == 2 else np.dtype("<i4")
        samples = np.frombuffer(data, dtype=dtype).astype(np.float32) / float(1 << (8 * width - 1))
    return samples.reshape(-1, channels).T
