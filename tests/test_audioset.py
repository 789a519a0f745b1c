"""The AudioSet classifier baseline: the backbone's classifier per frame, exactly, and a
deterministic prompt-to-class matching."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from flam_core.errors import ConfigError
from flam_core.evaluation.frames import vocabulary_scores
from flam_core.features import FeatureCache
from flam_core.inference import FlamDetector
from flam_core.model.audioset import audioset_model, class_weights
from flam_core.model.fusion import TOP_K
from flam_core.model.yamnet import load_class_names, load_yamnet
from tests.conftest import smoke_params


@pytest.fixture(scope="module")
def model():
    return audioset_model(smoke_params())


def test_class_names_are_the_521_of_the_classifier():
    names = load_class_names()
    assert len(names) == 521 and names[0] == "Speech" and names[-1] == "Field recording"
    assert load_yamnet().classifier.out_features == len(names)


def test_a_missing_class_map_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"yamnet_class_map\.csv"):
        load_class_names(tmp_path / "yamnet.pt")


def test_prompts_match_their_nearest_class_names(model):
    names = model.head.names
    weights = model.head.text_embeddings(model.text_encoder(["dog barking", "rain", "a siren wailing"]))
    top = [{names[c] for c in torch.nonzero(row).flatten().tolist()} for row in weights]
    assert top[0] & {"Dog", "Bark", "Bow-wow"} and top[1] & {"Rain", "Raindrop", "Rain on surface"}
    assert top[2] & {"Siren", "Civil defense siren", "Police car (siren)"}
    assert all(len(t) == TOP_K for t in top)
    torch.testing.assert_close(weights.sum(1), torch.ones(3))
    again = model.head.text_embeddings(model.text_encoder(["dog barking", "rain", "a siren wailing"]))
    assert torch.equal(weights, again)


def test_equal_cosines_are_ordered_by_class_index():
    classes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.5, 0.5]])
    weights = class_weights(torch.tensor([[1.0, 0.0]]), classes)
    assert torch.nonzero(weights[0]).flatten().tolist() == [0, 2, 3]  # three ties at cos 1: by index
    torch.testing.assert_close(weights[0, [0, 2, 3]], torch.full((3,), 1 / 3))


def test_frame_scores_are_the_classifier_on_the_cached_features(model, smoke_features):
    cache = FeatureCache(smoke_features, "test_seen")
    prompts = ["dog barking", "music"]
    scores = vocabulary_scores(model, cache, prompts)
    features = torch.from_numpy(np.asarray(cache.features[:], dtype=np.float32))
    with torch.no_grad():
        posteriors = torch.sigmoid(load_yamnet().classifier(features))  # [M, L, 521]
        weights = model.head.text_embeddings(model.text_encoder(prompts))
    expected = torch.einsum("mlc,kc->mkl", posteriors, weights).numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)


def test_the_detector_runs_it_on_a_file(model, tmp_path):
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(16000 * 12)).astype(np.float32)
    sf.write(tmp_path / "noise.wav", audio, 16000)
    detection = FlamDetector(model, smoke_params(), {"threshold": 0.3}).detect(
        tmp_path / "noise.wav", ["white noise", "speech"]
    )
    assert detection.probs.shape == (2, 39) and (detection.probs >= 0).all() and (detection.probs <= 1).all()
    assert detection.probs[0].mean() > detection.probs[1].mean()  # noise sounds like noise, not speech


def test_a_class_name_is_nearest_to_itself_and_a_novel_label_is_far(model):
    from flam_core.model.audioset import NEAR_SIMILARITY, nearest_classes

    nearest = nearest_classes(model, ["Dog", "Sitar", "a person speaking belarusian"])
    assert nearest["Dog"] == (1.0, "Dog") and nearest["Sitar"] == (1.0, "Sitar")
    similarity, name = nearest["a person speaking belarusian"]
    assert similarity < NEAR_SIMILARITY and name == "Speech"
