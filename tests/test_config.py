from pathlib import Path

import pytest
import yaml

from flam_core.config import Params, load_params, parse_override
from flam_core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


def test_params_yaml_matches_the_model_defaults():
    # params.yaml is the single source of defaults: it must spell out exactly the model's defaults,
    # so nobody reads a value in one place that the code silently replaces with another.
    assert load_params(PARAMS) == Params()


@pytest.mark.parametrize("profile", ["default", "smoke", "gpu"])
def test_every_profile_loads(profile):
    params = load_params(PARAMS, profile=profile)
    assert params.profile == profile
    # the detector's fusion reads YAMNet's classifier: a profile on another encoder turns it off
    assert params.calibration.classifier_weight == 0 or params.model.audio_encoder == "yamnet"


def test_gpu_profile_is_48k_and_smoke_is_small():
    assert load_params(PARAMS, profile="gpu").audio.sample_rate == 48000
    smoke = load_params(PARAMS, profile="smoke")
    assert smoke.sources.midi.clips_per_label < Params().sources.midi.clips_per_label


def test_overrides_win_over_profile_and_parse_yaml_values():
    params = load_params(
        PARAMS,
        profile="smoke",
        overrides=[
            "sources.midi.clips_per_label=9",
            "sources.packages=[scratch]",
            "captions.llm.enabled=false",
        ],
    )
    assert params.sources.midi.clips_per_label == 9
    assert params.sources.packages == ["scratch"]


def test_bad_value_names_the_key_and_the_range():
    with pytest.raises(ConfigError) as info:
        load_params(PARAMS, overrides=["sources.activity.threshold_db=5"])
    message = str(info.value)
    assert "sources.activity.threshold_db" in message
    assert "less than or equal to -3" in message


def test_unknown_key_names_the_dotted_key_and_the_allowed_ones():
    with pytest.raises(ConfigError) as info:
        load_params(PARAMS, overrides=["sources.midi.clip_per_label=3"])
    message = str(info.value)
    assert "unknown key 'sources.midi.clip_per_label'" in message
    assert "clips_per_label" in message


def test_unknown_key_in_the_file(tmp_path):
    raw = yaml.safe_load(PARAMS.read_text())
    raw["sources"]["splits"]["heldout_fraction"] = 0.3
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"unknown key 'sources.splits.heldout_fraction'"):
        load_params(path)


def test_heldout_fraction_below_15_percent_is_refused():
    with pytest.raises(
        ConfigError, match=r"sources.splits.heldout_label_fraction.*greater than or equal to 0.15"
    ):
        load_params(PARAMS, overrides=["sources.splits.heldout_label_fraction=0.1"])


def test_cross_field_rules_name_their_section():
    with pytest.raises(ConfigError, match=r"sources.processing: .*min_event_s must be below max_event_s"):
        load_params(
            PARAMS, overrides=["sources.processing.min_event_s=4", "sources.processing.max_event_s=3"]
        )
    with pytest.raises(ConfigError, match=r"captions.llm: .*endpoint is required"):
        load_params(PARAMS, overrides=["captions.llm.enabled=true"])


def test_unknown_package_and_profile():
    with pytest.raises(ConfigError, match=r"sources.packages: .*unknown package"):
        load_params(PARAMS, overrides=["sources.packages=[not-a-package]"])
    with pytest.raises(ConfigError, match=r"unknown profile 'huge'"):
        load_params(PARAMS, profile="huge")


@pytest.mark.parametrize("text", ["novalue", "=3", "a..b=1", "sources.midi=[unclosed"])
def test_malformed_overrides(text):
    with pytest.raises(ConfigError, match="override"):
        load_params(PARAMS, overrides=[text])


def test_override_cannot_descend_into_a_value():
    with pytest.raises(ConfigError, match=r"'audio.sample_rate' is a value, not a section"):
        load_params(PARAMS, overrides=["audio.sample_rate.x=1"])


def test_parse_override_types():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=0.5") == (["a"], 0.5)
    assert parse_override("a=[x, y]") == (["a"], ["x", "y"])
    assert parse_override("a=null") == (["a"], None)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("audio: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def flam(args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """The console entry point in this process: (exit code, stdout, stderr)."""
    import sys

    from flam_core.cli import run

    monkeypatch.setattr(sys, "argv", ["flam", *args])
    with pytest.raises(SystemExit) as stop:
        run()
    captured = capsys.readouterr()
    return stop.value.code, captured.out, captured.err


def test_resolved_parameters_are_used_as_they_are(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the project: no params.yaml or profile is read
    resolved = load_params(PARAMS, profile="smoke", overrides=["train.steps=7", "train.mode=global"])
    (tmp_path / "params.json").write_text(resolved.model_dump_json())
    code, out, _ = flam(["--resolved", str(tmp_path / "params.json"), "config", "show"], capsys, monkeypatch)
    assert code == 0 and Params.model_validate(yaml.safe_load(out)) == resolved


@pytest.mark.parametrize(
    ("extra", "option"),
    [
        (["--params", str(PARAMS)], "--params"),
        (["--profile", "smoke"], "--profile"),
        (["-S", "a.b=3"], "--set"),
    ],
)
def test_resolved_parameters_refuse_anything_that_would_change_them(
    tmp_path, capsys, monkeypatch, extra, option
):
    (tmp_path / "params.json").write_text(Params().model_dump_json())
    code, out, err = flam(
        [*extra, "--resolved", str(tmp_path / "params.json"), "config", "show"], capsys, monkeypatch
    )
    assert code == 2 and out == ""
    resolved = tmp_path / "params.json"
    assert f"error: --resolved {resolved} holds parameters already resolved: {option} cannot" in err


def test_resolved_parameters_must_be_a_valid_file(tmp_path, capsys, monkeypatch):
    code, _, err = flam(["--resolved", str(tmp_path / "none.json"), "config", "show"], capsys, monkeypatch)
    assert code == 2 and "no such file" in err
    (tmp_path / "bad.json").write_text('{"train": {"steps": -1}}')
    code, _, err = flam(["--resolved", str(tmp_path / "bad.json"), "config", "show"], capsys, monkeypatch)
    assert code == 2 and "train.steps" in err and "bad.json" in err


def test_held_out_sources_name_known_packages():
    params = load_params(
        PARAMS, overrides=['sources.held_out_sources=[scratch, "minetest-data:*/fire/*", "user:rec"]']
    )
    assert params.sources.held_out_sources == ["scratch", "minetest-data:*/fire/*", "user:rec"]
    for bad, message in (
        ("[not-a-package]", "held-out source 'not-a-package'"),
        ('["scratch:"]', "empty glob"),
        ("[scratch, scratch]", "listed twice"),
        ('["user:"]', "held-out source 'user:'"),
    ):
        with pytest.raises(ConfigError, match=rf"sources.held_out_sources: .*{message}"):
            load_params(PARAMS, overrides=[f"sources.held_out_sources={bad}"])
