"""The real-recording test (`test_real`, built by `flam_core.data.realset`): every system that
scores files, scored on recordings and clips from whole sources that training never saw.

The metrics (`evaluate_real_set`), for every system that scores files (FLAM and the trained
baselines through `FlamDetector.detect`, or any object with the same `detect`): frame AUROC per
label over every frame of every recording, its macro mean and the pooled (micro) AUROC of all
prompts together, which asks whether one threshold can serve every prompt; the event-found rate
(a label sounding in a recording scores higher somewhere inside its spans than anywhere outside
them); segment F1 at the system's calibrated threshold per prompt and its false-alarm rate (the
share of recordings x absent prompts with a detected segment); zero-shot top-1 / top-5 of the
isolated clips over the set's class list (a clip's score for a class is its highest frame score).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from flam_core.data.sources import REAL_SPLIT
from flam_core.data.tsv import SedDataset
from flam_core.errors import DataError, SilentAudioError
from flam_core.evaluation.frames import frame_auroc, frame_truth
from flam_core.evaluation.sed import best_threshold, segment_f1
from flam_core.postprocess import median_filter_frames

if TYPE_CHECKING:
    from flam_core.detection import Detection

TOP_K = (1, 5)


class FileScorer(Protocol):
    """What the test needs of a system: frame scores and decisions for prompts on a file."""

    frame_hop_s: float

    def detect(self, audio: Any, prompts: list[str]) -> Detection: ...


@dataclass(frozen=True)
class RealSet:
    """A built set, read back: its recordings and clips as SED datasets, and its prompts."""

    folder: Path
    recordings: SedDataset
    clips: SedDataset
    labels: list[str]
    summary: dict[str, Any]  # summary.json, as `flam_core.data.realset.build_real_set` wrote it

    @classmethod
    def read(cls, folder: Path | str) -> RealSet:
        folder = Path(folder)
        summary = folder / "summary.json"
        if not summary.is_file():
            raise DataError(
                f"{folder} is not a built real-recording set (no summary.json): run `flam synth real`"
            )
        content = json.loads(summary.read_text())
        if "split" not in content:
            raise DataError(
                f"{folder} was built without its split in summary.json: rebuild it (`flam synth real`)"
            )
        return cls(
            folder=folder,
            recordings=SedDataset(folder / "recordings", folder / "recordings.tsv"),
            clips=SedDataset(folder / "clips", folder / "clips.tsv"),
            labels=list(content["labels"]),
            summary=content,
        )

    @property
    def split(self) -> str:
        """`test_real` (the test) or `val_real` (settings may be chosen on it)."""
        return str(self.summary["split"])

    @classmethod
    def read_for_choosing(cls, folder: Path | str) -> RealSet:
        """`read`, for choosing a setting on the set: the test set is refused (settings are
        chosen on validation sets only)."""
        real = cls.read(folder)
        if real.split == REAL_SPLIT:
            raise DataError(
                f"{real.folder} is the real-recording test set ({REAL_SPLIT}): settings are chosen "
                "on the validation set (test_real.val_out_dir) only"
            )
        return real


def _detect(system: FileScorer, path: Path, prompts: list[str], duration_s: float) -> tuple[np.ndarray, list]:
    """`[K, T]` scores and the segments of one file; digital silence scores 0 (nothing sounds)."""
    try:
        detection = system.detect(path, prompts)
    except SilentAudioError:
        n_frames = max(1, math.ceil(duration_s / system.frame_hop_s - 1e-9))
        return np.zeros((len(prompts), n_frames), dtype=np.float32), []
    return detection.probs, detection.segments


@dataclass(frozen=True)
class _Scored:
    """One system's scores on a set's recordings, in `dataset.audio_ids` order: `[K, T_i]`
    scores, truth and segments per recording, and the median-filtered scores (what the
    detector thresholds) zero-padded to `[M, K, T_max]`."""

    ids: list[str]
    probs: list[np.ndarray]
    truths: list[np.ndarray]
    segments: list[list]
    decided: np.ndarray


def _score_recordings(system: FileScorer, dataset: SedDataset, prompts: list[str]) -> _Scored:
    hop = system.frame_hop_s
    ids = list(dataset.audio_ids)
    probs, truths, segments, decided = [], [], [], []
    for i in ids:
        scores, found = _detect(system, dataset.files[i], prompts, dataset.durations[i])
        probs.append(scores)
        truths.append(frame_truth(dataset.ground_truth[i], prompts, scores.shape[1], hop))
        segments.append(found)
        decided.append(median_filter_frames(scores, getattr(system, "median_frames", 1)))
    padded = np.zeros((len(ids), len(prompts), max(d.shape[1] for d in decided)), dtype=np.float32)
    for m, d in enumerate(decided):
        padded[m, :, : d.shape[1]] = d
    return _Scored(ids, probs, truths, segments, padded)


def _occurring(dataset: SedDataset) -> list[str]:
    """The labels that sound in some recording: segment F1 is taken over them (recall is
    undefined for the rest; their false alarms are counted by the false-alarm rate)."""
    return sorted({e.label for i in dataset.audio_ids for e in dataset.ground_truth[i]})


def event_found(scores: np.ndarray, truth: np.ndarray) -> bool | None:
    """Whether a label sounding in a recording scores higher somewhere inside its spans than
    anywhere outside them: `[T]` scores of its prompt, `[T]` frame truth. None when the label
    sounds in every frame or in none (nothing to compare)."""
    inside, outside = scores[truth], scores[~truth]
    if not (inside.size and outside.size):
        return None
    return bool(inside.max() > outside.max())


def real_threshold(system: FileScorer, real_dir: Path | str) -> tuple[float, float]:
    """The single threshold, shared by every prompt, that maximises macro segment F1 of `system`
    over the recordings of the set in `real_dir` after its median filter: the rule of
    `flam_core.evaluation.splits.detector_threshold`, on real recordings. Returns (threshold, F1).
    The test set is refused (`RealSet.read_for_choosing`)."""
    real = RealSet.read_for_choosing(real_dir)
    dataset, prompts = real.recordings, real.labels
    scored = _score_recordings(system, dataset, prompts)
    occurring = _occurring(dataset)
    rows = [prompts.index(p) for p in occurring]
    return best_threshold(
        scored.decided[:, rows],
        system.frame_hop_s,
        occurring,
        scored.ids,
        dataset.ground_truth,
        criterion="segment",
    )


def _recording_metrics(system: FileScorer, dataset: SedDataset, prompts: list[str]) -> dict[str, Any]:
    scored = _score_recordings(system, dataset, prompts)
    index = {p: k for k, p in enumerate(prompts)}
    found: dict[str, list[bool]] = {p: [] for p in prompts}
    alarms = absent = 0
    for i, probs, truth, segments in zip(
        scored.ids, scored.probs, scored.truths, scored.segments, strict=True
    ):
        sounding = {e.label for e in dataset.ground_truth[i]}
        for p in sounding:
            hit = event_found(probs[index[p]], truth[index[p]])
            if hit is not None:
                found[p].append(hit)
        detected = {s["prompt"] for s in segments}
        absent += len(prompts) - len(sounding)
        alarms += len(detected - sounding)
    auroc = frame_auroc(
        np.concatenate(scored.truths, axis=1)[None], np.concatenate(scored.probs, axis=1)[None]
    )
    threshold_for = getattr(system, "threshold_for", None)
    thresholds = {p: float(threshold_for(p)) if threshold_for else 0.5 for p in prompts}
    occurring = _occurring(dataset)
    f1 = segment_f1(
        scored.decided[:, [index[p] for p in occurring]],
        system.frame_hop_s,
        occurring,
        scored.ids,
        dataset.ground_truth,
        threshold={p: thresholds[p] for p in occurring},
    )
    all_found = [f for fs in found.values() for f in fs]
    per_label = {
        p: {
            "frame_auroc": None if not math.isfinite(a) else round(float(a), 4),
            "event_found": round(float(np.mean(found[p])), 4) if found[p] else None,
        }
        for p, a in zip(prompts, auroc["per_label"], strict=True)
    }
    return {
        "frame_auroc_macro": round(auroc["macro"], 4),
        "frame_auroc_pooled": round(auroc["micro"], 4),
        "event_found": round(float(np.mean(all_found)), 4) if all_found else None,
        "segment_f1_macro": round(float(f1["f1_macro"]), 4),
        "false_alarm_rate": round(alarms / absent, 4) if absent else None,
        "threshold": getattr(system, "threshold", None),  # its shared one, for prompts without their own
        "n_recordings": len(scored.ids),
        "n_prompts": len(prompts),
        "n_events_found_checked": len(all_found),
        "per_label": per_label,
    }


def _zero_shot(system: FileScorer, dataset: SedDataset, classes: list[str]) -> dict[str, Any]:
    ids = list(dataset.audio_ids)
    targets = []
    best = np.zeros((len(ids), len(classes)), dtype=np.float64)
    index = {c: k for k, c in enumerate(classes)}
    for m, i in enumerate(ids):
        labels = {e.label for e in dataset.ground_truth[i]}
        if len(labels) != 1:
            raise DataError(f"isolated clip {i} must hold exactly one label, has {sorted(labels)}")
        targets.append(index[labels.pop()])
        probs, _ = _detect(system, dataset.files[i], classes, dataset.durations[i])
        best[m] = probs.max(axis=1)
    targets_arr = np.asarray(targets)
    # rank of the true class: how many classes score strictly higher (ties favour no one: the
    # earlier class index wins, as a stable sort would place it)
    true_score = best[np.arange(len(ids)), targets_arr]
    higher = (best > true_score[:, None]).sum(1)
    tied_before = ((best == true_score[:, None]) & (np.arange(len(classes)) < targets_arr[:, None])).sum(1)
    rank = higher + tied_before
    per_label = {
        c: round(float(np.mean(rank[targets_arr == k] < 1)), 4)
        for c, k in index.items()
        if (targets_arr == k).any()
    }
    out = {f"top{k}": round(float(np.mean(rank < k)), 4) for k in TOP_K}
    return {**out, "n_clips": len(ids), "n_classes": len(classes), "per_label_top1": per_label}


def evaluate_real_set(systems: Mapping[str, FileScorer], real_dir: Path | str) -> dict[str, Any]:
    """Every system on the set in `real_dir`: `{"set": {...}, "<system>": {"recordings": ...,
    "zero_shot": ...}}` (see the module docstring for the metrics)."""
    real = RealSet.read(real_dir)
    out: dict[str, Any] = {
        "set": {
            "recordings": len(real.recordings.audio_ids),
            "recording_s": round(sum(real.recordings.durations.values()), 1),
            "clips": len(real.clips.audio_ids),
            "prompts": len(real.labels),
            "ambiences": list(real.summary["background_labels"]),
            "sources": list(real.summary["sources"]),
            "encodings": list(real.summary["encodings"]),
        }
    }
    for name, system in systems.items():
        out[name] = {
            "recordings": _recording_metrics(system, real.recordings, real.labels),
            "zero_shot": _zero_shot(system, real.clips, real.labels),
        }
    return out
