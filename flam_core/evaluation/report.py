"""Stage `evaluate`: FLAM against its baselines on the held-out test splits, as the paper's tables.

Every model of `evaluation.baselines` (FLAM, FLAM-Global, MGA-CLAP, the per-text scale/bias
ablations), trained on the same data with the same budget, is scored on

- open-vocabulary SED (`test_unseen`: labels never seen in training) and closed-set SED
  (`test_seen`): frame AUROC macro/micro, PSDS1/PSDS2 (sed_scores_eval, exact event times
  from the mixer; DCASE's alpha_st = 1 as `psds1`/`psds2` and alpha_st = 0, as
  open-vocabulary SED papers report it, as `psds1_alpha_st0`/`psds2_alpha_st0`), event F1
  (200 ms collars) and segment F1 (1 s segments) at each model's thresholds (chosen on
  val_unseen for test_unseen, on val for test_seen: by `flam calibrate` for FLAM, by the same
  rule here for a model without calibration) and segment F1 at one fixed threshold, 0.5, for
  every model;
- retrieval text<->audio on the test mixtures, each captioned by its first events' captions;
- zero-shot classification of the source library's single test clips, seen and unseen labels;
- for FLAM also with the approximate detector `sigmoid(alpha * cos)` and, when its calibration
  normalises scores over a cohort (`flam_core.model.score_norm`), with the head's unbiased
  score at its own validation thresholds (the inference ablations).

Outputs in `evaluation.out_dir`: `metrics.json` (nested by model and split, each prompt's
frame AUROC included; the flat gate metrics of FLAM; the claims: FLAM against FLAM-Global,
the unseen AUROC gain with its 95% interval from a bootstrap over the held-out prompts, and,
with MGA-CLAP among the baselines, the paper's ordering FLAM > MGA-CLAP > FLAM-Global),
`results.md` (the tables), `roc_test_unseen.png` and `heatmaps/*.png` (prompt x time scores
over the ground truth).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import torch

from flam_core.config import Params
from flam_core.data.mixer import Mixer
from flam_core.data.sources import load_manifest
from flam_core.errors import DataError, SilentAudioError
from flam_core.evaluation.frames import (
    ScoreKind,
    frame_auroc,
    frame_truth,
    macro_gain_interval,
    recognition_and_localisation,
    vocabulary_scores,
)
from flam_core.evaluation.splits import VALIDATION_OF, MixtureSplit, detector_threshold
from flam_core.model.audioset import NEAR_SIMILARITY, audioset_model, nearest_classes
from flam_core.model.flam import FlamModel
from flam_core.utils import atomic_dir, atomic_write_text, file_sha256

TEST_SPLITS = ("test_seen", "test_unseen")
# results.md column labels of the PSDS keys: DCASE's convention and the one of open-vocabulary
# SED papers, so that either can be set beside published tables.
PSDS_COLUMNS = {
    "psds1": "PSDS1 (DCASE, alpha_st=1)",
    "psds1_alpha_st0": "PSDS1 (alpha_st=0, as in open-vocabulary SED papers)",
    "psds2": "PSDS2 (DCASE, alpha_st=1)",
    "psds2_alpha_st0": "PSDS2 (alpha_st=0)",
}
AUDIOSET = "audioset"  # the frozen backbone's AudioSet classifier (`flam_core.model.audioset`)
MOMENT_SYSTEMS = ("flam", "global", "mga_clap", AUDIOSET)  # scored on moment retrieval
HEATMAP_SYSTEMS = ("flam", "global", "mga_clap")  # drawn side by side in the heatmaps
UNBIASED_LABEL = "unbiased p / (p + sigmoid(beta))"
DETECTOR_LABEL = "cohort-normalised sigmoid(a (z + lambda beta) + b) (the detector)"
NAMES = {
    AUDIOSET: "AudioSet classifier (frozen backbone, no training)",
    "flam": "FLAM",
    "global": "FLAM-Global",
    "mga_clap": "MGA-CLAP",
    "no_text_scale": "FLAM w/o per-text scale",
    "no_text_bias": "FLAM w/o per-text bias",
    "no_text_scale_bias": "FLAM w/o per-text scale and bias",
    "no_prior_loss": "FLAM w/o prior loss",
}


@dataclass(frozen=True)
class EvaluationResult:
    """What `evaluate` measured; `to_json()` is `metrics.json` (and what `results_markdown` reads)."""

    models: dict[str, Any]  # per mode: SED metrics per test split, retrieval, zero_shot, thresholds' source
    gate: dict[str, float]  # FLAM's flat metrics the registry's champion gate compares
    test_set_hash: str  # of the test splits' recipe files: results are comparable when equal
    claims: dict[str, float | int]  # FLAM against FLAM-Global ({} without the global baseline)
    frame_label_psds: dict[str, dict[str, float]]  # per test split: PSDS of the frame labels
    # the real-recording test (`flam_core.evaluation.real`): per mode, and the set; None when
    # no set was built
    test_real: dict[str, Any] | None = None
    # moment retrieval on long recordings (`flam_core.evaluation.moments`): per mode and split,
    # with the frame-grid ceiling; None when `evaluation.moments.recordings` is 0
    moment_retrieval: dict[str, Any] | None = None
    # held-out prompts near an AudioSet class name and far from all (`_near_far`)
    near_far: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _sed_metrics(split: MixtureSplit, scores: np.ndarray, hop: float, threshold: float) -> dict[str, float]:
    from flam_core.evaluation.sed import event_f1, psds, segment_f1
    from flam_core.postprocess import median_filter_frames

    args = (hop, split.vocabulary, split.ids, split.events)
    auroc = frame_auroc(split.truth, scores)
    parts = recognition_and_localisation(split.truth, scores)
    # F1 at a threshold scores the detector's output (median-filtered, as `flam detect`);
    # AUROC and PSDS sweep every threshold over the frame scores themselves.
    decided = median_filter_frames(scores)
    f1 = event_f1(decided, *args, threshold=threshold)
    segment = segment_f1(decided, *args, threshold=threshold)
    at_half = segment if threshold == 0.5 else segment_f1(decided, *args, threshold=0.5)
    out = {
        "frame_auroc_macro": round(auroc["macro"], 4),
        "frame_auroc_micro": round(auroc["micro"], 4),
        "frame_auroc_per_label": _per_label(auroc, split.vocabulary),
        "clip_auroc_macro": round(parts["clip"], 4),
        "within_clip_auroc_macro": round(parts["within_clip"], 4),
    }
    for scenario in (1, 2):
        result = psds(scores, *args, durations=split.durations, scenario=scenario)
        # PSDS subtracts the spread of the per-class TPR (alpha_st = 1): the single-class
        # PSDS values show whether a zero comes from no detection or from uneven classes.
        per_class = np.fromiter(result["per_label"].values(), dtype=np.float64)
        out[f"psds{scenario}"] = round(result["psds"], 4)
        out[f"psds{scenario}_alpha_st0"] = round(result["psds_alpha_st0"], 4)
        out[f"psds{scenario}_class_mean"] = round(float(per_class.mean()), 4)
        out[f"psds{scenario}_class_std"] = round(float(per_class.std()), 4)
    return out | {
        "event_f1_macro": round(f1["f1_macro"], 4),
        "segment_f1_macro": round(segment["f1_macro"], 4),
        "segment_f1_macro_at_0.5": round(at_half["f1_macro"], 4),
        "threshold": threshold,
        "n_labels": len(split.vocabulary),
        "n_mixtures": len(split.ids),
    }


def _per_label(auroc: dict[str, Any], vocabulary: list[str]) -> dict[str, float]:
    """`frame_auroc`'s per-label values by label name (labels without one left out)."""
    values = auroc["per_label"]
    return {label: round(float(v), 4) for label, v in zip(vocabulary, values, strict=True) if np.isfinite(v)}


