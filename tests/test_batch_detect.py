"""`flam detect` over many files: one model load, worker decoding, a JSONL and a DCASE TSV per run,
bad files reported and retried, and runs that resume where a previous one stopped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import flam_core.batch
from flam_core.batch import collect_audio_files, read_detections, segments_tsv
from flam_core.cli import run
from flam_core.data.tsv import SedDataset, read_sed_tsv
from flam_core.errors import AudioError, SilentAudioError
from tests.conftest import ROOT

FLAM = str(Path(sys.executable).parent / "flam")
PROMPTS = ["dog barking", "a bell ringing"]
RATES = (8000, 16000, 22050, 44100, 48000)
FORMATS = ("wav", "flac", "ogg")


def flam(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The real console script (it inherits this environment, PYTHONPATH included)."""
    return subprocess.run([FLAM, *args], cwd=cwd, capture_output=True, text=True, timeout=600, check=False)


def write_corpus(folder: Path, n_good: int, seed: int, max_s: float = 15.0) -> tuple[list[Path], list[Path]]:
    """`n_good` real recordings of mixed formats, rates, channels and lengths (1 to `max_s` s) in
    nested folders, plus 3 corrupt files: (good files, bad files), absolute paths."""
    rng = np.random.default_rng(seed)
    good = []
    for i in range(n_good):
        rate, fmt, channels = RATES[i % len(RATES)], FORMATS[i % len(FORMATS)], 1 + (i // 3) % 2
        # Mostly short files keep the run fast; every 20th reaches the long end.
        seconds = float(rng.uniform(1.0, max_s)) if i % 20 == 0 else float(rng.uniform(1.0, 3.0))
        t = np.arange(int(seconds * rate)) / rate
        tone = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 2000) * t) * (np.sin(2 * np.pi * 0.5 * t) > 0)
        mono = (tone + rng.normal(0, 0.05, t.size)).astype(np.float32)
        samples = np.stack([mono, 0.5 * mono], axis=1) if channels == 2 else mono
        path = folder / f"part{i % 4}" / f"rec{i:03d}.{fmt}"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, samples, rate)
        good.append(path.resolve())
    bad = [folder / "part1" / "noise.wav", folder / "part2" / "cut.flac", folder / "empty.ogg"]
    bad[0].write_bytes(rng.bytes(4096))
    sf.write(bad[1], rng.uniform(-0.3, 0.3, 16000 * 4).astype(np.float32), 16000)
    whole = bad[1].read_bytes()
    bad[1].write_bytes(whole[: len(whole) // 2])
    bad[2].write_bytes(b"")
    return good, [p.resolve() for p in bad]


@pytest.mark.slow
def test_a_folder_of_200_files_in_one_run_then_resumed(flam_model, detector, tmp_path):
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    good, bad = write_corpus(corpus, 197, seed=0)
    args = ["detect", str(corpus), "-p", PROMPTS[0], "-p", PROMPTS[1], "--model", str(flam_model)]
    first = flam(*args, "--out", str(out), "--workers", "2")
    assert first.returncode == 1, first.stderr
    assert first.stdout == ""
    failed_lines = [line for line in first.stderr.splitlines() if line.startswith("failed ")]
    assert sorted(line.split()[1].rstrip(":") for line in failed_lines) == sorted(map(str, bad))
    assert "197 done, 0 skipped (already done), 3 failed" in first.stderr
    failed = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
    assert sorted(f["file"] for f in failed) == sorted(map(str, bad))

    records = read_detections(out)
    assert sorted(r["file"] for r in records) == sorted(map(str, good))  # each good file once
    for record in records:
        assert record["prompts"] == PROMPTS and record["model"] == str(flam_model)
        frames = np.asarray(record["probs"])  # [K, T]: one score per prompt and frame of the file
        assert (
            frames.shape[0] == 2
            and -1e-3 <= frames.shape[1] * record["frame_hop_s"] - record["duration_s"] < 0.3135
        )
    # Decoding in workers changes nothing: the same detections as the single-file path, up to the
    # float noise of another process's thread count (the default detector reads the classifier's
    # logits, whose range makes that noise reach the 4th decimal now and then).
    for record in records[:: len(records) // 4]:
        alone = detector.detect(record["file"], PROMPTS).to_json()
        exact = ("file", "threshold", "probs", "segments")
        assert {k: v for k, v in record.items() if k not in exact} == {
            k: v for k, v in alone.items() if k not in exact
        }
        np.testing.assert_allclose(record["probs"], alone["probs"], atol=2e-4)
        assert [(s["prompt"], s["onset"], s["offset"]) for s in record["segments"]] == [
            (s["prompt"], s["onset"], s["offset"]) for s in alone["segments"]
        ]
        np.testing.assert_allclose(
            [s["score"] for s in record["segments"]], [s["score"] for s in alone["segments"]], atol=2e-4
        )

    tsv = (out / "segments.tsv").read_text()
    assert tsv.splitlines()[0] == "filename\tonset\toffset\tevent_label\tscore"
    dataset = SedDataset(corpus, out / "segments.tsv")  # names relative to the corpus folder
    assert len(dataset) == 197
    expected = {
        Path(r["file"]).relative_to(corpus.resolve()).as_posix(): sorted(
            (s["onset"], s["offset"], s["prompt"]) for s in r["segments"] if s["offset"] > s["onset"]
        )
        for r in records
    }
    assert dataset.ground_truth == expected

    before = (out / "detections.jsonl").read_bytes()
    second = flam(*args, "--out", str(out), "--workers", "2")
    assert second.returncode == 1  # the bad files are retried, and fail again
    assert "0 done, 197 skipped (already done), 3 failed" in second.stderr
    assert (out / "detections.jsonl").read_bytes() == before
    assert (out / "segments.tsv").read_text() == tsv


@pytest.mark.slow
def test_a_crashed_run_resumes_and_its_tsv_evaluates(flam_model, tmp_path):
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    good, bad = write_corpus(corpus, 9, seed=1, max_s=12.0)
    listing = tmp_path / "files.txt"
    # part2 (with its bad file) only through the list; a file of part0 twice.
    listed = [p for p in good if p.parent.name == "part2"] + [good[0]]
    listing.write_text("\n".join(str(p) for p in listed) + "\n\n")
    patterns = [str(corpus / "part[13]" / "*.*"), str(corpus / "part0")]  # a glob and a folder
    args = [
        "detect",
        *patterns,
        "--list",
        str(listing),
        "-p",
        PROMPTS[0],
        "-p",
        PROMPTS[1],
        "--model",
        str(flam_model),
    ]
    args += ["--out", str(out), "--workers", "0", "--threshold", "0.05", "--plots"]
    first = flam(*args)
    assert first.returncode == 1, first.stderr  # part1/noise.wav is bad; the others are not named
    assert "9 done, 0 skipped (already done), 1 failed" in first.stderr
    assert sorted(p.name for p in (out / "plots").rglob("*.png")) == sorted(p.name + ".png" for p in good)

    # A run killed while writing a line leaves half of it.
    jsonl = out / "detections.jsonl"
    lines = jsonl.read_text().splitlines(keepends=True)
    jsonl.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    (bad[0]).unlink()  # the bad file is gone: nothing fails any more
    second = flam(*args)
    assert second.returncode == 0, second.stderr
    assert "1 done, 8 skipped (already done), 0 failed" in second.stderr
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert sorted(r["file"] for r in records) == sorted(map(str, good))
    assert (out / "failed.jsonl").read_text() == ""

    # The TSV is what `flam evaluate --tsv` reads: the format round-trips through it.
    truth = read_sed_tsv(out / "segments.tsv")
    assert len(truth) == 9 and sum(map(len, truth.values())) > 0
    root = corpus.resolve()
    evaluated = flam(
        "--params", str(ROOT / "params.yaml"), "evaluate", "--tsv", str(out / "segments.tsv"),
        "--audio-dir", str(root), "--model", str(flam_model),
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert result["n_files"] == 9 and result["n_labels"] == 2


def test_detect_many_yields_each_file_in_order_with_its_error(detector, tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    files = []
    for i, (rate, seconds) in enumerate([(16000, 3.0), (44100, 12.5), (8000, 1.0)]):
        files.append(tmp_path / f"ok{i}.flac")
        sf.write(files[-1], rng.uniform(-0.4, 0.4, int(rate * seconds)).astype(np.float32), rate)
    silent, broken = tmp_path / "silent.wav", tmp_path / "broken.wav"
    sf.write(silent, np.zeros(8000, np.float32), 16000)
    broken.write_bytes(b"RIFF" + rng.bytes(500))
    paths = [files[0], silent, files[1], broken, files[2]]
    for workers in (0, 1, 2, "stream"):
        if workers == "stream":  # files over 5 s streamed from their path, not decoded whole
            monkeypatch.setattr(flam_core.batch, "STREAM_LONGER_THAN_S", 5.0)
            assert flam_core.batch.decode_file(str(files[1]), 16000) is None
            workers = 0
        results = list(detector.detect_many(paths, PROMPTS, threshold=0.3, workers=workers))
        assert [p for p, _ in results] == paths
        assert isinstance(results[1][1], SilentAudioError) and str(silent) in str(results[1][1])
        assert isinstance(results[3][1], AudioError) and str(broken) in str(results[3][1])
        for path, detection in (results[0], results[2], results[4]):
            alone = detector.detect(path, PROMPTS, threshold=0.3)
            np.testing.assert_array_equal(detection.probs, alone.probs)
            assert detection.segments == alone.segments


def test_inputs_are_collected_once_in_order_without_the_output_folder(tmp_path):
    for name in ("b/one.wav", "b/two.FLAC", "b/notes.txt", "a/three.ogg", "b/out/old.wav"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    files = collect_audio_files(
        [
            tmp_path / "b" / "notes.txt",
            tmp_path / "b",
            str(tmp_path / "*" / "*.ogg"),
            tmp_path / "b" / "one.wav",
        ],
        skip=tmp_path / "b" / "out",
    )
    names = [p.relative_to(tmp_path).as_posix() for p in files]
    assert names == ["b/notes.txt", "b/one.wav", "b/two.FLAC", "a/three.ogg"]  # a named file is taken as is
    with pytest.raises(Exception, match="the pattern matches no file"):
        collect_audio_files([str(tmp_path / "*.mp3")])


def test_tsv_lists_files_without_segments_and_drops_zero_length_ones(tmp_path):
    records = [
        {"file": str(tmp_path / "x" / "a.wav"), "segments": []},
        {
            "file": str(tmp_path / "y" / "b.wav"),
            "segments": [
                {"prompt": "dog", "onset": 0.0, "offset": 1.25, "score": 0.91},
                {"prompt": "dog", "onset": 2.5, "offset": 2.5, "score": 0.6},
            ],
        },
    ]
    text = segments_tsv(records)
    assert text == (
        "filename\tonset\toffset\tevent_label\tscore\nx/a.wav\t\t\t\t\ny/b.wav\t0.000\t1.250\tdog\t0.9100\n"
    )
    (tmp_path / "s.tsv").write_text(text)
    assert read_sed_tsv(tmp_path / "s.tsv") == {"x/a.wav": [], "y/b.wav": [(0.0, 1.25, "dog")]}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["audio", "-p", "dog"],
            "audio is not a file: to detect in the audio files under a folder, pass --out",
        ),
        (["clip.wav", "clip.wav", "-p", "dog"], "pass --out DIR"),
        (["audio", "-p", "dog", "--out", "o", "--json"], "--json is for one file"),
        (["audio", "-p", "dog", "--out", "o", "--workers", "-1"], "--workers must be 0 or more"),
        (["audio", "nope", "-p", "dog", "--out", "o"], "no such file or folder: nope"),
        (["aud*/x.wav", "-p", "dog", "--out", "o"], "the pattern matches no file"),
        (["clip.wav", "-p", "dog", "--plots"], "--plots writes into --out DIR"),
        (["-p", "dog", "--out", "o"], "name the audio to detect in"),
        (["-p", "dog", "--list", "missing.txt", "--out", "o"], "no such file: missing.txt"),
        (["audio", "-p", "dog", "--out", "o"], "no audio file in audio"),
    ],
)
def test_bad_batch_arguments_are_one_line_before_any_model(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sf.write(tmp_path / "clip.wav", np.full(1600, 0.1, np.float32), 16000)
    (tmp_path / "audio").mkdir()
    monkeypatch.setattr(sys, "argv", ["flam", "detect", *args, "--model", "/nonexistent/model"])
    with pytest.raises(SystemExit) as stop:
        run()
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err, err
    assert not (tmp_path / "o").exists()
