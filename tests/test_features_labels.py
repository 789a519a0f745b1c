"""The feature cache's frame labels: plain arrays (`<split>.labels.npz`), never a pickle."""

import json
import os
import shutil

import numpy as np
import pytest

from flam_core.data.recipes import read_recipes
from flam_core.errors import DataError
from flam_core.features import FeatureCache, read_labels, write_labels


class Payload:
    """Unpickling this object makes a folder: proof that a load ran code from the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_the_cache_holds_the_mixers_labels_as_arrays(smoke_features, smoke_recipes, mixer):
    recipes_dir, _ = smoke_recipes
    assert json.loads((smoke_features / "summary.json").read_text())["schema_version"] == 2
    assert not list(smoke_features.glob("*.pkl"))
    cache = FeatureCache(smoke_features, "val")
    plan = mixer.plan(read_recipes(recipes_dir / "val.parquet"))
    assert len(cache) == len(plan) > 0
    for i, (mixture_id, labels) in enumerate(cache.labels):
        expected = mixer.frame_labels(plan, i)
        assert mixture_id == int(plan.mixture_ids[i]) and cache[i].mixture_id == mixture_id
        assert labels.labels == expected.labels and labels.captions == expected.captions
        assert all(type(text) is str for text in labels.labels + labels.captions)
        assert labels.is_event.dtype == bool and np.array_equal(labels.is_event, expected.is_event)
        assert labels.frames.dtype == bool and np.array_equal(labels.frames, expected.frames)


def test_labels_round_trip_including_mixtures_without_labels(tmp_path, smoke_features):
    labels = FeatureCache(smoke_features, "train").labels[:5]
    _, first = labels[0]
    empty = type(first)(labels=(), captions=(), is_event=first.is_event[:0], frames=first.frames[:0])
    pairs = [*labels[:2], (999, empty), *labels[2:]]
    write_labels(tmp_path / "x.labels.npz", pairs, first.frames.shape[1])
    back = read_labels(tmp_path / "x.labels.npz")
    assert [m for m, _ in back] == [m for m, _ in pairs]
    for (_, a), (_, b) in zip(back, pairs, strict=True):
        assert a.labels == b.labels and a.captions == b.captions
        assert np.array_equal(a.is_event, b.is_event) and np.array_equal(a.frames, b.frames)
        assert a.frames.shape == b.frames.shape
    write_labels(tmp_path / "none.labels.npz", [], 32)
    assert read_labels(tmp_path / "none.labels.npz") == []


def test_an_old_pickled_cache_is_refused_unread(tmp_path, smoke_features):
    old = tmp_path / "old"
    shutil.copytree(smoke_features, old)
    (old / "train.labels.npz").unlink()
    marker = tmp_path / "code-ran"
    import pickle  # an old cache's file, as a shared remote could serve it

    (old / "train.labels.pkl").write_bytes(pickle.dumps([(0, Payload(marker))]))
    with pytest.raises(
        DataError, match=r"holds labels.pkl.*never loaded.*rebuild the feature cache with `flam features`"
    ):
        FeatureCache(old, "train")
    assert not marker.exists()


def test_damaged_label_files_are_data_errors(tmp_path, smoke_features):
    good = dict(np.load(smoke_features / "train.labels.npz"))
    path = tmp_path / "train.labels.npz"
    marker = tmp_path / "code-ran"
    damaged = {
        "an object array": good | {"caption_texts": np.array([Payload(marker)], dtype=object)},
        "a missing array": {k: v for k, v in good.items() if k != "frames"},
        "an index past its table": good | {"label": good["label"] + len(good["label_names"])},
        "offsets that disagree": good | {"start": good["start"][:-1]},
        "texts of another type": good | {"label_names": np.arange(len(good["label_names"]))},
    }
    for what, arrays in damaged.items():
        np.savez(path, **arrays, allow_pickle=True)
        with pytest.raises(DataError, match=r"labels file of `flam features`|disagree in type or length"):
            read_labels(path)
        assert not marker.exists(), what
    path.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(DataError, match="is not a labels file"):
        read_labels(path)