@torch.no_grad()
def _global_embeddings(model: Any, features: np.ndarray, n_valid: list[int] | None = None) -> np.ndarray:
    """`[N, L, Da]` frame features -> `[N, D]` global embeddings (only the valid frames of each)."""
    head = model.head
    out = []
    for i in range(0, len(features), 64):
        frames = torch.from_numpy(np.asarray(features[i : i + 64], dtype=np.float32))
        context = head.contextualise(frames)
        if n_valid is None:
            out.append(head.global_embedding(context))
        else:
            out += [head.global_embedding(context[j : j + 1, : n_valid[i + j]]) for j in range(len(frames))]
    return torch.cat(out).numpy()


@torch.no_grad()
def _text_embeddings(model: Any, texts: list[str]) -> np.ndarray:
    model.text_encoder.precompute(texts)  # batched: hundreds of captions
    return model.head.text_embeddings(model.text_encoder(texts)).numpy()


def clip_retrieval(model: Any, splits: list[MixtureSplit], caption_events: int) -> dict[str, float]:
    from flam_core.evaluation.retrieval import retrieval_metrics

    features, captions = [], []
    for split in splits:
        for m, (_, labels) in enumerate(split.cache.labels):
            named = [labels.captions[k] for k in range(len(labels.labels)) if labels.is_event[k]]
            if named:
                features.append(split.cache.features[m])
                captions.append(", ".join(named[:caption_events]))
    audio = _global_embeddings(model, np.stack(features))
    text = _text_embeddings(model, captions)
    metrics = retrieval_metrics(audio, text, np.arange(len(captions)))
    return {k: round(float(v), 4) for k, v in metrics.items()} | {"n_pairs": len(captions)}


