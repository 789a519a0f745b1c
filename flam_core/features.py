"""Frozen-backbone feature cache: every mixture's encoder frame features, computed once.

In the CPU profile the audio encoder is frozen, so its output per mixture never changes:
`build_feature_cache` renders each recipe mixture, runs the encoder once, and stores

    <split>.features.npy   float16 `[M, L, Da]` (memory-mapped when read)
    <split>.labels.npz     every mixture's frame labels, in the same order (`write_labels`)
    summary.json           encoder, shapes, and the hashes of what made the cache

so that training runs only the trainable parts (context block, projections, heads). Caches
travel through a shared DVC remote, so nothing in them is executable: the labels are plain
arrays read with `allow_pickle=False` (caches of schema 1 held a pickle and must be rebuilt).
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress

from flam_core.config import Params
from flam_core.data.loader import CachedMixture
from flam_core.data.mixer import FrameLabels, Mixer
from flam_core.data.recipes import RECIPE_SPLITS, read_recipes
from flam_core.errors import DataError
from flam_core.model.audio_encoder import audio_encoder_from_params
from flam_core.utils import atomic_dir, atomic_write_text, interactive

SCHEMA_VERSION = 2  # 2: labels as arrays (<split>.labels.npz) instead of a pickle


@dataclass(frozen=True)
class FeatureCacheSummary:
    """What `build_feature_cache` wrote; `to_json()` is the cache's `summary.json`."""

    schema_version: int
    encoder: str  # model.audio_encoder
    dim: int  # feature width Da
    n_frames: int  # frames per mixture L
    shapes: dict[str, list[int]]  # per split: [M, L, Da]
    recipes_params_hash: str | None  # of the recipes the mixtures came from
    sources_manifest_hash: str | None
    params_hash: str  # of the audio, frames and model sections

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def build_feature_cache(
    params: Params,
    library_dir: Path,
    recipes_dir: Path,
    out_dir: Path,
    splits: Sequence[str] = RECIPE_SPLITS,
    batch_size: int = 32,
) -> FeatureCacheSummary:
    """Encode every mixture of `splits` with the frozen encoder named in `model.audio_encoder`."""
    if not params.model.frozen_audio:
        raise DataError("the feature cache needs a frozen audio encoder (model.frozen_audio=true)")
    encoder = audio_encoder_from_params(params, frozen=True).eval()
    library_dir, recipes_dir = Path(library_dir), Path(recipes_dir)
    mixer = Mixer.for_library(params, library_dir)
    recipes_summary = json.loads((recipes_dir / "summary.json").read_text())
    shapes: dict[str, list[int]] = {}
    with atomic_dir(Path(out_dir)) as staging, Progress(disable=not interactive()) as progress:
        for split in splits:
            plan = mixer.plan(read_recipes(recipes_dir / f"{split}.parquet"))
            n, n_frames, dim = len(plan), params.frames.n_frames, encoder.out_dim
            features = np.lib.format.open_memmap(
                staging / f"{split}.features.npy", mode="w+", dtype=np.float16, shape=(n, n_frames, dim)
            )
            labels = []
            task = progress.add_task(f"features {split}", total=n)
            for start in range(0, n, batch_size):
                mixtures = [mixer.mix(plan, i) for i in range(start, min(start + batch_size, n))]
                with torch.no_grad():
                    out = encoder(torch.from_numpy(np.stack([m.audio for m in mixtures])))
                features[start : start + len(mixtures)] = out.numpy().astype(np.float16)
                labels.extend((m.mixture_id, m.labels) for m in mixtures)
                progress.advance(task, len(mixtures))
            features.flush()
            del features
            write_labels(staging / f"{split}.labels.npz", labels, n_frames)
            shapes[split] = [n, n_frames, dim]
        summary = FeatureCacheSummary(
            schema_version=SCHEMA_VERSION,
            encoder=params.model.audio_encoder,
            dim=encoder.out_dim,
            n_frames=params.frames.n_frames,
            shapes=shapes,
            recipes_params_hash=recipes_summary.get("params_hash"),
            sources_manifest_hash=recipes_summary.get("sources_manifest_hash"),
            params_hash=params.section_hash("audio", "frames", "model"),
        )
        atomic_write_text(staging / "summary.json", json.dumps(summary.to_json(), indent=2))
    return summary


# name -> numpy dtype kind of every array in a labels file
LABEL_ARRAYS = {
    "mixture_id": "i",
    "start": "i",
    "label": "i",
    "label_names": "U",
    "caption": "i",
    "caption_texts": "U",
    "is_event": "b",
    "frames": "b",
}


