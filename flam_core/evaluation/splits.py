"""The held-out mixture splits as evaluation and calibration read them, and the threshold rule
they share.

A `MixtureSplit` is one split of mixtures (`val`, `val_unseen`, `test_seen`, `test_unseen`):
its cached frame features, the vocabulary of event labels it holds, the frame truth of every
label, and the exact events the mixer placed (onset, offset, label). `detector_threshold` is
how a detector's one shared threshold is chosen on a validation split: by `flam calibrate` for
FLAM, and by `evaluate` for a baseline without calibration, so every model is read at a
threshold chosen the same way and never on a test split (`VALIDATION_OF`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flam_core.config import Params
from flam_core.data.events import Event
from flam_core.data.mixer import Mixer
from flam_core.data.recipes import read_recipes
from flam_core.errors import DataError
from flam_core.evaluation.frames import event_vocabulary, truth_matrix
from flam_core.evaluation.sed import best_threshold
from flam_core.features import FeatureCache
from flam_core.postprocess import median_filter_frames

VALIDATION_OF = {"test_unseen": "val_unseen", "test_seen": "val"}  # where thresholds are chosen


class MixtureSplit:
    """One mixture split: cached features, vocabulary, frame truth and exact events."""

    def __init__(
        self, params: Params, name: str, features_dir: Path, mixer: Mixer, recipes_dir: Path
    ) -> None:
        self.name = name
        self.cache = FeatureCache(features_dir, name)
        self.ids, self.events, self.vocabulary = split_events(mixer, recipes_dir, name, self.cache)
        self.durations = dict.fromkeys(self.ids, params.synth.mixture_s)
        self.truth = truth_matrix(self.cache, self.vocabulary)


def split_events(
    mixer: Mixer, recipes_dir: Path, split: str, cache: FeatureCache
) -> tuple[list[str], dict[str, list[Event]], list[str]]:
    """(mixture ids, exact events per mixture, vocabulary) of a split whose features are cached.

    The vocabulary is every event label of the split with at least one event (a piece whose
    active part falls outside the mixture leaves its label without one); events of other
    labels (backgrounds) are left out.
    """
    plan = mixer.plan(read_recipes(Path(recipes_dir) / f"{split}.parquet"))
    ids = [str(int(m)) for m in plan.mixture_ids]
    if ids != [str(m) for m, _ in cache.labels]:
        raise DataError(
            f"the cached features do not hold the {split} mixtures of {recipes_dir}: rebuild them"
        )
    labels = set(event_vocabulary(cache))
    events = {ids[i]: [e for e in mixer.events(plan, i) if e.label in labels] for i in range(len(plan))}
    vocabulary = sorted({e.label for evs in events.values() for e in evs})
    if not vocabulary:
        raise DataError(f"the {split} split has no event to evaluate")
    return ids, events, vocabulary


def detector_threshold(scores: np.ndarray, split: MixtureSplit, hop: float) -> tuple[float, float]:
    """The rule for a detector's shared threshold, used by `flam calibrate` and for uncalibrated
    baselines: the threshold that maximises macro segment F1 of `split`'s scores after the
    detector's median filter (what it thresholds), and that F1."""
    args = (hop, split.vocabulary, split.ids, split.events)
    return best_threshold(median_filter_frames(scores), *args, criterion="segment")
