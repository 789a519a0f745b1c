import json

from kfp.dsl import Artifact, Dataset

from components.test_real.component import build_real_set
from tests.conftest import HELD_OUT, smoke_params


def build(tmp_path, library, name: str, *overrides: str, **split) -> Dataset:
    """The component's set under `tmp_path / name`, with the smoke params and `overrides`."""
    (tmp_path / f"{name}.json").write_text(smoke_params(*overrides).model_dump_json())
    out = Dataset(uri=str(tmp_path / name))
    build_real_set.python_func(
        params=Artifact(uri=str(tmp_path / f"{name}.json")),
        library=Dataset(uri=str(library)),
        real_set=out,
        **split,
    )
    return out


def test_the_component_builds_the_set_flam_synth_real_builds(smoke_library, real_set, tmp_path):
    out = build(tmp_path, smoke_library[0], "real")
    folder, summary = real_set
    assert json.loads((tmp_path / "real" / "summary.json").read_text()) == summary.to_json()
    for tsv in ("recordings.tsv", "clips.tsv"):
        assert (tmp_path / "real" / tsv).read_text() == (folder / tsv).read_text()
    assert out.metadata == {
        "recordings": summary.recordings,
        "clips": summary.clips,
        "prompts": len(summary.labels),
        "sources": HELD_OUT,
    }


def test_the_validation_twin_and_its_empty_form(smoke_library, val_real_set, tmp_path):
    build(tmp_path, smoke_library[0], "val", split="val_real")
    assert json.loads((tmp_path / "val" / "summary.json").read_text()) == val_real_set[1].to_json()
    # params without validation sources: an empty folder, which calibration skips
    empty = build(tmp_path, smoke_library[0], "empty", "sources.validation_sources=[]", split="val_real")
    assert list((tmp_path / "empty").iterdir()) == [] and empty.metadata["recordings"] == 0
