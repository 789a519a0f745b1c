import json

from kfp.dsl import Artifact

from components.params.component import resolve_params
from flam_core.config import Params, load_params
from tests.conftest import ROOT


def test_resolves_like_the_cli_and_round_trips(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # params.yaml is found from the working directory, as in the image
    out = Artifact(uri=str(tmp_path / "params"))
    resolve_params.python_func(
        profile="smoke", overrides=["train.steps=7", "synth.seed=3"], n_mixtures=50, params=out
    )
    resolved = Params.model_validate_json((tmp_path / "params").read_text())
    expected = load_params(None, "smoke", ["train.steps=7", "synth.seed=3", "synth.n_mixtures.train=50"])
    assert resolved == expected
    assert json.loads((tmp_path / "params").read_text()) == expected.model_dump(mode="json")
    assert out.metadata["profile"] == "smoke" and out.metadata["overrides"][-1] == "synth.n_mixtures.train=50"


def test_empty_profile_keeps_the_files_and_zero_mixtures_changes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = Artifact(uri=str(tmp_path / "p"))
    resolve_params.python_func(profile="", overrides=[], n_mixtures=0, params=out)
    assert Params.model_validate_json((tmp_path / "p").read_text()) == load_params(None)
