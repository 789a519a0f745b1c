"""Texts grounded in the backbone's AudioSet classifier: what the grounding adds to a text, and
that a model carries the grounding it was trained with."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from flam_core.errors import ConfigError
from flam_core.model.flam import build_model
from flam_core.model.folder import load_model, save_model
from flam_core.model.grounding import TextGrounding, backbone_grounding
from flam_core.model.text_encoder import TextEncoder
from flam_core.model.yamnet import EMBEDDING_SIZE, NUM_CLASSES, load_class_names, load_yamnet
from tests.conftest import smoke_params


@pytest.fixture(scope="module")
def grounding() -> TextGrounding:
    return backbone_grounding(TextEncoder())


def test_a_class_name_is_grounded_in_its_own_classifier_row(grounding):
    names = load_class_names()
    picked = ["Bark", "Rain", "Siren", "Applause", "Church bell"]
    rows = [names.index(n) for n in picked]
    features = TextEncoder()(picked)
    grounded = grounding(features)
    assert grounded.shape == (len(picked), features.shape[1] + EMBEDDING_SIZE)
    torch.testing.assert_close(grounded[:, : features.shape[1]], features)  # the text itself, unchanged
    classifier = F.normalize(load_yamnet().classifier.weight.detach(), dim=-1)
    nearest_row = (grounded[:, features.shape[1] :] @ classifier.T).argmax(dim=1)
    assert nearest_row.tolist() == rows


def test_a_paraphrase_is_grounded_in_its_class(grounding):
    """Words that are no class name land on the class they describe."""
    names = load_class_names()
    classifier = F.normalize(load_yamnet().classifier.weight.detach(), dim=-1)
    texts = ["a dog barking loudly", "heavy rainfall"]
    features = TextEncoder()(texts)
    parts = grounding(features)[:, features.shape[1] :]
    nearest = [names[i] for i in (parts @ classifier.T).argmax(dim=1).tolist()]
    assert nearest == ["Bark", "Rain"]


def test_grounding_needs_one_text_feature_per_classifier_row():
    with pytest.raises(ConfigError, match="one text feature per classifier row"):
        TextGrounding.of(torch.zeros(520, 384), torch.zeros(NUM_CLASSES, EMBEDDING_SIZE))


def test_a_grounded_model_reads_its_grounding_back_from_its_folder(tmp_path):
    params = smoke_params("model.text_grounding=true")
    model = build_model(params)
    assert model.head.grounding is not None
    # a grounding unlike the installed backbone's: the folder's own must come back, not a rebuilt one
    with torch.no_grad():
        model.head.grounding.values.copy_(F.normalize(torch.randn(NUM_CLASSES, EMBEDDING_SIZE), dim=-1))
    save_model(tmp_path, model, params)
    loaded, loaded_params, _ = load_model(tmp_path)
    assert loaded_params.model.text_grounding
    torch.testing.assert_close(loaded.head.grounding.values, model.head.grounding.values)
    torch.testing.assert_close(loaded.head.grounding.keys, model.head.grounding.keys)
    prompts = ["glass breaking", "rain on a roof"]
    with torch.no_grad():
        expected = model.prompt_vectors(model.text_encoder(prompts))
        got = loaded.prompt_vectors(loaded.text_encoder(prompts))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_an_ungrounded_model_reads_texts_as_they_are():
    model = build_model(smoke_params("model.text_grounding=false"), audio_dim=EMBEDDING_SIZE)
    assert model.head.grounding is None
    features = model.text_encoder(["rain"])
    assert model.head.text_input(features) is features
    assert model.head.text_proj[0].in_features == features.shape[1]


def test_a_model_saved_before_grounding_loads_without_it(tmp_path):
    params = smoke_params("model.text_grounding=false")
    model = build_model(params)
    save_model(tmp_path, model, params)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["params"]["model"]["text_grounding"]  # as folders written before grounding are
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded, loaded_params, _ = load_model(tmp_path)
    assert loaded.head.grounding is None and not loaded_params.model.text_grounding