class _Clips:
    """The source library's single test clips, encoded once by the frozen audio encoder."""

    def __init__(self, params: Params, library_dir: Path) -> None:
        from flam_core.audio.io import read_audio
        from flam_core.model.audio_encoder import audio_encoder_from_params

        manifest = load_manifest(library_dir)
        clips = manifest[(manifest["split"] == "test") & (manifest["kind"] == "event")].reset_index(drop=True)
        encoder = audio_encoder_from_params(params, frozen=True).eval()
        sr, length = params.audio.sample_rate, int(round(params.synth.mixture_s * params.audio.sample_rate))
        hop = params.frame_hop_s
        features, n_valid = [], []
        with torch.no_grad():
            for start in range(0, len(clips), 32):
                rows = clips.iloc[start : start + 32]
                batch = np.zeros((len(rows), length), dtype=np.float32)
                for j, path in enumerate(rows["path"]):
                    audio, _ = read_audio(library_dir / path, sr)
                    batch[j, : min(len(audio), length)] = audio[:length]
                    n_valid.append(max(1, min(params.frames.n_frames, int(np.ceil(len(audio) / sr / hop)))))
                features.append(encoder(torch.from_numpy(batch)).numpy())
        self.features = np.concatenate(features) if features else np.zeros((0, params.frames.n_frames, 1))
        self.n_valid = n_valid
        self.labels = clips["label"].tolist()
        self.heldout = clips["heldout"].to_numpy(bool)


def _zero_shot(model: Any, clips: _Clips) -> dict[str, Any]:
    from flam_core.evaluation.retrieval import zero_shot_accuracy

    if not len(clips.labels):
        return {}
    audio = _global_embeddings(model, clips.features, clips.n_valid)
    out: dict[str, Any] = {}
    for name, mask in (("seen", ~clips.heldout), ("unseen", clips.heldout)):
        labels = sorted({lab for lab, m in zip(clips.labels, mask, strict=True) if m})
        if len(labels) < 2:
            continue
        text = _text_embeddings(model, labels)
        index = {lab: k for k, lab in enumerate(labels)}
        targets = np.array([index[lab] for lab, m in zip(clips.labels, mask, strict=True) if m])
        accuracy = zero_shot_accuracy(audio[mask] @ text.T, targets)
        out[name] = {
            "top1": round(float(accuracy["top1"]), 4),
            "n_clips": int(mask.sum()),
            "n_classes": len(labels),
        }
    return out


def calibrated_thresholds(model_dir: Path) -> dict[str, float] | None:
    """The thresholds of `flam calibrate` per test split: test_unseen gets the one chosen on the
    held-out labels of val_unseen (`threshold_unseen`; the detector's own `threshold` may come
    from real recordings), test_seen the one chosen on training labels (`threshold_seen`). None
    for a model without `calibration.json`."""
    path = model_dir / "calibration.json"
    if not path.is_file():
        return None
    calibration = json.loads(path.read_text())
    if "threshold" not in calibration:
        raise DataError(f"{path} has no 'threshold': rerun `flam calibrate --model {model_dir}`")
    unseen = float(calibration.get("threshold_unseen", calibration["threshold"]))
    return {"test_unseen": unseen, "test_seen": float(calibration.get("threshold_seen", unseen))}


def _validation_splits(
    params: Params, features_dir: Path, mixer: Any, recipes_dir: Path
) -> dict[str, MixtureSplit]:
    names = VALIDATION_OF.values()
    return {name: MixtureSplit(params, name, features_dir, mixer, recipes_dir) for name in names}


def validation_thresholds(
    model: Any, validation: dict[str, MixtureSplit], hop: float, kind: ScoreKind = "detector"
) -> dict[str, float]:
    """Thresholds for a model without calibration (or for scores of `kind` that it does not
    report), chosen as `flam calibrate` chooses FLAM's (`detector_threshold`) on the matching
    validation split (val_unseen for test_unseen, val for test_seen). Every model's F1 is then
    read at its own best validation threshold."""
    out = {}
    for test, name in VALIDATION_OF.items():
        split = validation[name]
        scores = vocabulary_scores(model, split.cache, split.vocabulary, kind=kind)
        out[test] = detector_threshold(scores, split, hop)[0]
    return out


