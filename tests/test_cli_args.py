"""`flam detect/index/search` check their arguments first: one line naming the problem, exit code 2,
before any model is imported or loaded, and no model needed outside a project without `--model`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from flam_core.cli import run

ROOT = Path(__file__).resolve().parents[1]


def flam(
    args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, str]:
    """Run the console entry point in this process: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["flam", *args])
    with pytest.raises(SystemExit) as stop:
        run()
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing but results on stdout, and there is no result
    return stop.value.code, captured.err


@pytest.fixture
def outside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder outside any project (no params.yaml up to /), with a real 1 s WAV."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, 16000).astype(np.float32)
    sf.write(tmp_path / "clip.wav", noise, 16000)
    (tmp_path / "audio").mkdir()
    return tmp_path


# A model path that does not exist: each bad argument must be reported before the model is looked at.
NO_MODEL = ["--model", "/nonexistent/model"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["detect", "missing.wav", "-p", "dog"], "no such file: missing.wav"),
        (["detect", "audio", "-p", "dog"], "audio is not a file"),
        (["detect", "clip.wav", "-p", "dog", "-p", "  "], "--prompt must be a non-empty text"),
        (["detect", "clip.wav", "-p", "dog", "--threshold", "-1"], "--threshold must be between 0 and 1"),
        (["detect", "clip.wav", "-p", "dog", "--threshold", "2"], "--threshold must be between 0 and 1"),
        (["detect", "clip.wav", "-p", "dog", "--threshold", "nan"], "--threshold must be between 0 and 1"),
        (["detect", "clip.wav", "-p", "dog", "--plot", "clip.wav/heat.png"], "clip.wav is a file"),
        (["detect", "clip.wav", "-p", "dog", "--plot", "audio"], "--plot audio: is a folder"),
        (["detect", "clip.wav", "-p", "dog", "--plot", "heat.nope"], "must end in an image format"),
        (["index", "missing", "--out", "index"], "no such folder: missing"),
        (["index", "clip.wav", "--out", "index"], "clip.wav is not a folder"),
        (["index", "audio", "--out", "clip.wav"], "--out clip.wav: is a file"),
        (["search", "missing", "-q", "dog"], "no such folder: missing"),
        (["search", "audio", "-q", "dog"], "audio is not a search index (no index.json)"),
    ],
)
def test_bad_arguments_are_one_line_errors_before_the_model(outside, capsys, monkeypatch, args, message):
    code, err = flam([*args, *NO_MODEL], capsys, monkeypatch)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (outside / "heat.png").exists() and not (outside / "index").exists()


def test_search_checks_query_and_top_before_the_model(outside, capsys, monkeypatch):
    (outside / "index").mkdir()
    (outside / "index" / "index.json").write_text("{}")
    code, err = flam(["search", "index", "-q", "dog", "--top", "0", *NO_MODEL], capsys, monkeypatch)
    assert code == 2 and "--top must be 1 or more, got 0" in err
    code, err = flam(["search", "index", "-q", " ", *NO_MODEL], capsys, monkeypatch)
    assert code == 2 and "--query must be a non-empty text" in err


def test_unwritable_plot_folder_is_reported(outside, capsys, monkeypatch):
    """Permission bits do not stop root, so the folders here refuse writes to everyone."""
    for plot in ("/proc/heat.png", "/sys/heat.png"):
        args = ["detect", "clip.wav", "-p", "dog", "--plot", plot, *NO_MODEL]
        code, err = flam(args, capsys, monkeypatch)
        assert code == 2 and f"--plot {plot}: cannot write in" in err, err


def test_model_is_required_outside_a_project(outside, capsys, monkeypatch):
    for args in (["detect", "clip.wav", "-p", "dog"], ["index", "audio", "--out", "index"]):
        code, err = flam(args, capsys, monkeypatch)
        assert code == 2 and "--model is required outside a project" in err and "MLFLOW_TRACKING_URI" in err
    code, err = flam(["detect", "clip.wav", "-p", "dog", *NO_MODEL], capsys, monkeypatch)
    assert code == 2 and "--model /nonexistent/model: no such model folder" in err
    # An MLflow URI needs a store, and outside a project there is none to assume.
    code, err = flam(
        ["detect", "clip.wav", "-p", "dog", "--model", "models:/flam-sed@champion"], capsys, monkeypatch
    )
    assert code == 2 and "no MLflow store" in err
    assert sorted(p.name for p in outside.iterdir()) == ["audio", "clip.wav"]  # no mlflow.db, nothing


def test_a_project_without_a_champion_is_an_error_not_a_fallback(tmp_path, capsys, monkeypatch):
    project = tmp_path / "project"
    (project / "sub").mkdir(parents=True)
    (project / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    sf.write(project / "clip.wav", np.full(16000, 0.1, np.float32), 16000)
    monkeypatch.chdir(project / "sub")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, err = flam(["detect", "../clip.wav", "-p", "dog"], capsys, monkeypatch)
    store = f"sqlite:///{project.resolve() / 'mlruns.db'}"
    assert code == 2 and store in err and "dvc repro" in err and "--model models/flam" in err, err
    assert sorted(p.name for p in project.iterdir()) == ["clip.wav", "params.yaml", "sub"]  # no store made
    assert not any((project / "sub").iterdir())


def test_arguments_are_checked_without_importing_torch(tmp_path):
    """The real console script: a bad argument answers before torch (or any model code) loads."""
    code = (
        "import sys\n"
        "from flam_core.cli import run\n"
        "sys.argv = ['flam', 'detect', 'missing.wav', '-p', 'dog', '--model', '/nonexistent']\n"
        "try:\n    run()\n"
        "except SystemExit as stop:\n"
        "    print(json.dumps({'code': stop.code, 'torch': 'torch' in sys.modules}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", "import json\n" + code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(done.stdout) == {"code": 2, "torch": False}
    assert done.stderr == "error: no such file: missing.wav\n"
