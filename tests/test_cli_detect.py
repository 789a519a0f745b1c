"""The real `flam` console script on a real project: `detect`, `index` and `search` serve the champion
of the project's own MLflow store (the one `register` writes), print results only, and leave the
working folder untouched."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from flam_core.data.recipes import read_recipes
from flam_core.registry import register
from flam_core.tracking import tracking_uri
from tests.conftest import ROOT, smoke_params

pytestmark = pytest.mark.slow

FLAM = str(Path(sys.executable).parent / "flam")
CHAMPION = "models:/flam-sed@champion"


def git(repo: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args]
    return subprocess.run(command, cwd=repo, capture_output=True, text=True, check=True).stdout


def flam(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([FLAM, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def project(smoke_models, smoke_recipes, mixer, tmp_path_factory) -> Path:
    """A git repository holding the project's params.yaml and .gitignore and a real recording,
    with the smoke FLAM model registered as champion in the project's default store."""
    root = tmp_path_factory.mktemp("project")
    for name in ("params.yaml", ".gitignore"):
        shutil.copy(ROOT / name, root / name)
    recipes, _ = smoke_recipes
    plan = mixer.plan(read_recipes(recipes / "test_seen.parquet"))
    sf.write(root / "recording.wav", mixer.render(plan, 0)[: 16000 * 6], 16000)
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "project")
    outside = tmp_path_factory.mktemp("evaluation")
    metrics = outside / "metrics.json"
    gate = {"test_unseen.frame_auroc_macro": 0.7, "test_unseen.psds1": 0.1}
    metrics.write_text(json.dumps({"gate": gate, "test_set_hash": "x"}))
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.chdir(root)
        assert tracking_uri() == f"sqlite:///{root.resolve()}/mlruns.db"
        decision = register(smoke_params(), smoke_models / "flam", metrics, recipes, out_dir=outside / "reg")
    assert decision.promoted
    assert (root / "mlruns.db").is_file()
    assert git(root, "status", "--porcelain", "--untracked-files=all") == ""  # the store is ignored
    return root


def files(folder: Path) -> set[str]:
    """Every path under `folder` but git's and the MLflow store's artifact tree (where MLflow notes
    each download of a registered model in a `registered_model_meta` file)."""
    return {
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if not {".git", "mlruns"} & set(p.relative_to(folder).parts)
    }


def test_detect_serves_the_projects_champion_and_prints_only_the_result(project):
    before = files(project)
    done = flam(project, "detect", "recording.wav", "-p", "dog barking", "-p", "a bell rings", "--json")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no progress bar, no warning
    (line,) = done.stdout.splitlines()
    detection = json.loads(line)
    assert detection["model"] == CHAMPION
    assert detection["prompts"] == ["dog barking", "a bell rings"] and len(detection["probs"][0]) > 10
    # Nothing new in the working folder (no mlflow.db); what registration wrote is ignored by git.
    assert files(project) == before
    assert git(project, "status", "--porcelain", "--untracked-files=all") == ""
    ignored = git(project, "status", "--porcelain", "--ignored", "--untracked-files=all").splitlines()
    assert ignored and all(line.startswith(("!! mlruns.db", "!! mlruns/")) for line in ignored), ignored


def test_index_and_search_from_a_subfolder_use_the_same_store(project, tmp_path):
    sub = project / "notebooks" / "deep"
    sub.mkdir(parents=True)
    audio = tmp_path / "audio"
    audio.mkdir()
    shutil.copy(project / "recording.wav", audio / "a.wav")
    index = tmp_path / "index"
    built = flam(sub, "index", str(audio), "--out", str(index))
    assert built.returncode == 0 and built.stderr == "", built.stderr
    # One line of results (a disabled rich Progress in build_index still ends with a blank line).
    (summary,) = [line for line in built.stdout.splitlines() if line.strip()]
    assert "embedded=1" in summary and "files=1" in summary and f"model={CHAMPION}" in summary
    assert json.loads((index / "index.json").read_text())["model"]["source"] == CHAMPION
    found = flam(sub, "search", str(index), "-q", "dog barking", "--top", "3", "--json")
    assert found.returncode == 0 and found.stderr == "", found.stderr
    hits = json.loads(found.stdout)
    assert 1 <= len(hits) <= 3 and all(hit["file"] == "a.wav" for hit in hits)
    assert not any(sub.iterdir())
    assert git(project, "status", "--porcelain", "--untracked-files=all") == ""


def test_a_model_folder_outside_any_project_plots_and_prints_only_the_table(smoke_models, project, tmp_path):
    shutil.copy(project / "recording.wav", tmp_path / "recording.wav")
    done = flam(
        tmp_path, "detect", "recording.wav", "-p", "dog barking", "--model", str(smoke_models / "flam"),
        "--threshold", "0", "--plot", "plots/heat.png",
    )  # fmt: skip
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "dog barking" in done.stdout
    assert (tmp_path / "plots" / "heat.png").stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots", "recording.wav"]


def test_detection_imports_only_what_detection_needs(smoke_models, project, tmp_path):
    """`flam detect` on a model folder loads neither the metric, data-table, tracking nor
    training libraries, nor `transformers` (the packaged MiniLM is read by `flam_core.model.bert`),
    nor boto3 without an S3 input: they cost seconds of start-up and detection does not use them.
    With its prompts in the prompt cache it loads no text encoder at all, and gives the same
    probabilities. It prints nothing but the result, and the model's OpenMP threads sleep between
    operations (`OMP_WAIT_POLICY=PASSIVE`) unless the user chose a policy."""
    shutil.copy(project / "recording.wav", tmp_path / "recording.wav")
    heavy = (
        "pandas",
        "sklearn",
        "sed_scores_eval",
        "mlflow",
        "deepspeed",
        "matplotlib",
        "evidently",
        "transformers",
        "boto3",
        "scipy",
    )
    argv = [
        "flam",
        "detect",
        "recording.wav",
        "-p",
        "dog barking",
        "--model",
        str(smoke_models / "flam"),
        "--json",
    ]
    probe = (
        "import json, os, sys\n"
        "from flam_core.cli import run\n"
        f"sys.argv = {argv!r}\n"
        "try:\n    run()\nexcept SystemExit as stop:\n    assert not stop.code, stop.code\n"
        f"print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)), file=sys.stderr)\n"
        "print(os.environ['OMP_WAIT_POLICY'], file=sys.stderr)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["prompts"] == ["dog barking"]
    assert done.stderr.strip().splitlines() == ["[]", "PASSIVE"]
    # Again: the prompt's embedding is now in the prompt cache, so the text encoder never loads
    # (nor the tokenizer library); and the console holds the result alone.
    probe = probe.replace(repr(heavy), repr((*heavy, "tokenizers", "safetensors")))
    env["OMP_WAIT_POLICY"] = "passive"  # the user's setting (in lower case, to tell it apart)
    again = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr
    assert again.stderr.strip().splitlines() == ["[]", "passive"]
    assert json.loads(again.stdout)["probs"] == json.loads(done.stdout)["probs"]
