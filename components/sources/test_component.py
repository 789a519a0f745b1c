import json

import pytest
from kfp.dsl import Artifact, Dataset, Metrics

from components.sources.component import build_sources
from flam_core.data.sources import load_manifest, manifest_hash
from flam_core.errors import DataError
from tests.conftest import ROOT, smoke_params

SMALL = (
    "sources.packages=[sound-theme-freedesktop]",
    "sources.held_out_sources=[]",
    "sources.validation_sources=[]",
    "sources.midi.clips_per_label=1",
    "sources.speech.clips_per_label=1",
    "sources.procedural.clips_per_label=1",
    "sources.procedural.duration_s=3",
)


def write_params(tmp_path, *overrides: str) -> Artifact:
    (tmp_path / "params.json").write_text(smoke_params(*overrides).model_dump_json())
    return Artifact(uri=str(tmp_path / "params.json"))


def test_builds_the_library_and_reports_its_counts(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # base_dir is the working directory, the image's WORKDIR
    library, metrics = Dataset(uri=str(tmp_path / "library")), Metrics(uri=str(tmp_path / "metrics"))
    build_sources.python_func(params=write_params(tmp_path, *SMALL), library=library, metrics=metrics)
    manifest = load_manifest(tmp_path / "library")
    summary = json.loads((tmp_path / "library" / "summary.json").read_text())
    assert all((tmp_path / "library" / path).is_file() for path in manifest["path"])
    assert library.metadata["manifest_hash"] == summary["manifest_hash"] == manifest_hash(manifest)
    events = manifest[manifest["kind"] == "event"]
    assert metrics.metadata["n_clips"] == len(manifest) and metrics.metadata["n_event_clips"] == len(events)
    assert metrics.metadata["n_event_labels"] == events["label"].nunique()
    assert metrics.metadata["n_backgrounds"] == (manifest["kind"] == "background").sum()
    assert metrics.metadata["n_heldout_labels"] == len(summary["heldout_labels"]) >= 1
    assert metrics.metadata["n_rejected"] == len(summary["rejected"])


def test_a_library_without_event_clips_fails_the_task_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    params = write_params(
        tmp_path,
        "sources.packages=[]",
        "sources.held_out_sources=[]",
        "sources.validation_sources=[]",
        "sources.midi.enabled=false",
        "sources.speech.enabled=false",
        "sources.procedural.clips_per_label=1",
        "sources.procedural.duration_s=3",
    )
    library, metrics = Dataset(uri=str(tmp_path / "library")), Metrics(uri=str(tmp_path / "metrics"))
    with pytest.raises(DataError, match="no event clip"):
        build_sources.python_func(params=params, library=library, metrics=metrics)
    assert not (tmp_path / "library").exists() and not metrics.metadata