def evaluate(
    params: Params,
    models_dir: Path | None = None,
    features_dir: Path | None = None,
    library_dir: Path | None = None,
    recipes_dir: Path | None = None,
    out_dir: Path | None = None,
    real_dir: Path | None = None,
    val_real_dir: Path | None = None,
) -> EvaluationResult:
    """Evaluate every baseline in `<models_dir>/<mode>/`; writes metrics.json, results.md, plots.

    The real-recording test runs on the set in `real_dir` (default `test_real.out_dir`, skipped
    when that default was never built; a `real_dir` given must hold a set). Models without a
    calibration take their threshold for novel prompts from the real-recording validation set in
    `val_real_dir` (default `test_real.val_out_dir`) when it is built and
    `calibration.threshold_from` says so, else from val_unseen."""
    from flam_core.model.folder import load_model

    cfg = params.evaluation
    models_dir = Path(models_dir or cfg.models_dir)
    features_dir = Path(features_dir or params.train.features_dir)
    library_dir = Path(library_dir or params.sources.out_dir)
    recipes_dir = Path(recipes_dir or params.synth.out_dir)
    out_dir = Path(out_dir or cfg.out_dir)
    missing = [m for m in cfg.baselines if not (models_dir / m / "model.pt").is_file()]
    if missing:
        raise DataError(f"no trained model for {missing} in {models_dir}: train them (`dvc repro train`)")
    mixer = Mixer.for_library(params, library_dir)
    splits = [MixtureSplit(params, name, features_dir, mixer, recipes_dir) for name in TEST_SPLITS]
    clips = _Clips(params, library_dir)
    hop = params.frame_hop_s
    results: dict[str, Any] = {}
    scores_of: dict[str, dict[str, np.ndarray]] = {}
    validation: dict[str, MixtureSplit] = {}
    unbiased_thresholds: dict[str, float] | None = None  # of FLAM's unbiased score, when it normalises
    unseen_thresholds: dict[str, float | None] = {}  # None: the model's own calibration
    # The backbone's classifier, built once: a row of every table (no training, no folder; it
    # scores the same cached features), a detector, and the class names of the near/far split.
    audioset = audioset_model(params)
    systems = list(cfg.baselines) + ([AUDIOSET] if cfg.audioset_baseline else [])
    for mode in systems:
        if mode == AUDIOSET:
            model, thresholds = audioset, None
        else:
            model, _, _ = load_model(models_dir / mode)
            thresholds = calibrated_thresholds(models_dir / mode)
        entry: dict[str, Any] = {"threshold_source": "calibration"}
        if thresholds is None:
            validation = validation or _validation_splits(params, features_dir, mixer, recipes_dir)
            thresholds = validation_thresholds(model, validation, hop)
            entry["threshold_source"] = "validation"
        unseen_thresholds[mode] = (
            None if entry["threshold_source"] == "calibration" else thresholds["test_unseen"]
        )
        if mode == "flam" and model.score_norm is not None:  # the head's own unbiased score too
            validation = validation or _validation_splits(params, features_dir, mixer, recipes_dir)
            unbiased_thresholds = validation_thresholds(model, validation, hop, kind="unbiased")
        scores_of[mode] = {}
        for split in splits:
            scores = vocabulary_scores(model, split.cache, split.vocabulary)
            scores_of[mode][split.name] = scores
            threshold = thresholds[split.name]
            entry[split.name] = _sed_metrics(split, scores, hop, threshold)
            if mode == "flam":
                approx = vocabulary_scores(model, split.cache, split.vocabulary, kind="approximate")
                entry[f"{split.name}_approximate"] = _sed_metrics(split, approx, hop, threshold)
                if unbiased_thresholds is not None:
                    unbiased = vocabulary_scores(model, split.cache, split.vocabulary, kind="unbiased")
                    entry[f"{split.name}_unbiased"] = _sed_metrics(
                        split, unbiased, hop, unbiased_thresholds[split.name]
                    )
        entry["retrieval"] = clip_retrieval(model, splits, cfg.caption_events)
        entry["zero_shot"] = _zero_shot(model, clips)
        results[mode] = entry
    detectors = _detectors(params, models_dir, unseen_thresholds, audioset)
    _thresholds_on_real(params, detectors, unseen_thresholds, val_real_dir)
    flam = results["flam"]
    gate = {f"{s}.{k}": v for s in TEST_SPLITS for k, v in flam[s].items() if isinstance(v, float)}
    gate |= {f"retrieval.{k}": v for k, v in flam["retrieval"].items() if isinstance(v, float)}
    result = EvaluationResult(
        models=results,
        gate=gate,
        test_set_hash=_test_set_hash(recipes_dir),
        claims=_claims(results),
        frame_label_psds={split.name: _frame_label_psds(split, hop) for split in splits},
        test_real=(real := _real_recordings(params, detectors, real_dir)),
        moment_retrieval=_moment_retrieval(params, detectors, library_dir, recipes_dir),
        near_far=_near_far(audioset, results, real),
    )
    metrics = result.to_json()
    with atomic_dir(out_dir) as staging:
        atomic_write_text(staging / "metrics.json", json.dumps(metrics, indent=2))
        atomic_write_text(staging / "results.md", results_markdown(metrics, params))
        _plot_roc(
            splits[1], {m: s["test_unseen"] for m, s in scores_of.items()}, staging / "roc_test_unseen.png"
        )
        _plot_heatmaps(splits[1], scores_of, cfg.heatmaps, hop, staging / "heatmaps")
    return result


def _detectors(
    params: Params, models_dir: Path, thresholds: dict[str, float | None], audioset: FlamModel
) -> dict[str, Any]:
    """Every model as a `FlamDetector` (what `flam detect` and `flam search` run), at the threshold
    it has for a novel prompt: FLAM's calibration, the others' choice on `val_unseen`; `audioset`
    is the AudioSet classifier's model."""
    from flam_core.inference import FlamDetector
    from flam_core.model.folder import load_model

    detectors = {}
    for mode, threshold in thresholds.items():
        if mode == AUDIOSET:
            model, model_params, calibration = audioset, params, {}
            source = "AudioSet classifier"
        else:
            model, model_params, calibration = load_model(models_dir / mode)
            source = str(models_dir / mode)
        if threshold is not None:
            calibration = {"threshold": threshold}
        detectors[mode] = FlamDetector(model, model_params, calibration, source=source)
    return detectors


