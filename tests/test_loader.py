import numpy as np
import pytest
import torch

from flam_core.data.loader import Collate, MixtureDataset, make_loader, plan_vocabulary, text_vocabulary
from flam_core.data.mixer import Mixer
from flam_core.data.recipes import read_recipes
from flam_core.data.sources import load_manifest
from flam_core.errors import ConfigError
from tests.conftest import smoke_params


@pytest.fixture(scope="module")
def setup(smoke_library, smoke_recipes):
    library, _ = smoke_library
    recipes_dir, _ = smoke_recipes
    params = smoke_params("loader.batch_size=4", "loader.num_workers=2")
    mixer = Mixer(load_manifest(library), library, params.synth, params.frames, params.audio.sample_rate)
    return params, library, recipes_dir, mixer


def test_batch_layout(setup):
    params, library, recipes_dir, mixer = setup
    loader = make_loader(params, "val", library, recipes_dir, mixer=mixer)
    batch = next(iter(loader))
    slots = params.loader.texts_per_audio + params.loader.background_texts  # + each background's label
    b, s, n_frames = 4, slots * 4, params.frames.n_frames
    assert batch["audio"].shape == (b, mixer.n_samples) and batch["audio"].dtype == torch.float32
    assert batch["features"].shape[:2] == (b, params.features.n_mels)
    assert batch["features"].shape[2] == mixer.n_samples // int(params.features.hop_s * 16000) + 1
    assert len(batch["texts"]) == len(batch["text_labels"]) == s
    assert batch["text_mask"].shape == (s,) and batch["labels"].shape == (b, s, n_frames)
    n_texts = int(batch["text_mask"].sum())
    assert all(batch["texts"][:n_texts]) and not any(batch["texts"][n_texts:])
    assert not batch["labels"][:, n_texts:].any()
    assert len(set(batch["texts"][:n_texts])) == n_texts  # deduplicated
    backgrounds = {
        f.labels[k] for f in batch["frame_labels"] for k in range(len(f.labels)) if not f.is_event[k]
    }
    assert params.loader.background_texts and backgrounds <= set(batch["text_labels"])


def test_texts_are_labelled_against_every_mixture_by_label(setup):
    _, _, recipes_dir, mixer = setup
    plan = mixer.plan(read_recipes(recipes_dir / "train.parquet"))
    mixtures = [mixer.mix(plan, i) for i in range(len(plan))]
    collate = Collate(texts_per_audio=5, batch_size=len(mixtures))
    batch = collate(mixtures)
    shared = 0
    for k, label in enumerate(batch["text_labels"]):
        if not label:
            continue
        for i, mixture in enumerate(mixtures):
            labels = mixture.labels
            if label in labels.labels:
                expected = labels.frames[labels.labels.index(label)]
                shared += 1
            else:
                expected = np.zeros(mixer.frames.n_frames, bool)
            assert np.array_equal(batch["labels"][i, k].numpy(), expected), (k, i, label)
    assert shared > len([t for t in batch["text_labels"] if t])  # labels recur across mixtures


