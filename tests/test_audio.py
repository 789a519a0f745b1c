import numpy as np
import pytest
import soundfile as sf

from flam_core.audio.activity import (
    a_weighted_level_db,
    a_weighting_gain,
    active_spans,
    merge_close_spans,
)
from flam_core.audio.io import read_audio, resample, write_flac
from flam_core.errors import AudioError

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
