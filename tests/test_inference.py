"""Detection on recordings of any length, rate and channel count; bad input; the `flam detect` CLI."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from flam_core.audio.io import resample
from flam_core.data.recipes import read_recipes
from flam_core.errors import AudioError, AudioTooLongError, ConfigError, DataError
from flam_core.inference import FlamDetector
from flam_core.model import prompt_cache
from flam_core.model.folder import load_model
from flam_core.model.prompt_cache import PromptCache, cache_root
from tests.conftest import ROOT

PROMPTS = ["dog barking", "a bell rings", "speech", "rain"]


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
    path = tmp_path / "clip.wav"
    sf.write(path, at_48k, 48000, subtype="FLOAT")  # the same samples: no 16-bit rounding between
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


# --- streaming: the same frames as embedding the whole signal at once --------------------------


@torch.inference_mode()
def embed_whole(detector: FlamDetector, samples: np.ndarray) -> np.ndarray:
    """The whole-array algorithm: pad the signal to whole windows, embed every window, stitch."""
    fs, keep, step, frames = detector.frame_samples, detector.keep, detector.step, detector.window_frames
    total = max(1, math.ceil(len(samples) / fs))
    n_windows = max(1, math.ceil(max(total - keep[1], 0) / step) + 1)
    padded = np.zeros((n_windows - 1) * step * fs + frames * fs, dtype=np.float32)
    padded[: len(samples)] = samples
    out = np.zeros((total, detector.model.vector_dim), dtype=np.float32)
    for first in range(0, n_windows, detector.batch_windows):
        ws = range(first, min(first + detector.batch_windows, n_windows))
        batch = torch.from_numpy(np.stack([padded[w * step * fs : (w * step + frames) * fs] for w in ws]))
        emb = detector.model.frame_vectors(detector.model.audio_encoder(batch)).numpy()
        for j, w in enumerate(ws):
            lo = 0 if w == 0 else keep[0]
            hi = min(frames if w == n_windows - 1 else keep[1], total - w * step)
            if hi > lo:
                out[w * step + lo : w * step + hi] = emb[j, lo:hi]
    return out


@pytest.mark.parametrize("overlap", [0.25, 0.0])
def test_streaming_embed_equals_the_whole_array_algorithm(detector, overlap):
    other = FlamDetector(detector.model, detector.params, overlap=overlap, batch_windows=3)
    rng = np.random.default_rng(5)
    rate = other.sample_rate
    for n in (0, 4321, int(41.7 * rate)):  # empty, under a frame, several windows (two batches)
        samples = (0.1 * rng.standard_normal(n)).astype(np.float32)
        expected = embed_whole(other, samples)
        embedded = other.embed(samples)
        assert (
            embedded.shape
            == expected.shape
            == (max(1, math.ceil(n / other.frame_samples)), expected.shape[1])
        )
        np.testing.assert_allclose(embedded, expected, atol=1e-5)
        blocks = (samples[i : i + 7777] for i in range(0, n, 7777))  # blocks unrelated to windows
        np.testing.assert_allclose(np.concatenate(list(other.embed_blocks(blocks))), expected, atol=1e-5)


def test_detect_streams_paths_file_objects_and_arrays_alike(detector, event_clip, tmp_path):
    rng = np.random.default_rng(6)
    signal = np.concatenate([0.003 * rng.standard_normal(16000 * 23).astype(np.float32), event_clip])
    path = tmp_path / "long.wav"
    sf.write(path, signal, 16000, subtype="FLOAT")
    from_path = detector.detect(path, PROMPTS)
    from_object = detector.detect(io.BytesIO(path.read_bytes()), PROMPTS)
    from_array = detector.detect(signal, PROMPTS, sample_rate=16000)
    expected = detector.score(embed_whole(detector, signal), PROMPTS)
    for detection in (from_path, from_object, from_array):
        assert detection.duration_s == pytest.approx(len(signal) / 16000)
        np.testing.assert_allclose(detection.probs, expected, atol=1e-5)
    assert from_path.segments == from_object.segments
    with pytest.raises(AudioTooLongError, match=r"long\.wav: .*limit of 30 s"):
        detector.detect(path, PROMPTS, max_duration_s=30)
    with pytest.raises(AudioTooLongError, match=r"audio array lasts 33\.0 s"):
        detector.detect(signal, PROMPTS, sample_rate=16000, max_duration_s=30)
    assert detector.detect(path, PROMPTS, max_duration_s=34).probs.shape == from_path.probs.shape
    samples = detector.load_audio(io.BytesIO(path.read_bytes()), max_duration_s=34)
    np.testing.assert_array_equal(samples, signal)


# --- broken model folders ------------------------------------------------------------------------


def edit_state(folder: Path, change) -> None:
    state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    change(state)
    torch.save(state, folder / "model.pt")


def widen_first(state: dict) -> None:
    key = next(iter(state))
    state[key] = torch.zeros(*(size + 1 for size in state[key].shape))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty model.pt", r"model\.pt is empty \(0 bytes\)"),
        ("truncated model.pt", r"model\.pt cannot be loaded as PyTorch weights \(.*zip archive"),
        ("config.json not JSON", r"config\.json is not valid JSON"),
        ("config.json without params", r"config\.json has no `params` object"),
        ("invalid params", r"config\.json: its params are invalid \(audio\.sample_rate"),
        ("missing tensor", r"model\.pt does not fit .*missing: head\.[\w.]+ \(1\)"),
        ("unexpected tensors", r"model\.pt does not fit .*unexpected: bogus, head\.extra \(2\)"),
        ("wrong shape", r"model\.pt does not fit .*wrong shape: head\.[\w.]+ \(\d+,?\) instead of"),
        ("calibration.json not JSON", r"calibration\.json is not valid JSON"),
    ],
)
def test_a_broken_model_folder_is_a_config_error_naming_the_file(smoke_models, tmp_path, case, message):
    folder = tmp_path / "model"
    shutil.copytree(smoke_models / "flam", folder, ignore=shutil.ignore_patterns("checkpoints"))
    weights = folder / "model.pt"
    config = json.loads((folder / "config.json").read_text())
    if case == "empty model.pt":
        weights.write_bytes(b"")
    elif case == "truncated model.pt":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif case == "config.json not JSON":
        (folder / "config.json").write_text(json.dumps(config)[:-40])
    elif case == "config.json without params":
        (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "params"}))
    elif case == "invalid params":
        config["params"]["audio"]["sample_rate"] = 12345
        (folder / "config.json").write_text(json.dumps(config))
    elif case == "missing tensor":
        edit_state(folder, lambda state: state.pop(next(iter(state))))
    elif case == "unexpected tensors":
        edit_state(
            folder, lambda state: state.update({"head.extra": torch.zeros(2), "bogus": torch.zeros(1)})
        )
    elif case == "wrong shape":
        edit_state(folder, widen_first)
    else:
        (folder / "calibration.json").write_text('{"threshold": 0.')
    with pytest.raises(ConfigError, match=message) as caught:
        load_model(folder)
    assert str(folder) in str(caught.value) and "copy it again or retrain it" in str(caught.value)


# --- prompt embeddings kept on disk ---------------------------------------------------------------


def copy_model(smoke_models: Path, folder: Path) -> Path:
    shutil.copytree(smoke_models / "flam", folder, ignore=shutil.ignore_patterns("checkpoints"))
    return folder


def assert_same_bits(got: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...]) -> None:
    assert len(got) == len(expected) == 3
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)


def test_a_cached_prompt_is_bit_identical_and_needs_no_text_encoder(smoke_models, private_prompt_cache):
    folder, prompts = smoke_models / "flam", ["a siren wails", "dog barking"]
    plain = FlamDetector.from_dir(folder)  # no disk cache: the text encoder computes every prompt
    assert plain.prompt_cache is None
    expected = plain.prompt_embeddings(prompts)
    first = FlamDetector.from_dir(folder, cache_prompts=True)
    assert first.prompt_cache.folder.parent == private_prompt_cache
    assert_same_bits(first.prompt_embeddings(prompts), expected)
    assert len(list(first.prompt_cache.folder.glob("*.f32"))) == 2

    again = FlamDetector.from_dir(folder, cache_prompts=True)
    assert not again.model.text_encoder.loaded  # a loaded model leaves its frozen encoder on disk
    assert_same_bits(again.prompt_embeddings(prompts), expected)
    assert not again.model.text_encoder.loaded  # every prompt came from the cache
    rng = np.random.default_rng(5)
    samples = 0.1 * rng.standard_normal(16000 * 12).astype(np.float32)
    assert np.array_equal(
        again.detect(samples, prompts, sample_rate=16000).probs,
        plain.detect(samples, prompts, sample_rate=16000).probs,
    )
    # A new prompt loads the encoder for itself only; the cached one is still read from disk.
    assert_same_bits(
        tuple(t[1:] for t in again.prompt_embeddings(["dog barking", "rain"])),
        plain.prompt_embeddings(["rain"]),
    )
    assert again.model.text_encoder.loaded


def test_entries_belong_to_one_model(smoke_models, detector, tmp_path):
    """Another model (other weights, other config) does not see the entries; a copy of the same
    folder does; changing one weight of model.pt makes it another model."""
    prompts = ["dog barking"]
    flam = FlamDetector.from_dir(smoke_models / "flam", cache_prompts=True)
    flam.prompt_embeddings(prompts)
    other = FlamDetector.from_dir(smoke_models / "global", cache_prompts=True)
    assert other.prompt_cache.key != flam.prompt_cache.key
    assert other.prompt_cache.get(prompts) == {}
    copy = copy_model(smoke_models, tmp_path / "copy")
    assert PromptCache.open(copy, detector.model).key == flam.prompt_cache.key
    assert set(PromptCache.open(copy, detector.model).get(prompts)) == set(prompts)
    edit_state(copy, lambda state: state[next(iter(state))].add_(1e-6))
    changed = PromptCache.open(copy, detector.model)
    assert changed.key != flam.prompt_cache.key and changed.get(prompts) == {}


@pytest.mark.parametrize("damage", ["one bit flipped", "truncated", "empty", "another format"])
def test_a_damaged_entry_is_encoded_again_and_rewritten(smoke_models, damage):
    folder, prompts = smoke_models / "flam", ["dog barking"]
    first = FlamDetector.from_dir(folder, cache_prompts=True)
    expected = first.prompt_embeddings(prompts)
    (entry,) = first.prompt_cache.folder.glob("*.f32")
    sound = entry.read_bytes()
    broken = {
        "one bit flipped": sound[:100] + bytes([sound[100] ^ 1]) + sound[101:],
        "truncated": sound[:-1],
        "empty": b"",
        "another format": np.arange(len(sound) // 4, dtype=np.float32).tobytes(),
    }[damage]
    entry.write_bytes(broken)
    again = FlamDetector.from_dir(folder, cache_prompts=True)
    assert again.prompt_cache.get(prompts) == {}
    assert_same_bits(again.prompt_embeddings(prompts), expected)
    assert again.model.text_encoder.loaded  # encoded, not read
    assert entry.read_bytes() == sound  # and rewritten


def test_the_cache_location_and_switch(smoke_models, detector, tmp_path, monkeypatch):
    monkeypatch.delenv("FLAM_PROMPT_CACHE")
    with monkeypatch.context() as patch:
        patch.setenv("FLAM_CACHE_DIR", str(tmp_path / "flam-cache"))
        assert cache_root() == tmp_path / "flam-cache" / "prompts"
    for off in ("off", "0", "false", "no", "OFF"):
        monkeypatch.setenv("FLAM_PROMPT_CACHE", off)
        assert cache_root() is None and PromptCache.open(smoke_models / "flam", detector.model) is None
    assert FlamDetector.from_dir(smoke_models / "flam", cache_prompts=True).prompt_cache is None
    # A cache that cannot be written (its folder would be inside a file) is passed over.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FLAM_PROMPT_CACHE", str(blocker / "prompts"))
    stuck = FlamDetector.from_dir(smoke_models / "flam", cache_prompts=True)
    text_emb, _, _ = stuck.prompt_embeddings(["dog barking"])
    assert text_emb.shape == (1, stuck.model.vector_dim) and blocker.read_text() == ""


def test_only_the_models_used_last_are_kept(smoke_models, detector, tmp_path, monkeypatch):
    monkeypatch.setattr(prompt_cache, "MAX_MODELS", 3)
    root = tmp_path / "prompts"
    for age, name in enumerate(["recent", "old", "oldest"]):
        (root / name).mkdir(parents=True)
        os.utime(root / name, ns=(0, (3 - age) * 10**12))  # 3000, 2000, 1000 s after the epoch
    cache = PromptCache.open(smoke_models / "flam", detector.model, root=root)  # a new model
    assert sorted(p.name for p in root.iterdir()) == ["old", "recent"]
    cache.put({"dog barking": tuple(t[0] for t in detector.prompt_embeddings(["dog barking"]))})
    os.utime(cache.folder, ns=(0, 0))
    PromptCache.open(smoke_models / "flam", detector.model, root=root)  # reopened: used now
    assert sorted(p.name for p in root.iterdir()) == sorted(["old", "recent", cache.key])
    assert cache.folder.stat().st_mtime_ns > 3 * 10**12