def test_vocabulary_negatives_are_absent_labels_drawn_per_batch(setup):
    _, _, recipes_dir, mixer = setup
    plan = mixer.plan(read_recipes(recipes_dir / "train.parquet"))
    mixtures = [mixer.mix(plan, i) for i in range(len(plan))]
    vocabulary = plan_vocabulary(mixer, plan, backgrounds=True)
    # the plan's vocabulary is what the mixtures' own labels name
    assert vocabulary == text_vocabulary((m.labels for m in mixtures), backgrounds=True)
    assert text_vocabulary(m.labels for m in mixtures) == plan_vocabulary(mixer, plan)
    plain = Collate(texts_per_audio=1, batch_size=2, background_texts=True)
    collate = Collate(1, 2, background_texts=True, negative_texts=3, vocabulary=vocabulary, seed=7)
    draws = set()
    for start in range(0, len(mixtures) - 1, 2):
        pair = mixtures[start : start + 2]
        own, batch = plain(pair), collate(pair)
        n_own, n = int(own["text_mask"].sum()), int(batch["text_mask"].sum())
        assert len(batch["texts"]) == len(own["texts"]) + 3 == 2 * 2 + 3
        assert batch["texts"][:n_own] == own["texts"][:n_own]  # the batch's own texts first, unchanged
        added = batch["text_labels"][n_own:n]
        assert n - n_own == 3 and len(set(added)) == 3
        assert not set(added) & set(own["text_labels"][:n_own])  # labels no text of the batch names
        for k in range(n_own, n):
            assert batch["texts"][k] in vocabulary[batch["text_labels"][k]]
            for i, mixture in enumerate(pair):  # labelled by label, like every text
                labels = mixture.labels
                row = (
                    labels.labels.index(batch["text_labels"][k])
                    if batch["text_labels"][k] in labels.labels
                    else None
                )
                expected = labels.frames[row] if row is not None else np.zeros(mixer.frames.n_frames, bool)
                assert np.array_equal(batch["labels"][i, k].numpy(), expected)
        assert collate(pair)["texts"] == batch["texts"]  # the same batch draws the same texts
        draws.add(tuple(added))
    assert len(draws) > 1  # and other batches other ones
    with pytest.raises(ConfigError, match="vocabulary"):
        Collate(1, 2, negative_texts=3)
    wrapped = Collate(1, 2, background_texts=True, negative_texts=3, vocabulary=vocabulary, seed=-1)
    assert wrapped(mixtures[:2])["text_mask"].sum() == collate(mixtures[:2])["text_mask"].sum()  # any seed
    # the loader draws them from its split's vocabulary
    first = {}
    for v in (0, 3):
        params = smoke_params("loader.batch_size=4", "loader.num_workers=0", f"loader.negative_texts={v}")
        first[v] = next(iter(make_loader(params, "train", recipes_dir=recipes_dir, mixer=mixer)))
    assert len(first[3]["texts"]) == len(first[0]["texts"]) + 3
    n_own, n = int(first[0]["text_mask"].sum()), int(first[3]["text_mask"].sum())
    assert n == n_own + 3 and first[3]["texts"][:n_own] == first[0]["texts"][:n_own]
    assert set(first[3]["text_labels"][n_own:n]) <= set(vocabulary) - set(first[0]["text_labels"])


def test_workers_read_disjoint_slices_covering_the_split_once(setup):
    params, library, recipes_dir, mixer = setup
    loader = make_loader(params, "train", library, recipes_dir, mixer=mixer)
    ids = torch.cat([batch["mixture_id"] for batch in loader]).tolist()
    assert sorted(ids) == list(range(len(loader.dataset.plan)))


def test_data_parallel_ranks_split_the_epoch_and_epochs_reshuffle(setup):
    _, _, recipes_dir, mixer = setup
    plan = mixer.plan(read_recipes(recipes_dir / "train.parquet"))
    ranks = [
        MixtureDataset(mixer, plan, shuffle=True, seed=3, rank=r, world_size=2).indices() for r in (0, 1)
    ]
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted([*ranks[0], *ranks[1]]) == list(range(len(plan)))
    dataset = MixtureDataset(mixer, plan, shuffle=True, seed=3)
    first = dataset.indices().tolist()
    dataset.set_epoch(1)
    assert dataset.indices().tolist() != first and sorted(dataset.indices().tolist()) == sorted(first)


def test_loader_audio_equals_the_mixer(setup):
    params, library, recipes_dir, mixer = setup
    loader = make_loader(params, "val", library, recipes_dir, mixer=mixer)
    plan = loader.dataset.plan
    for batch in loader:
        for row, mixture_id in enumerate(batch["mixture_id"].tolist()):
            index = int(np.flatnonzero(plan.mixture_ids == mixture_id)[0])
            assert np.array_equal(batch["audio"][row].numpy(), mixer.render(plan, index))


def test_shard_batches_equal_on_the_fly_batches(setup, tmp_path):
    from flam_core.data.shards import shard_paths, write_shards

    params, library, recipes_dir, mixer = setup
    params = smoke_params("loader.batch_size=4", "loader.num_workers=0", "shards.max_shard_mb=0.5")
    write_shards(params, library, recipes_dir, out_dir=tmp_path / "shards", splits=["val"])
    paths = shard_paths(tmp_path / "shards", "val")
    assert len(paths) > 1
    from_shards = list(make_loader(params, "val", shards=paths))
    on_the_fly = list(make_loader(params, "val", library, recipes_dir, mixer=mixer))
    assert len(from_shards) == len(on_the_fly)
    for a, b in zip(from_shards, on_the_fly, strict=True):
        assert torch.equal(a["mixture_id"], b["mixture_id"]) and torch.equal(a["audio"], b["audio"])
        assert a["texts"] == b["texts"] and torch.equal(a["labels"], b["labels"])
        assert torch.equal(a["features"], b["features"])
