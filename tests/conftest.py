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


def fuse_with_classifier(
    folder: Path, features: Path, weight: float = 0.5, floor: float = -13.8, prior_weight: float = 0.0
) -> None:
    """Calibrate the model folder's detector as fused with the backbone's classifier
    (`flam_core.model.fusion`; the head's prior at `prior_weight`) over a small cohort of the
    training features, by hand: the cohort's moments and an arbitrary increasing map, no threshold
    search."""
    import json

    import numpy as np
    import torch

    from flam_core.features import FeatureCache
    from flam_core.model.folder import load_model
    from flam_core.model.fusion import ClassifierFusion
    from flam_core.model.score_norm import CohortNorm
    from flam_core.model.yamnet import load_class_names

    model, _, _ = load_model(folder)
    with torch.no_grad():
        model.fusion = ClassifierFusion.of(
            model.audio_encoder.yamnet.classifier, model.text_encoder(load_class_names()), floor=floor
        )
        cache = FeatureCache(features, "train")
        vectors = model.frame_vectors(torch.from_numpy(np.asarray(cache.features[:40], dtype=np.float32)))
    d = model.head.config.embed_dim
    vectors = vectors.reshape(-1, vectors.shape[-1])
    center = vectors[:, d:].mean(0)
    vectors[:, d:] -= center  # the logits centred, as calibration centres them
    norm = CohortNorm.from_frames(
        vectors,
        split=d,
        weight=weight,
        class_features=model.fusion.class_features,
        class_center=center,
        logit_floor=floor,
        prior_weight=prior_weight,
    ).with_map(1.0, -0.5)
    norm.save(folder)
    (folder / "calibration.json").write_text(json.dumps({"threshold": 0.5, "score_norm": norm.entry()}))
