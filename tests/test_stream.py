"""Live detection: streamed scores against offline detection, events against offline segments,
and `flam stream` on stdin (WAV streams, raw PCM, bad input)."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from flam_core.audio.io import resample
from flam_core.audio.pcm import pcm_blocks, wav_stream
from flam_core.data.sources import load_manifest
from flam_core.errors import AudioError, ConfigError
from flam_core.stream import StreamDetector

FLAM = str(Path(sys.executable).parent / "flam")
ONSET_S = 6.0


@pytest.fixture(scope="module")
def planted(smoke_library) -> tuple[np.ndarray, str]:
    """18 s at 16 kHz: quiet noise, and a training clip of the library from 6 s on; its label."""
    library, _ = smoke_library
    manifest = load_manifest(library)
    events = manifest[(manifest["kind"] == "event") & (manifest["split"] == "train")]
    row = events.sort_values("duration_s").iloc[len(events) // 2]
    clip, rate = sf.read(library / row.path, dtype="float32")
    audio = 0.003 * np.random.default_rng(0).standard_normal(18 * rate).astype(np.float32)
    start = int(ONSET_S * rate)
    audio[start : start + len(clip)] += clip[: len(audio) - start]
    return audio, str(row.label)


def _streamed(detector, audio, prompts, hop_s, block=1600, threshold=None):
    scores: list[tuple[int, np.ndarray]] = []
    live = StreamDetector(
        detector, prompts, hop_s=hop_s, threshold=threshold, on_scores=lambda f, s: scores.append((f, s))
    )
    events = list(live.run(audio[i : i + block] for i in range(0, len(audio), block)))
    firsts = [f for f, _ in scores]
    assert firsts == sorted(firsts) and all(
        f == g + s.shape[1] for (g, s), f in zip(scores, firsts[1:], strict=False)
    )
    return np.concatenate([s for _, s in scores], axis=1), events


def test_at_the_offline_step_the_streamed_scores_are_offline_detections(detector, planted):
    audio, label = planted
    prompts = [label, "a dog barks"]
    offline = detector.detect(audio, prompts, sample_rate=16000)
    streamed, _ = _streamed(detector, audio, prompts, hop_s=detector.step * detector.frame_hop_s)
    assert streamed.shape == offline.probs.shape
    margin = detector.keep[0]  # the first frames come from the window before its audio is complete
    np.testing.assert_allclose(streamed[:, margin:], offline.probs[:, margin:], atol=1e-5)


def test_events_are_the_segments_of_the_streamed_scores(detector, planted):
    """Onsets and offsets equal `segments_from_frames` of the final scores, at any hop and block."""
    from flam_core.postprocess import segments_from_frames

    audio, label = planted
    prompts = [label, "a dog barks"]
    for hop_s, block in ((1.0, 1600), (0.5, 777)):
        streamed, events = _streamed(detector, audio, prompts, hop_s=hop_s, block=block, threshold=0.2)
        for k, prompt in enumerate(prompts):
            segments = segments_from_frames(streamed[k], detector.frame_hop_s, 0.2, detector.median_frames)
            mine = [e for e in events if e["prompt"] == prompt]
            onsets = [e["time"] for e in mine if e["event"] == "onset"]
            offsets = [e["time"] for e in mine if e["event"] == "offset"]
            assert onsets == [round(a, 3) for a, _, _ in segments]
            assert offsets == [round(min(b, len(audio) / 16000), 3) for _, b, _ in segments]
        # at a 1 s hop, every frame is close to the offline score (a little less context)
        offline = detector.detect(audio, prompts, sample_rate=16000).probs
        assert np.abs(streamed - offline).mean() < 0.05


def test_memory_stays_bounded_whatever_the_length(detector):
    live = StreamDetector(detector, ["a dog barks"], hop_s=1.0)
    noise = 0.01 * np.random.default_rng(1).standard_normal(16000).astype(np.float32)
    sizes = []
    for _ in range(40):  # 40 s of audio
        live.feed(noise)
        sizes.append((live.buffer.size, live.recent.shape[1]))
    assert max(b for b, _ in sizes[15:]) <= (detector.window_frames + live.hop + 1) * detector.frame_samples
    assert max(r for _, r in sizes) <= detector.median_frames + live.hop
    assert live.final >= 40 * 16000 // detector.frame_samples - live.margin - live.hop - 1


def test_a_hop_longer_than_a_window_s_centre_is_refused(detector):
    with pytest.raises(ConfigError, match="hop must be at most"):
        StreamDetector(detector, ["a dog barks"], hop_s=9.0)


def _wav_bytes(audio: np.ndarray, rate: int, channels: int, size: int | None = None) -> bytes:
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(np.repeat(pcm[:, None], channels, axis=1).tobytes())
    data = bytearray(buffer.getvalue())
    if size is not None:  # a header written before the stream's length was known
        at = data.find(b"data")
        data[at + 4 : at + 8] = struct.pack("<I", size)
        data[4:8] = struct.pack("<I", size)
    return bytes(data)


def _run(args: list[str], stdin: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([FLAM, "stream", *args], input=stdin, capture_output=True, timeout=600, check=False)


def test_flam_stream_finds_the_planted_event_from_stdin(smoke_models, detector, planted):
    audio, label = planted
    probs = detector.detect(audio, [label], sample_rate=16000).probs[0]
    onset_frame = int(ONSET_S / detector.frame_hop_s)
    # a threshold between the quiet part's highest score and the event's
    cut = float((probs[: onset_frame - 1].max() + probs[onset_frame:].max()) / 2)
    assert probs[onset_frame:].max() > probs[: onset_frame - 1].max()
    at_22k = resample(audio, 16000, 22050)
    model = ["--model", str(smoke_models / "flam"), "-p", label, "--threshold", f"{cut:.4f}"]
    runs = {
        "wav, stereo, 22.05 kHz, unknown length": _run(model, _wav_bytes(at_22k, 22050, 2, size=0xFFFFFFFF)),
        "raw s16le": _run(
            [*model, "--format", "s16le", "--rate", "22050"],
            (np.clip(at_22k, -1, 1) * 32767).astype("<i2").tobytes(),
        ),
        "raw f32le, 2 channels": _run(
            [*model, "--format", "f32le", "--rate", "22050", "--channels", "2"],
            np.repeat(at_22k[:, None], 2, axis=1).astype("<f4").tobytes(),
        ),
    }
    for name, done in runs.items():
        assert done.returncode == 0, (name, done.stderr.decode())
        lines = [json.loads(line) for line in done.stdout.decode().splitlines()]
        onsets = [e for e in lines if e["event"] == "onset"]
        assert onsets, name
        # the event's first onset lies where it sounds: within a frame and the median filter's reach
        assert abs(onsets[0]["time"] - ONSET_S) <= 3 * detector.frame_hop_s, (name, onsets)
        assert [e["event"] for e in lines] == ["onset", "offset"] * (len(lines) // 2), name
        assert all(e["prompt"] == label and 0 <= e["score"] <= 1 for e in lines)


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["--format", "s16le"], b"", "needs its sample rate"),
        (["--format", "mp3"], b"", "--format must be"),
        (["--hop", "0"], b"", "--hop must be"),
        (["--realtime"], b"", "--realtime paces a --file"),
    ],
)
def test_bad_arguments_fail_before_anything_loads(args, stdin, message, tmp_path):
    done = subprocess.run(
        [FLAM, "stream", "-p", "a dog barks", "--model", str(tmp_path), *args],
        input=stdin,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2 and message in done.stderr.decode(), done.stderr.decode()


def test_bad_streams_are_named(smoke_models):
    model = ["-p", "a dog barks", "--model", str(smoke_models / "flam")]
    garbage = _run(model, b"this is not a wav header at all, just text\n" * 10)
    assert garbage.returncode == 2 and "not a WAV stream" in garbage.stderr.decode()
    odd = _run([*model, "--format", "s16le", "--rate", "16000"], b"\x01\x02\x03")
    assert odd.returncode == 2 and "inside a sample frame" in odd.stderr.decode()


def test_readers_decode_what_was_written():
    x = np.sin(np.arange(4000) / 7).astype(np.float32) * 0.5
    rate, channels, blocks = wav_stream(io.BytesIO(_wav_bytes(x, 16000, 2, size=0)))
    got = np.concatenate(list(blocks), axis=1)
    assert (rate, channels, got.shape) == (16000, 2, (2, 4000))
    np.testing.assert_allclose(got[1], x, atol=2 / 32767)  # 16-bit rounding
    raw = np.concatenate(list(pcm_blocks(io.BytesIO(x.astype("<f4").tobytes()), "f32le", 8000, 1)), axis=1)
    np.testing.assert_array_equal(raw[0], x)
    with pytest.raises(AudioError, match="channel count"):
        next(pcm_blocks(io.BytesIO(b""), "s16le", 16000, 0))
