"""Training batches: mixtures mixed on the fly (or read from shards) with a shared text buffer.

Batch layout (a dict; B = mixtures in the batch, S = `texts_per_audio` (+ 1 with
`background_texts`) x `batch_size` text slots, L = `frames.n_frames`, T = samples per mixture,
F = log-mel frames):

    "mixture_id"  LongTensor  [B]         recipe mixture ids
    "audio"       FloatTensor [B, T]      waveforms (float32, peak <= 0.99)
    "features"    FloatTensor [B, M, F]   log-mel (only when `loader.features`)
    "frame_features" FloatTensor [B, L, Da] cached encoder frame features (instead of "audio"
                                          and "features" when batching `CachedMixture`s)
    "texts"       list[str]   [S]         captions; "" in padded slots
    "text_labels" list[str]   [S]         the label each text names; "" in padded slots
    "text_mask"   BoolTensor  [S]         True for real texts
    "labels"      BoolTensor  [B, S, L]   labels[i, k, l]: the label of text k sounds in
                                          frame l of mixture i
    "frame_labels" list[FrameLabels] [B]  every label of each mixture (data-parallel training
                                          labels the other ranks' texts with them)

The text buffer: each mixture contributes the captions of up to N = `texts_per_audio` of its
event labels (the first N by onset), and with `background_texts` its background's label too (one
more slot per mixture), so that ambiences ("rain", "a crowd chattering") are prompts as well.
Identical captions are kept once. A text is labelled
against every mixture of the batch by its label, not by the mixture it came from: if
mixture j also contains "dog barking" (as an event or as its background), the text
"a dog barks" from mixture i is positive in j's frames where the dog sounds, not a
negative. The buffer is padded to a fixed S, so every batch has the same shapes.

Vocabulary negatives (`loader.negative_texts` = V > 0): the buffer also takes up to V texts of
training labels that no text of the batch names, one caption each, drawn uniformly over the
split's labels (`text_vocabulary`) by a generator seeded with the loader's seed and the batch's
mixture ids (so a batch draws the same texts in any worker, and on resume). They are labelled
like every other text (by label, against every mixture): almost always negative everywhere. Without
them a text meets in a batch only the mixtures around the one it came from, and never learns
where it must stay silent on the rest of the vocabulary; S grows by V.

Workers: with `num_workers` DataLoader workers (and optionally `rank`/`world_size` for
data-parallel training), each worker reads a disjoint slice of the (per-epoch shuffled)
mixture order, so an epoch yields every mixture exactly once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from flam_core.audio.features import LogMel
from flam_core.config import Params
from flam_core.data.mixer import FrameLabels, Mixer, MixPlan, Mixture
from flam_core.data.recipes import read_recipes
from flam_core.errors import ConfigError
from flam_core.utils import stable_seed


@dataclass(frozen=True)
class CachedMixture:
    """A mixture as the frozen audio encoder saw it: frame features instead of audio."""

    mixture_id: int
    features: np.ndarray  # [L, Da] float16 or float32
    labels: FrameLabels


class IndexedDataset(IterableDataset):
    """Iterates `items[i]` over a per-epoch shuffled order, each worker (and rank) a disjoint slice.

    `items` is anything with `len()` and integer indexing: rendered mixtures, a feature cache.
    """

    def __init__(
        self, items: Any, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        super().__init__()
        self.items = items
        self.shuffle, self.seed = shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """A new shuffle order per epoch (call before iterating, in the main process)."""
        self.epoch = epoch

    def indices(self) -> np.ndarray:
        """The item indices this worker (of this rank) reads, in order."""
        order = np.arange(len(self.items))
        if self.shuffle:
            order = np.random.default_rng(stable_seed(self.seed, "epoch", self.epoch)).permutation(order)
        # Every rank gets the same number of items, so that ranks stay in step.
        order = order[: len(order) - len(order) % self.world_size]
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return order[self.rank :: self.world_size][worker::n_workers]

    def __iter__(self) -> Iterator[Any]:
        for i in self.indices():
            yield self.items[int(i)]


class RenderedMixtures:
    """`Mixer.mix` over a plan as an indexable sequence of `Mixture`s."""

    def __init__(self, mixer: Mixer, plan: MixPlan) -> None:
        self.mixer, self.plan = mixer, plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> Mixture:
        return self.mixer.mix(self.plan, i)


class MixtureDataset(IndexedDataset):
    """Yields `Mixture`s of one recipe split, mixed on the fly. See the module docstring."""

    def __init__(
        self,
        mixer: Mixer,
        plan: MixPlan,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(RenderedMixtures(mixer, plan), shuffle, seed, rank, world_size)
        self.mixer, self.plan = mixer, plan


class ShardDataset(IterableDataset):
    """Yields `Mixture`s read from WebDataset shards; workers (and ranks) take disjoint shards."""

    def __init__(self, paths: Sequence[Path], rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        self.paths = sorted(Path(p) for p in paths)
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[Mixture]:
        from flam_core.data.shards import iter_shards

        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        yield from iter_shards(self.paths[self.rank :: self.world_size][worker::n_workers])


class Collate:
    """Mixtures -> one batch dict (see the module docstring). Picklable for worker processes."""

    def __init__(
        self,
        texts_per_audio: int,
        batch_size: int,
        features: LogMel | None = None,
        background_texts: bool = False,
        negative_texts: int = 0,
        vocabulary: Mapping[str, Sequence[str]] | None = None,
        seed: int = 0,
    ) -> None:
        if negative_texts < 0:
            raise ConfigError(f"negative_texts must be >= 0, got {negative_texts}")
        if negative_texts and not vocabulary:
            raise ConfigError("negative_texts > 0 needs the training vocabulary to draw them from")
        self.texts_per_audio, self.background_texts = texts_per_audio, background_texts
        self.negative_texts, self.seed = negative_texts, seed
        # labels in sorted order, each with its sorted captions: the draw depends on the set only
        self.vocabulary = {label: sorted(vocabulary[label]) for label in sorted(vocabulary or {})}
        self._vocabulary_labels = list(self.vocabulary)
        self.slots = (texts_per_audio + int(background_texts)) * batch_size + negative_texts
        self.features = features

    def __call__(self, mixtures: Sequence[Mixture | CachedMixture]) -> dict[str, Any]:
        texts: list[str] = []
        text_labels: list[str] = []
        seen: set[str] = set()
        for mixture in mixtures:
            labels = mixture.labels
            rows = [k for k in range(len(labels.labels)) if labels.is_event[k]][: self.texts_per_audio]
            if self.background_texts:
                rows += [k for k in range(len(labels.labels)) if not labels.is_event[k]]
            for k in rows:
                if labels.captions[k] not in seen:
                    seen.add(labels.captions[k])
                    texts.append(labels.captions[k])
                    text_labels.append(labels.labels[k])
        if self.negative_texts:
            self._add_negatives(mixtures, texts, text_labels)
        n_texts = len(texts)
        n_frames = mixtures[0].labels.frames.shape[1]
        targets = np.zeros((len(mixtures), self.slots, n_frames), dtype=bool)
        for i, mixture in enumerate(mixtures):
            row_of = {label: k for k, label in enumerate(mixture.labels.labels)}
            for k, label in enumerate(text_labels):
                row = row_of.get(label)
                if row is not None:
                    targets[i, k] = mixture.labels.frames[row]
        mask = np.zeros(self.slots, dtype=bool)
        mask[:n_texts] = True
        batch: dict[str, Any] = {
            "mixture_id": torch.tensor([m.mixture_id for m in mixtures], dtype=torch.long),
            "texts": texts + [""] * (self.slots - n_texts),
            "text_labels": text_labels + [""] * (self.slots - n_texts),
            "text_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(targets),
            "frame_labels": [m.labels for m in mixtures],
        }
        if isinstance(mixtures[0], CachedMixture):
            stacked = np.stack([m.features for m in mixtures])  # type: ignore[union-attr]
            batch["frame_features"] = torch.from_numpy(stacked).float()
            return batch
        audio = torch.from_numpy(np.stack([m.audio for m in mixtures]))  # type: ignore[union-attr]
        batch["audio"] = audio
        if self.features is not None:
            with torch.no_grad():
                batch["features"] = self.features(audio)
        return batch

    def _add_negatives(self, mixtures: Sequence[Any], texts: list[str], text_labels: list[str]) -> None:
        """Append up to `negative_texts` captions of vocabulary labels no text names yet."""
        # numpy seeds are non-negative: a negative loader seed wraps around
        rng = np.random.default_rng([self.seed % 2**64, *(int(m.mixture_id) for m in mixtures)])
        named, added = set(text_labels), 0
        for j in rng.permutation(len(self._vocabulary_labels)):
            label = self._vocabulary_labels[j]
            if label in named:
                continue
            captions = self.vocabulary[label]
            caption = captions[int(rng.integers(len(captions)))]
            if caption in texts:  # another label's caption, already in the buffer
                continue
            texts.append(caption)
            text_labels.append(label)
            added += 1
            if added == self.negative_texts:
                return


def text_vocabulary(labelled: Iterable[FrameLabels], backgrounds: bool = False) -> dict[str, set[str]]:
    """label -> its captions, over mixtures' labels: what the loader may put in a text buffer
    (`backgrounds`: with `loader.background_texts`, the backgrounds' labels too)."""
    vocabulary: dict[str, set[str]] = {}
    for labels in labelled:
        for label, caption, event in zip(labels.labels, labels.captions, labels.is_event, strict=True):
            if event or backgrounds:
                vocabulary.setdefault(label, set()).add(caption)
    return vocabulary


def plan_vocabulary(mixer: Mixer, plan: MixPlan, backgrounds: bool = False) -> dict[str, set[str]]:
    """`text_vocabulary` of a recipe split resolved by `mixer`: its mixtures' labels, no audio rendered."""
    return text_vocabulary((mixer.frame_labels(plan, i) for i in range(len(plan))), backgrounds)


def _split_plan(
    params: Params, split: str, library_dir: Path | None, recipes_dir: Path | None, mixer: Mixer | None
) -> tuple[Mixer, MixPlan]:
    """The mixer of the library and the recipe split it resolves (`mixer`: one already built)."""
    mixer = mixer or Mixer.for_library(params, Path(library_dir or params.sources.out_dir))
    return mixer, mixer.plan(read_recipes(Path(recipes_dir or params.synth.out_dir) / f"{split}.parquet"))


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def make_loader(
    params: Params,
    split: str,
    library_dir: Path | None = None,
    recipes_dir: Path | None = None,
    shards: Sequence[Path] | None = None,
    rank: int = 0,
    world_size: int = 1,
    mixer: Mixer | None = None,
) -> DataLoader:
    """A DataLoader over one recipe split: on the fly by default, from `shards` when given."""
    loader = params.loader
    features = LogMel(params.features, params.audio.sample_rate) if loader.features else None
    if shards is not None:
        dataset: IterableDataset = ShardDataset(shards, rank, world_size)
        split_plan = (
            _split_plan(params, split, library_dir, recipes_dir, mixer) if loader.negative_texts else None
        )
    else:
        split_plan = _split_plan(params, split, library_dir, recipes_dir, mixer)
        shuffle = loader.shuffle and split == "train"
        dataset = MixtureDataset(*split_plan, shuffle, loader.seed, rank, world_size)
    vocabulary = (
        plan_vocabulary(*split_plan, loader.background_texts)
        if split_plan and loader.negative_texts
        else None
    )
    collate = Collate(
        loader.texts_per_audio,
        loader.batch_size,
        features,
        loader.background_texts,
        loader.negative_texts,
        vocabulary,
        loader.seed,
    )
    return DataLoader(
        dataset,
        batch_size=loader.batch_size,
        collate_fn=collate,
        num_workers=loader.num_workers,
        worker_init_fn=_worker_init if loader.num_workers else None,
        multiprocessing_context="fork" if loader.num_workers else None,
        persistent_workers=False,
    )
