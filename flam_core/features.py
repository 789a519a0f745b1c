"""Frozen-backbone feature cache: every mixture's encoder frame features, computed once.

In the CPU profile the audio encoder is frozen, so its output per mixture never changes:
`build_feature_cache` renders each recipe mixture, runs the encoder once, and stores

    <split>.features.npy   float16 `[M, L, Da]` (memory-mapped when read)
    <split>.labels.pkl     list of (mixture_id, FrameLabels), in the same order
    summary.json           encoder, shapes, and the hashes of what made the cache

so that training runs only the trainable parts (context block, projections, heads).
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress

from flam_core.config import Params
from flam_core.data.loader import CachedMixture
from flam_core.data.mixer import Mixer
from flam_core.data.recipes import RECIPE_SPLITS, read_recipes
from flam_core.errors import DataError
from flam_core.model.audio_encoder import audio_encoder_from_params
from flam_core.utils import atomic_dir, atomic_write_text, interactive

SCHEMA_VERSION = 1


def build_feature_cache(
    params: Params,
    library_dir: Path,
    recipes_dir: Path,
    out_dir: Path,
    splits: Sequence[str] = RECIPE_SPLITS,
    batch_size: int = 32,
) -> dict[str, Any]:
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
            with (staging / f"{split}.labels.pkl").open("wb") as handle:
                pickle.dump(labels, handle, protocol=pickle.HIGHEST_PROTOCOL)
            shapes[split] = [n, n_frames, dim]
        summary = {
            "schema_version": SCHEMA_VERSION,
            "encoder": params.model.audio_encoder,
            "dim": encoder.out_dim,
            "n_frames": params.frames.n_frames,
            "shapes": shapes,
            "recipes_params_hash": recipes_summary.get("params_hash"),
            "sources_manifest_hash": recipes_summary.get("sources_manifest_hash"),
            "params_hash": params.section_hash("audio", "frames", "model"),
        }
        atomic_write_text(staging / "summary.json", json.dumps(summary, indent=2))
    return summary


class FeatureCache:
    """One split of a feature cache: `features [M, L, Da]` (memory-mapped) and frame labels."""

    def __init__(self, cache_dir: Path, split: str) -> None:
        cache_dir = Path(cache_dir)
        features_path = cache_dir / f"{split}.features.npy"
        if not features_path.is_file():
            raise DataError(f"no cached features for split {split!r} in {cache_dir}; run `flam features`")
        self.summary = json.loads((cache_dir / "summary.json").read_text())
        self.features = np.load(features_path, mmap_mode="r")
        with (cache_dir / f"{split}.labels.pkl").open("rb") as handle:
            self.labels = pickle.load(handle)  # written by build_feature_cache, a trusted local file
        if len(self.labels) != len(self.features):
            raise DataError(
                f"{cache_dir}: {split} has {len(self.features)} feature rows but {len(self.labels)} labels"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> CachedMixture:
        mixture_id, labels = self.labels[i]
        return CachedMixture(mixture_id, np.asarray(self.features[i]), labels)