def _thresholds_on_real(
    params: Params, detectors: dict[str, Any], chosen: dict[str, float | None], val_real: Path | None
) -> None:
    """With `calibration.threshold_from: val_real` and the real-recording validation set built
    (`val_real`, default `test_real.val_out_dir`), every detector without a calibration of its
    own takes its threshold for a novel prompt from that set (`real_threshold`), as FLAM's
    calibration does: each system on real recordings at a threshold chosen on real recordings."""
    from flam_core.evaluation.real import real_threshold

    val_real = Path(val_real or params.test_real.val_out_dir)
    if params.calibration.threshold_from != "val_real" or not (val_real / "summary.json").is_file():
        return
    for mode, detector in detectors.items():
        if chosen[mode] is not None:  # not calibrated: its threshold came from val_unseen
            detector.threshold = real_threshold(detector, val_real)[0]


def _real_recordings(
    params: Params, detectors: dict[str, Any], real_dir: Path | None
) -> dict[str, Any] | None:
    """Every model on the real-recording test through its detector. None when the default set
    folder was never built."""
    from flam_core.evaluation.real import evaluate_real_set

    if real_dir is None:
        real_dir = Path(params.test_real.out_dir)
        if not real_dir.exists():
            return None
    return evaluate_real_set(detectors, real_dir)


def _moment_retrieval(
    params: Params, detectors: dict[str, Any], library_dir: Path, recipes_dir: Path
) -> dict[str, Any] | None:
    """Moment retrieval (`flam_core.evaluation.moments`) of the `flam search` spans of FLAM,
    FLAM-Global, MGA-CLAP and the AudioSet classifier (`MOMENT_SYSTEMS`; the ablations add little
    here and cost a minute each) on the same long recordings of each test split, and the frame-grid
    ceiling (`grid_oracle`).
    None when `evaluation.moments.recordings` is 0."""
    from flam_core.evaluation.moments import grid_oracle, moment_retrieval

    cfg = params.evaluation.moments
    if cfg.recordings == 0:
        return None
    common = {
        "library_dir": library_dir,
        "recipes_dir": recipes_dir,
        "params": params,
        "n_recordings": cfg.recordings,
        "seed": cfg.seed,
        "min_s": cfg.min_s,
        "max_s": cfg.max_s,
    }
    systems = {
        mode: moment_retrieval(detector, **common)
        for mode, detector in detectors.items()
        if mode in MOMENT_SYSTEMS
    }
    ceiling = moment_retrieval(detectors["flam"], ranker=grid_oracle(params.frame_hop_s), **common)
    keep = ("r1@0.5", "r1@0.7", "map@0.5", "map", "n_recordings", "n_queries", "audio_s")
    return {
        "set": {
            "recordings_per_split": cfg.recordings,
            "recording_s": [cfg.min_s, cfg.max_s],
            "seed": cfg.seed,
            "queries": ceiling["queries"],
            "mixture_s": ceiling["mixture_s"],
        },
        "systems": {
            mode: {split: {k: r[k] for k in keep} for split, r in result["splits"].items()}
            for mode, result in [*systems.items(), ("ceiling", ceiling)]
        },
    }


def _near_far(audioset: FlamModel, results: dict[str, Any], real: dict[str, Any] | None) -> dict[str, Any]:
    """Macro frame AUROC of every model over the held-out prompts (`test_unseen`, and
    `test_real` when run) split by their MiniLM similarity to the nearest AudioSet class name:
    near (>= `NEAR_SIMILARITY`), where the backbone's knowledge can carry a prompt, and far,
    the truly novel ones."""
    per_label = {
        "test_unseen": {mode: r["test_unseen"]["frame_auroc_per_label"] for mode, r in results.items()},
    }
    if real:
        per_label["test_real"] = {
            mode: {k: v["frame_auroc"] for k, v in r["recordings"]["per_label"].items()}
            for mode, r in real.items()
            if mode != "set"
        }
    out: dict[str, Any] = {"threshold": NEAR_SIMILARITY, "splits": {}}
    for split, systems in per_label.items():
        labels = sorted(next(iter(systems.values())))
        nearest = nearest_classes(audioset, labels)
        near = [label for label in labels if nearest[label][0] >= NEAR_SIMILARITY]
        far = [label for label in labels if nearest[label][0] < NEAR_SIMILARITY]
        out["splits"][split] = {
            "near": near,
            "far": far,
            "nearest_class": {label: list(nearest[label]) for label in labels},
            "frame_auroc_macro": {
                mode: {part: _macro(scores, group) for part, group in (("near", near), ("far", far))}
                for mode, scores in systems.items()
            },
        }
    return out


def _macro(per_label: dict[str, float | None], labels: list[str]) -> float | None:
    values = [per_label[k] for k in labels if per_label.get(k) is not None and math.isfinite(per_label[k])]
    return round(float(np.mean(values)), 4) if values else None


