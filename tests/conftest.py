"""Shared fixtures: the project's params, and one smoke source library built per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from flam_core.config import Params, load_params

ROOT = Path(__file__).resolve().parents[1]


def smoke_params(*overrides: str) -> Params:
    return load_params(ROOT / "params.yaml", profile="smoke", overrides=overrides)


@pytest.fixture(autouse=True)
def private_prompt_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test keeps the prompt embeddings of its `flam` commands in a folder of its own: none
    in the user's cache, none shared between tests."""
    folder = tmp_path_factory.mktemp("prompt-cache")
    monkeypatch.setenv("FLAM_PROMPT_CACHE", str(folder))
    return folder


@pytest.fixture(scope="session")
def smoke_library(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A source library built once with the smoke profile: (folder, summary)."""
    from flam_core.data.sources import build_source_library

    out = tmp_path_factory.mktemp("smoke") / "sources"
    summary = build_source_library(smoke_params(), out_dir=out, base_dir=ROOT)
    return out, summary


@pytest.fixture(scope="session")
def smoke_recipes(
    smoke_library: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict]:
    """Recipes of every split sampled from the smoke library: (folder, summary)."""
    from flam_core.data.recipes import build_recipes

    library, _ = smoke_library
    out = tmp_path_factory.mktemp("smoke") / "recipes"
    summary = build_recipes(smoke_params(), library_dir=library, out_dir=out)
    return out, summary


@pytest.fixture(scope="session")
def mixer(smoke_library: tuple[Path, dict]):
    """A Mixer over the smoke library."""
    from flam_core.data.mixer import Mixer
    from flam_core.data.sources import load_manifest

    library, _ = smoke_library
    params = smoke_params()
    return Mixer(load_manifest(library), library, params.synth, params.frames, params.audio.sample_rate)


@pytest.fixture(scope="session")
def smoke_features(smoke_library, smoke_recipes, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Frozen-YAMNet frame features of every smoke split (the `features` stage's output)."""
    from flam_core.features import build_feature_cache

    library, _ = smoke_library
    recipes_dir, _ = smoke_recipes
    out = tmp_path_factory.mktemp("features") / "features"
    build_feature_cache(smoke_params(), library, recipes_dir, out)
    return out


@pytest.fixture(scope="session")
def smoke_models(smoke_features, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FLAM and FLAM-Global trained briefly on the smoke features: `<folder>/<mode>/`."""
    from flam_core.train import train

    folder = tmp_path_factory.mktemp("models")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'train-runs.db'}")
        for mode in ("flam", "global"):
            train(
                smoke_params(f"train.mode={mode}", "train.steps=40"),
                features_dir=smoke_features,
                out_dir=folder / mode,
                report_dir=folder / f"{mode}-reports",
            )
    return folder


@pytest.fixture(scope="session")
def flam_model(smoke_models: Path) -> Path:
    """The smoke FLAM model's folder."""
    return smoke_models / "flam"


@pytest.fixture(scope="module")
def detector(flam_model: Path):
    """The smoke FLAM model as a `FlamDetector` (what `flam detect` runs), one per test module."""
    from flam_core.inference import FlamDetector

    return FlamDetector.from_dir(flam_model)


HELD_OUT = "scratch"  # sources.held_out_sources of the smoke profile: its clips are `test_real`


@pytest.fixture(scope="session")
def real_set(smoke_library, tmp_path_factory) -> tuple[Path, object]:
    """The real-recording test set of the smoke library: (folder, summary)."""
    from flam_core.data.realset import build_real_set

    library, _ = smoke_library
    out = tmp_path_factory.mktemp("real") / "test_real"
    return out, build_real_set(smoke_params(), library, out)


@pytest.fixture(scope="session")
def val_real_set(smoke_library, tmp_path_factory) -> tuple[Path, object]:
    """The real-recording validation set of the smoke library: (folder, summary)."""
    from flam_core.data.realset import VAL_REAL_SPLIT, build_real_set

    library, _ = smoke_library
    out = tmp_path_factory.mktemp("real") / "val_real"
    return out, build_real_set(smoke_params(), library, out, split=VAL_REAL_SPLIT)
