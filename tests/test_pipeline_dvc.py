"""End to end: `dvc repro` on the smoke profile runs every stage, and a second run does nothing."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    bin_dir = str(Path(sys.executable).parent)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(Path.home()), "CI": "1"}
    if "FLAM_CACHE_DIR" in os.environ:
        env["FLAM_CACHE_DIR"] = os.environ["FLAM_CACHE_DIR"]
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, check=False)


def test_dvc_repro_smoke_then_nothing_to_do(tmp_path):
    project = tmp_path / "project"
    tracked = run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], ROOT).stdout.split()
    for name in tracked:
        if (ROOT / name).is_file():
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, project / name)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["profile"] = "smoke"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (["git", "init", "-q"], ["git", "add", "-A"]):
        assert run(command, project).returncode == 0
    dvc = str(Path(sys.executable).parent / "dvc")
    first = run([dvc, "repro"], project)
    assert first.returncode == 0, first.stdout + first.stderr
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    baselines = params["evaluation"]["baselines"]
    for stage, body in stages.items():
        names = [f"{stage}@{mode}" for mode in baselines] if "foreach" in body else [stage]
        for name in names:
            assert f"Running stage '{name}'" in first.stdout
    assert (project / "data/sources/manifest.parquet").is_file()
    assert (project / "data/recipes/train.parquet").is_file()
    for mode in baselines:
        assert (project / "models" / mode / "model.pt").is_file()
    assert json.loads((project / "models/flam/calibration.json").read_text())["threshold"] > 0
    metrics = json.loads((project / "reports/eval/metrics.json").read_text())
    assert set(metrics["models"]) == {*baselines, "audioset"}  # with the untrained AudioSet classifier
    assert "Sound event detection" in (project / "reports/eval/results.md").read_text()
    decision = json.loads((project / "reports/register/decision.json").read_text())
    assert decision["model"] == "flam-sed" and decision["promoted"]  # the first model becomes champion
    assert (project / "mlruns.db").is_file()
    assert json.loads((project / "reports/drift/drift.json").read_text())["summary"]["n_columns"] > 6
    second = run([dvc, "repro"], project)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Running stage" not in second.stdout
    assert "up to date" in second.stdout

    # Without --model, detection serves the registry's champion from the project's own store,
    # from any folder of the project, and leaves no file behind (no stray MLflow store).
    before = run(["git", "status", "--porcelain", "--untracked-files=all"], project).stdout
    inside = project / "recordings"
    inside.mkdir()
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(3 * 16000) / 16000).astype(np.float32)
    sf.write(inside / "tone.wav", tone, 16000)
    flam = str(Path(sys.executable).parent / "flam")
    detected = run([flam, "detect", "tone.wav", "-p", "a bell rings", "--json"], inside)
    assert detected.returncode == 0, detected.stdout + detected.stderr
    assert json.loads(detected.stdout)["model"] == "models:/flam-sed@champion"
    (inside / "tone.wav").unlink()
    inside.rmdir()
    assert run(["git", "status", "--porcelain", "--untracked-files=all"], project).stdout == before