def _frame_label_psds(split: MixtureSplit, hop: float) -> dict[str, float]:
    """PSDS of the ground-truth frame labels (the training targets) used as scores: what a model
    that reproduced its targets exactly would reach on this frame grid. An event shorter than
    about 1.5 frames never covers 70% of its run of positive frames, so PSDS1's tolerances
    (0.7) keep this well below 1. Keys `psds1`, `psds2` (alpha_st = 1) and `psds1_alpha_st0`,
    `psds2_alpha_st0`."""
    from flam_core.evaluation.sed import psds

    oracle = split.truth.astype(np.float32)
    args = (hop, split.vocabulary, split.ids, split.events)
    return _both_psds(lambda n: psds(oracle, *args, durations=split.durations, scenario=n))


def _both_psds(compute: Callable[[int], dict[str, Any]]) -> dict[str, float]:
    """`psds1`, `psds2` (DCASE, alpha_st = 1) and `psds1_alpha_st0`, `psds2_alpha_st0`, rounded,
    from `compute(scenario)` (a `flam_core.evaluation.sed.psds` result): one pass per scenario."""
    out = {}
    for n in (1, 2):
        result = compute(n)
        out[f"psds{n}"] = round(result["psds"], 4)
        out[f"psds{n}_alpha_st0"] = round(result["psds_alpha_st0"], 4)
    return out


def _test_set_hash(recipes_dir: Path) -> str:
    return "-".join(file_sha256(recipes_dir / f"{s}.parquet")[:12] for s in TEST_SPLITS)


def _claims(results: dict[str, Any]) -> dict[str, Any]:
    """The paper's claim on this data: FLAM vs FLAM-Global (and MGA-CLAP between them, when it
    was evaluated: `_mga_clap_claims`)."""
    if "global" not in results:
        return {}
    flam, glob = results["flam"], results["global"]

    def gain(split: str, key: str) -> float:
        return round(flam[split][key] - glob[split][key], 4)

    r5 = "t2a_R@5"
    per_label = "frame_auroc_per_label"
    interval = macro_gain_interval(flam["test_unseen"][per_label], glob["test_unseen"][per_label])
    return _mga_clap_claims(results) | {
        "unseen_auroc_gain": gain("test_unseen", "frame_auroc_macro"),
        "unseen_auroc_gain_target": 0.10,
        # the gain's 95% interval over the held-out prompts (a bootstrap over labels)
        "unseen_auroc_gain_ci95_low": round(interval["low"], 4),
        "unseen_auroc_gain_ci95_high": round(interval["high"], 4),
        "unseen_auroc_labels_better": interval["n_better"],
        "unseen_auroc_labels": interval["n_labels"],
        # the gain split into recognising the prompt's sound in a clip and placing it in time
        "unseen_clip_auroc_gain": gain("test_unseen", "clip_auroc_macro"),
        "unseen_within_clip_auroc_gain": gain("test_unseen", "within_clip_auroc_macro"),
        "unseen_psds1_gain": gain("test_unseen", "psds1"),
        # closed-set SED (training labels, new clips): where the paper reports PSDS
        "seen_psds1_gain": gain("test_seen", "psds1"),
        # the same with alpha_st = 0, the PSDS1 of open-vocabulary SED papers
        "unseen_psds1_alpha_st0_gain": gain("test_unseen", "psds1_alpha_st0"),
        "seen_psds1_alpha_st0_gain": gain("test_seen", "psds1_alpha_st0"),
        "retrieval_r5_relative": round(flam["retrieval"][r5] / max(glob["retrieval"][r5], 1e-9), 4),
        "retrieval_r5_relative_target": 0.8,
    }


def _mga_clap_claims(results: dict[str, Any]) -> dict[str, Any]:
    """The paper's ordering on held-out prompts, FLAM > MGA-CLAP > FLAM-Global in macro frame
    AUROC, and MGA-CLAP's retrieval against FLAM-Global's; {} without MGA-CLAP."""
    if "mga_clap" not in results:
        return {}
    auroc = {m: results[m]["test_unseen"]["frame_auroc_macro"] for m in ("flam", "mga_clap", "global")}
    r5 = "t2a_R@5"
    return {
        "mga_clap_unseen_auroc_macro": auroc["mga_clap"],
        "unseen_auroc_gain_over_mga_clap": round(auroc["flam"] - auroc["mga_clap"], 4),
        "mga_clap_unseen_auroc_gain": round(auroc["mga_clap"] - auroc["global"], 4),
        "mga_clap_retrieval_r5_relative": round(
            results["mga_clap"]["retrieval"][r5] / max(results["global"]["retrieval"][r5], 1e-9), 4
        ),
    }


def _psds_shortfall(metrics: dict[str, Any], claims: dict[str, Any]) -> dict[str, Any] | None:
    """The figures that explain why FLAM's unseen PSDS1 is zero: FLAM's and FLAM-Global's
    `test_unseen` results and the ground-truth frame labels' PSDS (`truth`, None without them).
    None when FLAM's unseen PSDS1 is above zero or above FLAM-Global's: nothing to explain."""
    flam, baseline = (metrics["models"][mode]["test_unseen"] for mode in ("flam", "global"))
    if claims["unseen_psds1_gain"] > 0 or flam["psds1"] > 0:
        return None
    truth = metrics.get("frame_label_psds", {}).get("test_unseen")
    return {"flam": flam, "baseline": baseline, "truth": truth or None}


