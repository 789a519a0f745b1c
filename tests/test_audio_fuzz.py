"""Fuzzing `read_audio`: any bytes give finite float32 mono samples or an AudioError, in bounded memory.

Inputs: random bytes, real WAV/FLAC/OGG encodings cut short or with flipped bytes, WAV headers
declaring odd rates (1 Hz, 384 kHz, rates that do not reduce against 16 kHz), 0 to hundreds of
channels and data lengths up to 4 GB over a few kilobytes of data, and a FLAC whose STREAMINFO
declares 2^36 samples. Every call passes `max_duration_s`, and the traced peak (numpy buffers,
soundfile's blocks) must stay far below what the headers declare.
"""

from __future__ import annotations

import functools
import io
import struct
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import scipy.signal  # noqa: F401 - imported here: its import, not decoding, would count below (odd rates)
import soundfile as sf
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from flam_core.audio.io import read_audio
from flam_core.errors import AudioError

RATE = 16000
LIMIT_S = 30.0
# Output (30 s at 16 kHz, twice while concatenating) + one decoded block (2^21 samples): ~12 MB.
# Decoding any header's declared length would take gigabytes.
PEAK_BYTES = 32 << 20
FUZZ = settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def read_within_contract(source: io.BytesIO | Path) -> np.ndarray | None:
    """`read_audio` at 16 kHz: finite float32 `[n]` within the limit, or None for an AudioError."""
    tracemalloc.start()
    try:
        samples, rate = read_audio(source, RATE, max_duration_s=LIMIT_S)
    except AudioError:
        return None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < PEAK_BYTES, f"read_audio traced {peak / 1e6:.1f} MB"
    assert rate == RATE and samples.dtype == np.float32 and samples.ndim == 1
    assert 0 < len(samples) <= LIMIT_S * RATE + 1 and np.isfinite(samples).all()
    return samples


@functools.cache
def encodings() -> dict[str, bytes]:
    """0.4 s of a stereo tone + noise at 22.05 kHz, encoded as WAV, FLAC and OGG/Vorbis."""
    rate = 22050
    t = np.arange(int(0.4 * rate)) / rate
    noise = np.random.default_rng(0).standard_normal(len(t))
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 440 * t), 0.05 * noise], axis=1).astype(np.float32)
    out = {}
    for fmt, subtype in (("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("OGG", "VORBIS")):
        buffer = io.BytesIO()
        sf.write(buffer, stereo, rate, format=fmt, subtype=subtype)
        out[fmt] = buffer.getvalue()
    return out


def wav_header(rate: int, channels: int, bits: int, declared_bytes: int) -> bytes:
    """A PCM WAV header whose data chunk declares `declared_bytes` (32-bit fields wrap)."""
    block_align = channels * bits // 8
    fmt = struct.pack(
        "<HHIIHH", 1, channels, rate, (rate * block_align) & 0xFFFFFFFF, block_align & 0xFFFF, bits
    )
    riff = struct.pack("<I", min(0xFFFFFFFF, 36 + declared_bytes))
    return (
        b"RIFF"
        + riff
        + b"WAVEfmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + struct.pack("<I", declared_bytes)
    )


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(data):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "random.wav"
        path.write_bytes(data)
        read_within_contract(path)
    read_within_contract(io.BytesIO(data))


@FUZZ
@given(
    st.sampled_from(["WAV", "FLAC", "OGG"]),
    st.floats(0.0, 1.0),
    st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 255)), max_size=4),
)
def test_truncated_and_damaged_encodings(fmt, keep, flips):
    data = bytearray(encodings()[fmt][: int(len(encodings()[fmt]) * keep)])
    for where, value in flips if data else []:
        data[int(where * len(data))] = value
    samples = read_within_contract(io.BytesIO(bytes(data)))
    if samples is not None:
        assert len(samples) <= 0.4 * RATE + 1  # never more than the real data


@FUZZ
@given(
    rate=st.sampled_from([1, 2, 7919, 44101, 384000, 2**31 - 1]) | st.integers(1, 400_000),
    channels=st.sampled_from([0, 1, 2, 64, 1024]) | st.integers(0, 300),
    bits=st.sampled_from([8, 16, 24, 32]),
    declared=st.sampled_from([0, 1, 1 << 20, 0x7FFFFFFF, 0xFFFFFFF0]) | st.integers(0, 2**32 - 1),
    data=st.binary(max_size=4096),
)
@example(rate=1, channels=1, bits=16, declared=0xFFFFFFF0, data=bytes(4096))  # 2048 s: too long
@example(rate=384_000, channels=1, bits=16, declared=0xFFFFFFF0, data=b"\x10\x20" * 2048)
@example(rate=16000, channels=0, bits=16, declared=4096, data=bytes(4096))
@example(rate=16000, channels=64, bits=16, declared=0x7FFFFFFF, data=b"\x01\x02" * 2048)
@example(rate=44101, channels=2, bits=16, declared=4096, data=bytes(4096))  # ratio does not reduce
def test_wav_headers_with_odd_rates_channels_and_lengths(rate, channels, bits, declared, data):
    samples = read_within_contract(io.BytesIO(wav_header(rate, channels, bits, declared) + data))
    if samples is not None:
        real_frames = len(data) // max(1, channels * bits // 8)
        assert len(samples) <= real_frames * RATE / rate + RATE  # bounded by the real data


@FUZZ
@given(total=st.sampled_from([1, 2**20, 2**36 - 1]) | st.integers(1, 2**36 - 1))
def test_flac_declaring_a_huge_length(total):
    data = bytearray(encodings()["FLAC"])
    # 'fLaC', a 4-byte block header, then STREAMINFO: 10 bytes of block and frame sizes, then 64
    # bits of rate (20), channels (3), depth (5) and total samples (36): bytes 18..25.
    field = int.from_bytes(data[21:26], "big")
    data[21:26] = ((field & ~(2**36 - 1)) | total).to_bytes(5, "big")
    samples = read_within_contract(io.BytesIO(bytes(data)))
    if samples is not None:
        assert len(samples) <= 0.4 * RATE + 1
