import json

import numpy as np
import pytest
from kfp.dsl import Artifact, Dataset

from components.features.component import build_features
from flam_core.data.recipes import RECIPE_SPLITS, build_recipes
from flam_core.errors import DataError
from flam_core.features import FeatureCache
from tests.conftest import smoke_params

# Few mixtures: the encoder runs on every one of them.
FEW = ("synth.n_mixtures={train: 6, val: 3, val_unseen: 3, test_seen: 3, test_unseen: 3}",)


def write_params(tmp_path, *overrides: str) -> Artifact:
    (tmp_path / "params.json").write_text(smoke_params(*FEW, *overrides).model_dump_json())
    return Artifact(uri=str(tmp_path / "params.json"))


def test_caches_the_features_of_every_split(smoke_library, tmp_path):
    library = smoke_library[0]
    recipes = build_recipes(smoke_params(*FEW), library_dir=library, out_dir=tmp_path / "recipes")
    features = Dataset(uri=str(tmp_path / "features"))
    build_features.python_func(
        params=write_params(tmp_path),
        library=Dataset(uri=str(library)),
        recipes=Dataset(uri=str(tmp_path / "recipes")),
        features=features,
    )
    summary = json.loads((tmp_path / "features" / "summary.json").read_text())
    assert features.metadata == {k: summary[k] for k in ("encoder", "dim", "shapes")}
    assert features.metadata["encoder"] == "yamnet" and summary["recipes_params_hash"] == recipes.params_hash
    for split in RECIPE_SPLITS:
        cache = FeatureCache(tmp_path / "features", split)
        n = recipes.splits[split]["n_mixtures"]
        assert (
            list(cache.features.shape)
            == features.metadata["shapes"][split]
            == [n, smoke_params().frames.n_frames, summary["dim"]]
        )
        assert len(cache) == n and np.isfinite(np.asarray(cache.features)).all()


def test_an_encoder_that_trains_has_no_cache(smoke_library, smoke_recipes, tmp_path):
    features = Dataset(uri=str(tmp_path / "features"))
    with pytest.raises(DataError, match="frozen audio encoder"):
        build_features.python_func(
            params=write_params(tmp_path, "model.frozen_audio=false"),
            library=Dataset(uri=str(smoke_library[0])),
            recipes=Dataset(uri=str(smoke_recipes[0])),
            features=features,
        )
    assert not (tmp_path / "features").exists() and not features.metadata
