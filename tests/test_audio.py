import io
import tracemalloc

import numpy as np
import pytest
import soundfile as sf

from flam_core.audio.activity import (
    a_weighted_level_db,
    a_weighting_gain,
    active_spans,
    merge_close_spans,
)
from flam_core.audio.io import StreamingResampler, iter_audio_blocks, read_audio, resample, write_flac
from flam_core.errors import AudioError, AudioTooLongError
from tests.test_audio_fuzz import wav_header

SR = 16000


def tone(freq: float, seconds: float, amplitude: float = 0.5, rate: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_a_weighting_matches_the_standard_at_reference_frequencies():
    # IEC 61672 A-weighting: 0 dB at 1 kHz, -19.1 dB at 100 Hz, -1.1 dB at 10 kHz (+-0.1).
    gains_db = 20 * np.log10(a_weighting_gain(np.array([100.0, 1000.0, 10000.0])))
    assert gains_db == pytest.approx([-19.1, 0.0, -2.5], abs=0.1)


def test_level_of_a_full_scale_1khz_sine_is_minus_3_dbfs():
    level = a_weighted_level_db(tone(1000, 1.0, amplitude=1.0), SR)
    assert np.median(level) == pytest.approx(-3.01, abs=0.05)


def test_low_frequencies_read_quieter_than_1khz_at_equal_rms():
    assert (
        np.median(a_weighted_level_db(tone(100, 1.0), SR))
        < np.median(a_weighted_level_db(tone(1000, 1.0), SR)) - 15
    )


def test_spans_match_a_clip_with_known_silence():
    rng = np.random.default_rng(0)
    clip = np.zeros(4 * SR, dtype=np.float32)
    truth = [(0.50, 1.25), (2.00, 2.40), (3.10, 3.90)]
    for onset, offset in truth:
        a, b = int(onset * SR), int(offset * SR)
        clip[a:b] = 0.3 * rng.standard_normal(b - a)
    clip[int(2.0 * SR) : int(2.4 * SR)] = tone(1500, 0.4, 0.05)  # 16 dB quieter, still active
    spans = active_spans(clip, SR, threshold_db=-35.0, merge_gap_s=0.1)
    assert spans.shape == (3, 2)
    np.testing.assert_allclose(spans, truth, atol=0.02)


def test_spans_exclude_a_segment_below_threshold_and_merge_short_gaps():
    clip = np.concatenate(
        [tone(1000, 0.5), np.zeros(SR // 20, np.float32), tone(1000, 0.5), tone(1000, 0.5, 0.001)]
    )
    spans = active_spans(clip, SR, threshold_db=-35.0, merge_gap_s=0.1)
    # The 50 ms gap is bridged; the last 0.5 s is -54 dB re peak: inactive.
    np.testing.assert_allclose(spans, [[0.0, 1.05]], atol=0.02)
    unmerged = active_spans(clip, SR, threshold_db=-35.0, merge_gap_s=0.0)
    assert len(unmerged) == 2


def test_silent_and_empty_clips_have_no_spans():
    assert active_spans(np.zeros(SR, np.float32), SR).shape == (0, 2)
    assert active_spans(np.zeros(0, np.float32), SR).shape == (0, 2)


def test_spans_are_gain_invariant():
    rng = np.random.default_rng(1)
    clip = np.zeros(2 * SR, np.float32)
    clip[SR // 2 : SR] = rng.standard_normal(SR // 2) * 0.5
    np.testing.assert_allclose(active_spans(clip, SR), active_spans(clip * 0.01, SR))


def test_merge_close_spans():
    spans = np.array([[0.0, 1.0], [1.05, 2.0], [3.0, 4.0], [3.5, 3.8]])
    np.testing.assert_allclose(merge_close_spans(spans, 0.1), [[0.0, 2.0], [3.0, 4.0]])


def test_read_audio_downmixes_and_resamples(tmp_path):
    left, right = tone(440, 1.0, 0.4, rate=44100), tone(880, 1.0, 0.2, rate=44100)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 44100)
    samples, rate = read_audio(path, sample_rate=SR)
    assert rate == SR and samples.ndim == 1 and samples.dtype == np.float32
    assert len(samples) == SR
    expected = resample((left + right) / 2, 44100, SR)
    np.testing.assert_allclose(samples, expected, atol=1e-4)
    native, native_rate = read_audio(path, mono=False)
    assert native.shape == (2, 44100) and native_rate == 44100


def test_resample_preserves_a_tone():
    out = resample(tone(1000, 1.0), SR, 48000)
    spectrum = np.abs(np.fft.rfft(out))
    assert np.argmax(spectrum) * 48000 / len(out) == pytest.approx(1000, abs=2)


def test_flac_round_trip_is_16_bit(tmp_path):
    path = tmp_path / "x.flac"
    write_flac(path, tone(440, 0.5) * 3.0, SR)  # clipped to [-1, 1]
    back, rate = read_audio(path)
    assert rate == SR and np.max(np.abs(back)) <= 1.0
    assert sf.info(str(path)).subtype == "PCM_16"


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"", "cannot decode"),
        (b"RIFF\x00\x00\x00\x00WAVEjunkjunk", "cannot decode"),
        (b"not audio at all" * 10, "cannot decode"),
    ],
)
def test_corrupt_files_raise_an_error_naming_the_file(tmp_path, content, needle):
    path = tmp_path / "broken.wav"
    path.write_bytes(content)
    with pytest.raises(AudioError, match=rf"broken\.wav: {needle}"):
        read_audio(path)