def _model_rows(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """One table row per model, in the order evaluated: (its display name, its results)."""
    return [(NAMES.get(mode, mode), r) for mode, r in results.items()]


def _number(value: float, spec: str = ".3f") -> str:
    """The template's `num` filter: `format(value, spec)`, as an f-string formats it."""
    if isinstance(value, jinja2.Undefined):
        str(value)  # StrictUndefined raises UndefinedError naming the missing key, not a TypeError
    return format(value, spec)


@functools.cache
def _results_template() -> jinja2.Template:
    """`templates/results.md.j2`, loaded once. A key missing from the metrics fails the
    rendering (StrictUndefined) instead of leaving an empty cell; no HTML escaping: Markdown."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("flam_core.evaluation", "templates"),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["num"] = _number
    return env.get_template("results.md.j2")


def results_markdown(metrics: dict[str, Any], params: Params) -> str:
    """`results.md`: the tables of `metrics` (as `evaluate` builds it) rendered from
    `templates/results.md.j2`. Here the rows are chosen and ordered; the template lays them out."""
    from flam_core.evaluation.sed import PSDS_SCENARIOS

    results = metrics["models"]
    flam = results["flam"]
    claims = metrics.get("claims") or None
    prompts = []
    if claims:
        ours = flam["test_unseen"]["frame_auroc_per_label"]
        theirs = results["global"]["test_unseen"]["frame_auroc_per_label"]
        prompts = [
            (label, ours[label], theirs[label], ours[label] - theirs[label])
            for label in sorted(ours, key=lambda k: (theirs[k] - ours[k], k))
        ]
    return _results_template().render(
        train_steps=params.train.steps,
        profile=params.profile,
        frame_hop_s=params.frame_hop_s,
        test_set_hash=metrics["test_set_hash"],
        psds_columns=PSDS_COLUMNS,
        psds_scenarios=PSDS_SCENARIOS,
        models=_model_rows(results),
        targets=metrics.get("frame_label_psds") or None,
        detectors=[
            (label, (flam[f"test_unseen{suffix}"], flam[f"test_seen{suffix}"]))
            for label, suffix in (
                (DETECTOR_LABEL if "test_unseen_unbiased" in flam else UNBIASED_LABEL, ""),
                (UNBIASED_LABEL, "_unbiased"),
                ("approximate sigmoid(alpha cos)", "_approximate"),
            )
            if f"test_unseen{suffix}" in flam
        ],
        claims=claims,
        shortfall=_psds_shortfall(metrics, claims) if claims else None,
        prompts=prompts,
        real=_real_rows(metrics.get("test_real")),
        moments=_moment_rows(metrics.get("moment_retrieval")),
        near_far=_near_far_rows(metrics.get("near_far")),
    )


def _near_far_rows(near_far: dict[str, Any] | None) -> dict[str, Any] | None:
    """The near/far table: per split, the label counts and one row per model."""
    if not near_far:
        return None
    splits = near_far["splits"]
    modes = list(next(iter(splits.values()))["frame_auroc_macro"])
    empty = {"near": None, "far": None}  # a model not run on that split
    rows = [(NAMES.get(m, m), [splits[s]["frame_auroc_macro"].get(m, empty) for s in splits]) for m in modes]
    return {
        "threshold": near_far["threshold"],
        "splits": [(s, len(v["near"]), len(v["far"])) for s, v in splits.items()],
        "rows": rows,
    }


def _moment_rows(moments: dict[str, Any] | None) -> dict[str, Any] | None:
    """The moment-retrieval table: one row per system and split, the ceiling last."""
    if not moments:
        return None
    names = NAMES | {"ceiling": "ground truth on the frame grid (ceiling)"}
    rows = [
        (names.get(mode, mode), split, r)
        for mode, splits in moments["systems"].items()
        for split, r in splits.items()
    ]
    return {"set": moments["set"], "rows": rows}


def _real_rows(real: dict[str, Any] | None) -> dict[str, Any] | None:
    """The real-recording test's tables: the set, one row per system, and per-label AUROC."""
    if not real:
        return None
    systems = [(NAMES.get(name, name), real[name]) for name in real if name != "set"]
    labels = sorted(systems[0][1]["recordings"]["per_label"])
    per_label = [
        (label, [r["recordings"]["per_label"][label]["frame_auroc"] for _, r in systems]) for label in labels
    ]
    return {"set": real["set"], "systems": systems, "per_label": per_label}


def _plot_roc(split: MixtureSplit, scores: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    truth = split.truth.ravel()
    for mode, s in scores.items():
        fpr, tpr, _ = roc_curve(truth, s.ravel())
        ax.plot(
            fpr, tpr, label=f"{NAMES.get(mode, mode)} ({roc_auc_score(truth, s.ravel()):.3f})", linewidth=1.2
        )
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1)
    ax.set_xlabel("false positive rate (frames)")
    ax.set_ylabel("true positive rate (frames)")
    ax.set_title("Frame ROC, unseen labels (micro)")
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_heatmaps(
    split: MixtureSplit, scores_of: dict[str, dict[str, np.ndarray]], count: int, hop: float, folder: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    shown = [m for m in HEATMAP_SYSTEMS if m in scores_of]
    for m in range(min(count, len(split.ids))):
        present = np.flatnonzero(split.truth[m].any(axis=1))
        absent = np.flatnonzero(~split.truth[m].any(axis=1))[:2]
        rows = np.concatenate([present, absent])
        if len(rows) == 0:
            continue
        fig, axes = plt.subplots(
            1, len(shown), figsize=(5 * len(shown), 0.45 * len(rows) + 1.5), squeeze=False
        )
        for ax, mode in zip(axes[0], shown, strict=True):
            data = scores_of[mode][split.name][m][rows]
            ax.imshow(
                data,
                aspect="auto",
                vmin=0,
                vmax=1,
                cmap="magma",
                extent=(0, data.shape[1] * hop, len(rows), 0),
            )
            truth = split.truth[m][rows]
            for r in range(len(rows)):
                on = np.flatnonzero(truth[r])
                for f in on:
                    ax.add_patch(plt.Rectangle((f * hop, r + 0.8), hop, 0.15, color="cyan", linewidth=0))
            ax.set_yticks(np.arange(len(rows)) + 0.5, [split.vocabulary[k] for k in rows], fontsize=7)
            ax.set_xlabel("time (s); cyan: ground truth")
            ax.set_title(f"{NAMES[mode]}, mixture {split.ids[m]}", fontsize=9)
        fig.tight_layout()
        fig.savefig(folder / f"{split.name}-{split.ids[m]}.png", dpi=100)
        plt.close(fig)


def _file_scores(detector: Any, path: Path, vocabulary: list[str], duration_s: float) -> np.ndarray:
    """`[K, frames]` detector scores of one file; a file of digital silence, which the detector
    refuses, scores 0 everywhere (nothing sounds in it)."""
    try:
        return detector.detect(path, vocabulary).probs
    except SilentAudioError:
        n_frames = max(1, math.ceil(duration_s / detector.frame_hop_s - 1e-9))
        return np.zeros((len(vocabulary), n_frames), dtype=np.float32)


def evaluate_sed_dataset(detector: Any, dataset: Any) -> dict[str, Any]:
    """One model on a real SED dataset (`flam_core.data.tsv.SedDataset`): every label of
    the dataset is a prompt for every file. Frame AUROC, PSDS1/2 (`psds1`, `psds2`: DCASE,
    alpha_st = 1; `psds1_alpha_st0`, `psds2_alpha_st0`: alpha_st = 0, as open-vocabulary SED
    papers report PSDS on AudioSet-Strong), event and segment F1 at the detector's threshold."""
    from flam_core.evaluation.sed import event_f1, psds, segment_f1
    from flam_core.postprocess import median_filter_frames

    vocabulary = [
        v
        for v in dataset.vocabulary
        if any(e.label == v for evs in dataset.ground_truth.values() for e in evs)
    ]
    if not vocabulary:
        raise DataError("the dataset names no event")
    ids = list(dataset.audio_ids)
    hop = detector.frame_hop_s
    probs = [_file_scores(detector, dataset.files[i], vocabulary, dataset.durations[i]) for i in ids]
    width = max(p.shape[1] for p in probs)
    scores = np.zeros((len(ids), len(vocabulary), width), dtype=np.float32)
    decided = np.zeros_like(scores)  # what the detector thresholds: each file median-filtered
    truth = np.zeros(scores.shape, dtype=bool)
    durations = {}
    for m, (i, p) in enumerate(zip(ids, probs, strict=True)):
        scores[m, :, : p.shape[1]] = p
        decided[m, :, : p.shape[1]] = median_filter_frames(p, detector.median_frames)
        truth[m, :, : p.shape[1]] = frame_truth(dataset.ground_truth[i], vocabulary, p.shape[1], hop)
        durations[i] = width * hop
    args = (hop, vocabulary, ids, dataset.ground_truth)
    auroc = frame_auroc(truth, scores)
    return {
        "frame_auroc_macro": round(auroc["macro"], 4),
        "frame_auroc_micro": round(auroc["micro"], 4),
        "frame_auroc_per_label": _per_label(auroc, vocabulary),
        **_both_psds(lambda n: psds(scores, *args, durations=durations, scenario=n)),
        "event_f1_macro": round(event_f1(decided, *args, threshold=detector.threshold)["f1_macro"], 4),
        "segment_f1_macro": round(segment_f1(decided, *args, threshold=detector.threshold)["f1_macro"], 4),
        "threshold": detector.threshold,
        "n_files": len(ids),
        "n_labels": len(vocabulary),
    }
