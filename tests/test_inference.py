"""Detection on recordings of any length, rate and channel count; bad input; the `flam detect` CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from flam_core.audio.io import resample
from flam_core.data.recipes import read_recipes
from flam_core.errors import AudioError, DataError
from flam_core.inference import FlamDetector
from tests.conftest import ROOT

PROMPTS = ["dog barking", "a bell rings", "speech", "rain"]


@pytest.fixture(scope="module")
def detector(smoke_models):
    return FlamDetector.from_dir(smoke_models / "flam")


@pytest.fixture(scope="module")
def event_clip(mixer, smoke_recipes):
    """A loud 10 s mixture of real sources at 16 kHz, to plant into long recordings."""
    recipes, _ = smoke_recipes
    plan = mixer.plan(read_recipes(recipes / "test_seen.parquet"))
    return mixer.render(plan, 0)


def test_long_stereo_44k_audio_gives_the_whole_timeline(detector, event_clip, tmp_path):
    rate, seconds = 44100, 95.0
    rng = np.random.default_rng(1)
    stereo = 0.01 * rng.standard_normal((2, int(rate * seconds))).astype(np.float32)
    path = tmp_path / "long.wav"
    sf.write(path, stereo.T, rate)
    detection = detector.detect(path, PROMPTS)
    expected_frames = math.ceil(seconds / detector.frame_hop_s)
    assert detection.probs.shape == (len(PROMPTS), expected_frames)
    assert detection.duration_s == pytest.approx(seconds, abs=1e-3)
    assert (
        np.isfinite(detection.probs).all() and (detection.probs >= 0).all() and (detection.probs <= 1).all()
    )
    document = detection.to_json()
    assert set(document) >= {"model", "frame_hop_s", "prompts", "probs", "segments"}
    assert all(s["offset"] <= seconds for s in document["segments"])


def test_a_planted_event_is_found_at_its_time(detector, event_clip):
    """Frames whose scores change when a loud clip is planted lie where it was planted (+-1 frame)."""
    rate = detector.sample_rate
    rng = np.random.default_rng(2)
    background = 0.003 * rng.standard_normal(int(rate * 95)).astype(np.float32)
    hop = detector.frame_hop_s
    onset_frame = 123  # 38.4375 s: not on a window boundary
    planted = background.copy()
    clip = event_clip[: int(rate * 3.0)]  # 3 s of the mixture
    start = int(round(onset_frame * hop * rate))
    planted[start : start + len(clip)] += clip
    prompts = PROMPTS
    base = detector.score(detector.embed(background), prompts)
    moved = np.abs(detector.score(detector.embed(planted), prompts) - base).sum(axis=0)
    changed = np.flatnonzero(moved > 0.25 * moved.max())
    end_frame = onset_frame + math.ceil(3.0 / hop)
    assert changed.min() >= onset_frame - 1 and changed.max() <= end_frame + 1
    assert (
        moved[onset_frame:end_frame].mean()
        > 10 * np.delete(moved, np.arange(onset_frame - 2, end_frame + 2)).mean()
    )


def test_array_input_any_rate_matches_the_file(detector, event_clip, tmp_path):
    at_48k = resample(event_clip, 16000, 48000)
    from_array = detector.detect(np.stack([at_48k, at_48k]), PROMPTS, sample_rate=48000)
    path = tmp_path / "clip.flac"
    sf.write(path, at_48k, 48000)
    from_file = detector.detect(path, PROMPTS)
    np.testing.assert_allclose(from_array.probs, from_file.probs, atol=2e-3)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.wav", "empty", "no samples|cannot decode"),
        ("silent.wav", "silent", "digital silence"),
        ("corrupt.wav", "corrupt", "cannot decode"),
        ("notes.txt", "text", "cannot decode"),
    ],
)
def test_bad_input_is_a_clear_error(detector, tmp_path, name, content, message):
    path = tmp_path / name
    if content == "empty":
        sf.write(path, np.zeros(0, dtype=np.float32), 16000)
    elif content == "silent":
        sf.write(path, np.zeros(16000 * 3, dtype=np.float32), 16000)
    elif content == "corrupt":
        path.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + os.urandom(200))
    else:
        path.write_text("this is not audio\n")
    with pytest.raises(AudioError, match=message):
        detector.detect(path, PROMPTS)


def test_prompts_are_checked_and_cached(detector, event_clip):
    with pytest.raises(DataError, match="prompts must be non-empty"):
        detector.detect(event_clip, [""], sample_rate=16000)
    detector.prompt_embeddings(["glass breaking"])
    calls = []
    encode = detector.model.text_encoder.encode
    detector.model.text_encoder.encode = lambda texts: calls.append(list(texts)) or encode(texts)
    try:
        detector.prompt_embeddings(["glass breaking", "glass breaking"])
    finally:
        detector.model.text_encoder.encode = encode
    assert calls == []  # the repeated prompt came from the cache


def test_cli_detect_json_and_plot(smoke_models, event_clip, tmp_path):
    path = tmp_path / "clip.wav"
    sf.write(path, event_clip, 16000)
    command = [
        sys.executable,
        "-m",
        "flam_core.cli",
        "--params",
        str(ROOT / "params.yaml"),
        "--profile",
        "smoke",
    ]
    command += [
        "detect",
        str(path),
        "-p",
        "dog barking",
        "-p",
        "speech",
        "--model",
        str(smoke_models / "flam"),
    ]
    command += ["--json", "--plot", str(tmp_path / "plot.png")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads(done.stdout)
    assert document["prompts"] == ["dog barking", "speech"]
    assert document["frame_hop_s"] == pytest.approx(0.3125)
    assert len(document["probs"]) == 2 and len(document["probs"][0]) == 32
    for segment in document["segments"]:
        assert set(segment) == {"prompt", "onset", "offset", "score"} and segment["onset"] < segment["offset"]
    assert (tmp_path / "plot.png").stat().st_size > 0

    missing = subprocess.run(
        [
            *command[:6],
            "detect",
            str(tmp_path / "nothing.wav"),
            "-p",
            "x",
            "--model",
            str(smoke_models / "flam"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert missing.returncode == 2 and "nothing.wav" in missing.stderr