def test_zero_length_and_nan_files_are_refused(tmp_path):
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), SR)
    with pytest.raises(AudioError, match=r"empty\.wav: file holds no samples"):
        read_audio(empty)
    nan = tmp_path / "nan.wav"
    sf.write(nan, np.full(100, np.nan, np.float32), SR, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"nan\.wav: file holds NaN"):
        read_audio(nan)


# --- block-wise decoding and streaming resampling ---------------------------------------------


def stream(resampler: StreamingResampler, signal: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Push `signal` in blocks of random lengths (1 sample to ~0.4 s), then flush."""
    out, start = [], 0
    while start < signal.shape[-1]:
        size = int(rng.integers(1, resampler.orig_rate // 2 + 2))
        out.append(resampler.push(signal[..., start : start + size]))
        start += size
    out.append(resampler.flush())
    return np.concatenate(out, axis=-1)


@pytest.mark.parametrize(("orig", "new"), [(22050, 16000), (44100, 16000), (48000, 16000), (8000, 16000)])
def test_streaming_resampler_equals_resampling_the_whole_signal(orig, new):
    rng = np.random.default_rng(orig)
    for length in (1, 7, orig // 3 + 1, int(orig * 2.5) + 13):  # odd lengths, shorter and longer than context
        signal = rng.uniform(-1, 1, length).astype(np.float32)
        expected = resample(signal, orig, new)
        got = stream(StreamingResampler(orig, new), signal, rng)
        assert got.dtype == np.float32 and got.shape == expected.shape
        assert np.abs(got - expected).max() < 1e-5
    stereo = rng.uniform(-1, 1, (2, orig + 101)).astype(np.float32)
    got = stream(StreamingResampler(orig, new, channels=2), stereo, rng)
    assert np.abs(got - resample(stereo, orig, new)).max() < 1e-5


def test_block_reader_equals_decoding_the_whole_file(tmp_path):
    rng = np.random.default_rng(3)
    stereo = rng.uniform(-0.5, 0.5, (44100 * 3 + 17, 2)).astype(np.float32)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, 44100, subtype="FLOAT")
    whole = resample(stereo.T.mean(axis=0, dtype=np.float32), 44100, SR)
    blocks = list(iter_audio_blocks(path, SR, block_s=0.37))
    assert len(blocks) > 8 and all(b.dtype == np.float32 and b.ndim == 1 for b in blocks)
    assert np.abs(np.concatenate(blocks) - whole).max() < 1e-5
    samples, rate = read_audio(path, SR)
    assert rate == SR and np.abs(samples - whole).max() < 1e-5
    native = np.concatenate(list(iter_audio_blocks(path, None, block_s=0.5)))
    np.testing.assert_array_equal(native, stereo.mean(axis=1, dtype=np.float32))


def test_read_audio_accepts_a_file_object(tmp_path):
    path = tmp_path / "clip.flac"
    write_flac(path, tone(440, 1.3), SR)
    from_path, _ = read_audio(path, 22050)
    from_bytes, rate = read_audio(io.BytesIO(path.read_bytes()), 22050)
    assert rate == 22050
    np.testing.assert_array_equal(from_bytes, from_path)
    with pytest.raises(AudioError, match="audio stream: cannot decode"):
        read_audio(io.BytesIO(b"not audio" * 50))


def test_max_duration_stops_decoding_and_names_the_file(tmp_path):
    path = tmp_path / "five.wav"
    sf.write(path, tone(300, 5.0), SR)
    with pytest.raises(AudioTooLongError, match=r"five\.wav: .*limit of 2 s"):
        read_audio(path, max_duration_s=2)
    with pytest.raises(AudioTooLongError):
        list(iter_audio_blocks(path, SR, block_s=0.5, max_duration_s=4.9))
    samples, _ = read_audio(path, max_duration_s=5)
    assert len(samples) == 5 * SR


def test_a_lying_header_never_allocates_the_declared_size():
    """A WAV declaring 4 GB of data but holding 1 s: 1 s comes back, with memory for a block."""
    data = (np.random.default_rng(4).standard_normal(SR) * 3000).astype("<i2").tobytes()
    lying = wav_header(SR, 1, 16, 0xFFFFFFF0) + data
    tracemalloc.start()
    try:
        samples, rate = read_audio(io.BytesIO(lying), SR, max_duration_s=3600)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rate == SR and samples.shape == (SR,) and np.isfinite(samples).all()
    assert peak < 16 * SR * 4  # a few copies of the real second, not gigabytes
    with pytest.raises(AudioTooLongError, match=r"limit of 0\.5 s"):
        read_audio(io.BytesIO(lying), SR, max_duration_s=0.5)


@pytest.mark.parametrize("rate", [22254, 19999])
def test_rates_whose_ratio_barely_reduces_are_resampled_polyphase(tmp_path, rate):
    """22254 Hz (a real recording in the sound library) or 19999 Hz to 16 kHz would need a
    torchaudio kernel of 89M / 320M taps; the polyphase path keeps the tone, the length, and
    streamed equals whole."""
    n = int(2.5 * rate)
    tone = (0.5 * np.sin(2 * np.pi * 1000.0 * np.arange(n) / rate)).astype(np.float32)
    path = tmp_path / "odd.wav"
    sf.write(path, tone, rate, subtype="FLOAT")
    samples, got = read_audio(path, SR)
    assert got == SR and len(samples) == int(np.ceil(n * SR / rate))
    np.testing.assert_array_equal(samples, resample(tone, rate, SR))
    spectrum = np.abs(np.fft.rfft(samples[SR // 4 : -SR // 4]))
    peak_hz = np.argmax(spectrum) * SR / (len(samples) - 2 * (SR // 4))
    assert abs(peak_hz - 1000.0) < 2.0
    assert 0.49 < np.abs(samples[SR // 4 : -SR // 4]).max() < 0.51


def test_a_rate_that_cannot_be_resampled_cheaply_is_a_clear_error(tmp_path):
    path = tmp_path / "odd.wav"
    path.write_bytes(wav_header(44101, 1, 16, 2000) + bytes(2000))
    with pytest.raises(AudioError, match=r"odd\.wav: cannot resample 44101 Hz to 16000 Hz"):
        read_audio(path, SR)
    samples, rate = read_audio(path)  # at its own rate nothing needs resampling
    assert rate == 44101 and len(samples) == 1000