def write_labels(path: Path, labels: Sequence[tuple[int, FrameLabels]], n_frames: int) -> None:
    """Store `(mixture_id, FrameLabels)` pairs as plain arrays in one compressed `.npz`.

    Mixture i owns the label rows `start[i]:start[i + 1]` of the flat row arrays; the texts are
    stored once each and referred to by index (a split repeats a few hundred labels and
    captions over many mixtures):

        mixture_id  int64 [M]           start          int64 [M + 1]
        label       int32 [R]  ->       label_names    str   [V]
        caption     int32 [R]  ->       caption_texts  str   [C]
        is_event    bool  [R]           frames         bool  [R, n_frames]
    """
    rows = [frame_labels for _, frame_labels in labels]
    counts = [len(row.labels) for row in rows]
    label_names, label = np.unique(
        np.array([t for row in rows for t in row.labels], dtype=str), return_inverse=True
    )
    caption_texts, caption = np.unique(
        np.array([t for row in rows for t in row.captions], dtype=str), return_inverse=True
    )
    np.savez_compressed(
        path,
        mixture_id=np.array([mixture_id for mixture_id, _ in labels], dtype=np.int64),
        start=np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64),
        label=label.astype(np.int32),
        label_names=label_names,
        caption=caption.astype(np.int32),
        caption_texts=caption_texts,
        is_event=np.concatenate([row.is_event for row in rows] or [np.zeros(0)]).astype(bool),
        frames=np.concatenate([row.frames for row in rows] or [np.zeros((0, n_frames))]).astype(bool),
    )


def read_labels(path: Path) -> list[tuple[int, FrameLabels]]:
    """The `(mixture_id, FrameLabels)` pairs of `write_labels`; DataError when the file is not one."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in LABEL_ARRAYS}
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path} is not a labels file of `flam features` ({exc}): rebuild the cache") from exc
    start, n_rows = arrays["start"], len(arrays["label"])
    consistent = (
        all(arrays[name].dtype.kind == kind and arrays[name].ndim >= 1 for name, kind in LABEL_ARRAYS.items())
        and arrays["frames"].ndim == 2
        and len(start) == len(arrays["mixture_id"]) + 1
        and start[0] == 0
        and start[-1] == n_rows
        and bool(np.all(np.diff(start) >= 0))
        and len(arrays["caption"]) == len(arrays["is_event"]) == len(arrays["frames"]) == n_rows
        and _indexes(arrays["label"], len(arrays["label_names"]))
        and _indexes(arrays["caption"], len(arrays["caption_texts"]))
    )
    if not consistent:
        raise DataError(
            f"{path}: the label arrays disagree in type or length; rebuild the cache with `flam features`"
        )
    names, texts = arrays["label_names"].tolist(), arrays["caption_texts"].tolist()
    label = [names[i] for i in arrays["label"].tolist()]
    caption = [texts[i] for i in arrays["caption"].tolist()]
    return [
        (
            int(mixture_id),
            FrameLabels(
                labels=tuple(label[a:b]),
                captions=tuple(caption[a:b]),
                is_event=arrays["is_event"][a:b],
                frames=arrays["frames"][a:b],
            ),
        )
        for mixture_id, a, b in zip(
            arrays["mixture_id"].tolist(), start[:-1].tolist(), start[1:].tolist(), strict=True
        )
    ]


def _indexes(index: np.ndarray, size: int) -> bool:
    """Whether every entry of `index` points into a table of `size` entries."""
    return len(index) == 0 or (int(index.min()) >= 0 and int(index.max()) < size)


class FeatureCache:
    """One split of a feature cache: `features [M, L, Da]` (memory-mapped) and frame labels."""

    def __init__(self, cache_dir: Path, split: str) -> None:
        cache_dir = Path(cache_dir)
        features_path = cache_dir / f"{split}.features.npy"
        if not features_path.is_file():
            raise DataError(f"no cached features for split {split!r} in {cache_dir}; run `flam features`")
        self.summary = json.loads((cache_dir / "summary.json").read_text())
        labels_path = cache_dir / f"{split}.labels.npz"
        if not labels_path.is_file():
            old = " (it holds labels.pkl, the pickled labels of an older flam, never loaded)"
            raise DataError(
                f"{cache_dir}: no labels for split {split!r}"
                f"{old if (cache_dir / f'{split}.labels.pkl').exists() else ''}; "
                "rebuild the feature cache with `flam features`"
            )
        self.features = np.load(features_path, mmap_mode="r")
        self.labels: list[tuple[int, FrameLabels]] = read_labels(labels_path)
        if len(self.labels) != len(self.features):
            raise DataError(
                f"{cache_dir}: {split} has {len(self.features)} feature rows but {len(self.labels)} labels"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> CachedMixture:
        mixture_id, labels = self.labels[i]
        return CachedMixture(mixture_id, np.asarray(self.features[i]), labels)
