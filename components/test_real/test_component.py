import json

from kfp.dsl import Artifact, Dataset

from components.test_real.component import build_real_set
from tests.conftest import HELD_OUT, smoke_params


def test_the_component_builds_the_set_flam_synth_real_builds(smoke_library, real_set, tmp_path):
    (tmp_path / "params.json").write_text(smoke_params().model_dump_json())
    out = Dataset(uri=str(tmp_path / "real"))
    build_real_set.python_func(
        params=Artifact(uri=str(tmp_path / "params.json")),
        library=Dataset(uri=str(smoke_library[0])),
        real_set=out,
    )
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
    (tmp_path / "params.json").write_text(smoke_params().model_dump_json())
    out = Dataset(uri=str(tmp_path / "val"))
    build_real_set.python_func(
        params=Artifact(uri=str(tmp_path / "params.json")),
        library=Dataset(uri=str(smoke_library[0])),
        real_set=out,
        split="val_real",
    )
    assert json.loads((tmp_path / "val" / "summary.json").read_text()) == val_real_set[1].to_json()
    # params without validation sources: an empty folder, which calibration skips
    plain = smoke_params("sources.validation_sources=[]")
    (tmp_path / "plain.json").write_text(plain.model_dump_json())
    empty = Dataset(uri=str(tmp_path / "empty"))
    build_real_set.python_func(
        params=Artifact(uri=str(tmp_path / "plain.json")),
        library=Dataset(uri=str(smoke_library[0])),
        real_set=empty,
        split="val_real",
    )
    assert list((tmp_path / "empty").iterdir()) == [] and empty.metadata["recordings"] == 0
