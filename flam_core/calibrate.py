"""Calibration of the detector on the validation splits (stage `calibrate`).

What the logit adjustment promises, measured on validation mixtures: `val` (labels seen in
training, other recordings) and `val_unseen` (held-out labels, never trained on, disjoint
from the labels of `test_unseen`):

- **Reliability.** The model's posterior `p = sigmoid(alpha * cos + beta)` carries each
  label's learned frame prior (rain is long, a door slam is short); the unbiased score
  `s = p / (p + sigmoid(beta))` divides it out, so that `s` is the probability of the sound
  under an even prior. Its reliability is therefore measured with each label's positive and
  negative frames weighted equally ("balanced" ECE; 15 equal-width bins), for `p` (before
  the adjustment) and `s` (after). Plain, frequency-weighted ECE is reported too.
- **Prior tracking.** The learned `sigmoid(beta_k)` of each training label against its
  empirical frame prior (Spearman and Pearson correlation, scatter plot).
- **One scale for every prompt.** With `calibration.score_norm: cohort` (the default) the
  detector does not report `s`: each prompt's cosine becomes its z-score over a cohort of
  training frames, the head's bias (the prompt's learned prior logit) is added with weight
  `calibration.prior_weight`, and one logistic curve fitted on `val_unseen` maps the sum to a
  probability (`flam_core.model.score_norm`; `fit_score_map`). The per-prompt scale the head
  predicts from the text does not carry to prompts far from the training labels; the cohort
  measures every prompt on the same audio, and the bias, at its weight, says how common and
  how long the sound is. The cohort's moments are written either way
  (`cohort.npz`); `calibration.json`'s `score_norm` says whether the detector uses them.
- **Threshold.** The single threshold on the detector's score, after its 3-frame median
  filter, that maximises macro segment F1 (1 s segments, sed_scores_eval) over a vocabulary. Segment
  F1 asks whether the sound is reported where it sounds; collar-based event F1 also asks that
  each event come out as one segment with its onset within 200 ms, which the ~0.3 s frame
  grid rarely meets for never-trained prompts (its optimum on `val_unseen` sits near F1 0.02
  and moves with a handful of events). Event F1 at the chosen threshold is reported
  alongside. `threshold`, the one the detector applies to any prompt it has no own threshold
  for, is chosen on novel prompts: a user's prompt is in general not a training label, and
  scores of never-trained prompts run lower than those of training labels, so a threshold
  chosen on training labels alone misses novel sounds. With the real-recording validation set
  built (`calibration.threshold_from: val_real`, the default) it is chosen there, by the same
  rule over its recordings (`flam_core.evaluation.real.real_threshold`): real recordings over
  real ambiences, from sources training never saw, are what a user's recordings are like, and
  a threshold fitted to synthetic mixtures over procedural backgrounds raises false alarms on
  them. The optimum over `val_unseen` is kept either way as `threshold_unseen` (the synthetic
  test `test_unseen` reads it), the optimum over `val` as `threshold_seen`, and per-label
  optima of the training labels as `per_prompt` (closed-vocabulary use). Reliability is
  measured on both synthetic splits, on the frame scores.

- **Real recordings.** When the real-recording validation set (`val_real`, built by `flam synth
  real` from `sources.validation_sources`) exists, the calibrated detector is measured on it as
  the real-recording test measures it (`flam_core.evaluation.real`): macro and pooled frame
  AUROC, event-found rate, segment F1 and false alarms at the chosen threshold, zero-shot
  top-1/top-5; the AudioSet classifier beside it. The synthetic splits cannot show whether one
  threshold serves every prompt on real recordings (their pooled AUROC matches the macro one);
  this set can, without touching the test.

Output: `<model>/calibration.json` (read by the detector), `metrics.json` (with `val_real`) and
plots (`reliability.png`, `beta_prior.png`) in the report folder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from flam_core.config import Params
from flam_core.data.mixer import Mixer
from flam_core.errors import ConfigError, DataError
from flam_core.evaluation.frames import (
    learned_priors,
    rank_correlation,
    vocabulary_scores,
)
from flam_core.evaluation.splits import MixtureSplit, detector_threshold
from flam_core.features import FeatureCache
from flam_core.model.fusion import ClassifierFusion
from flam_core.model.score_norm import CohortNorm
from flam_core.utils import atomic_write_text

N_BINS = 15
KINDS = ("posterior", "unbiased")  # the model's posterior p, and s with the learned prior removed
NORMALISED = "normalised"  # the cohort-normalised score, when calibration normalises (the detector's)
# Calibration fields whose key in the JSON is no Python name
JSON_KEYS = {"segment_f1_macro_at_0_5": "segment_f1_macro_at_0.5"}


@dataclass(frozen=True)
class Calibration:
    """What `calibrate` measured and chose; `to_json()` is the model's `calibration.json`.

    The ECE maps are keyed by score kind (`KINDS`), `per_prompt` by training label.
    """

    split: str  # where `threshold` was chosen: val_real or val_unseen
    threshold: float  # for any prompt without its own threshold
    threshold_segment_f1_macro: float  # on `split`, at `threshold`
    threshold_unseen: float  # the optimum over the novel labels of val_unseen
    threshold_unseen_segment_f1_macro: float
    segment_f1_macro_at_0_5: float  # val_unseen; key "segment_f1_macro_at_0.5" in the JSON
    threshold_event_f1_macro: float  # val_unseen, at `threshold_unseen`
    threshold_seen: float  # the optimum over the training labels (val)
    threshold_seen_segment_f1_macro: float
    per_prompt: dict[str, float]  # each training label's own threshold
    ece_balanced: dict[str, float]
    ece_plain: dict[str, float]
    ece_balanced_unseen: dict[str, float]
    beta_prior_spearman: float | None  # None: one shared bias (no ranking to compare)
    beta_prior_pearson: float | None
    # the cohort normalisation the detector scores with (`CohortNorm.entry`); None: unbiased scores
    score_norm: dict[str, Any] | None
    n_labels: int  # of val_unseen
    n_mixtures: int
    n_labels_seen: int  # of val
    n_mixtures_seen: int
    # the detector (and the AudioSet classifier) on the real-recording validation set; None
    # without one. A report figure: not part of calibration.json
    val_real: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {JSON_KEYS.get(k, k): v for k, v in asdict(self).items() if k != "val_real"}

    def metrics(self) -> dict[str, Any]:
        """The report's `metrics.json`: everything but the per-prompt thresholds."""
        kept = {k: v for k, v in self.to_json().items() if k != "per_prompt"}
        return kept | {"val_real": self.val_real}


def balanced_weights(truth: np.ndarray) -> np.ndarray:
    """`[M, K, L]` frame weights under the even prior: each label's positive frames and its
    negative frames carry 0.5 in all; a label without both carries nothing."""
    positives = truth.sum(axis=(0, 2), keepdims=True)
    negatives = truth.size // truth.shape[1] - positives
    weights = np.where(truth, 0.5 / np.maximum(positives, 1), 0.5 / np.maximum(negatives, 1))
    return weights * ((positives > 0) & (negatives > 0))


def reliability(scores: np.ndarray, truth: np.ndarray, balanced: bool, bins: int = N_BINS) -> dict[str, Any]:
    """Reliability curve and expected calibration error of `[M, K, L]` scores against truth.

    `balanced`: each label's positive frames and negative frames carry equal total weight (the
    even prior the unbiased score assumes); otherwise every frame weighs the same.
    """
    if scores.shape != truth.shape:
        raise DataError(f"scores {scores.shape} and truth {truth.shape} differ in shape")
    if not np.isfinite(scores).all():
        raise DataError("scores hold NaN or infinite values")
    weights = balanced_weights(truth) if balanced else np.ones(scores.shape, dtype=np.float64)
    s, y, w = scores.ravel(), truth.ravel().astype(np.float64), weights.ravel()
    index = np.minimum((s * bins).astype(np.int64), bins - 1)
    total = np.bincount(index, weights=w, minlength=bins)
    confidence = np.bincount(index, weights=w * s, minlength=bins) / np.maximum(total, 1e-300)
    accuracy = np.bincount(index, weights=w * y, minlength=bins) / np.maximum(total, 1e-300)
    share = total / total.sum()
    ece = float(np.sum(share * np.abs(accuracy - confidence)))
    return {
        "ece": ece,
        "confidence": confidence.tolist(),
        "accuracy": accuracy.tolist(),
        "share": share.tolist(),
    }


def calibrate(
    params: Params,
    model_dir: Path | None = None,
    features_dir: Path | None = None,
    library_dir: Path | None = None,
    recipes_dir: Path | None = None,
    report_dir: Path = Path("reports/calibration"),
    real_dir: Path | None = None,
) -> Calibration:
    """Calibrate the model in `model_dir` on val and val_unseen; writes `calibration.json` there.
    Measures the calibrated detector on the real-recording validation set in `real_dir`, if given."""
    from scipy.stats import pearsonr

    from flam_core.evaluation.sed import event_f1, segment_f1
    from flam_core.model.folder import load_model
    from flam_core.postprocess import median_filter_frames

    model_dir = Path(model_dir or params.train.out_dir)
    features_dir = Path(features_dir or params.train.features_dir)
    library_dir = Path(library_dir or params.sources.out_dir)
    recipes_dir = Path(recipes_dir or params.synth.out_dir)
    model, model_params, _ = load_model(model_dir)
    model.score_norm = None  # a calibration of its own, never the previous one's
    model.fusion = classifier_fusion(model, params)
    mixer = Mixer.for_library(params, library_dir)
    hop = params.frame_hop_s
    seen, unseen = (MixtureSplit(params, s, features_dir, mixer, recipes_dir) for s in ("val", "val_unseen"))
    train = FeatureCache(features_dir, "train")
    kinds = KINDS
    cohort = cohort_moments(model, train, params)
    if model.fusion is not None:
        model.fusion = model.fusion.centred(cohort.class_center)
    if params.calibration.score_norm == "cohort":
        model.score_norm = cohort
        model.score_norm = fit_score_map(model, unseen)
        kinds = (*KINDS, NORMALISED)
    scores = {
        (split.name, kind): vocabulary_scores(
            model, split.cache, split.vocabulary, kind="detector" if kind == NORMALISED else kind
        )
        for split in (seen, unseen)
        for kind in kinds
    }
    detected = NORMALISED if model.score_norm is not None else "unbiased"  # what the detector reports
    seen_args = (hop, seen.vocabulary, seen.ids, seen.events)
    unseen_args = (hop, unseen.vocabulary, unseen.ids, unseen.events)
    # Thresholds act on the detector's output: its scores after its median filter.
    decided = {name: median_filter_frames(scores[name, detected]) for name in ("val", "val_unseen")}
    threshold_seen, f1_seen = detector_threshold(scores["val", detected], seen, hop)
    threshold, f1 = detector_threshold(scores["val_unseen", detected], unseen, hop)
    at_half = segment_f1(decided["val_unseen"], *unseen_args, threshold=0.5)
    event = event_f1(decided["val_unseen"], *unseen_args, threshold=threshold)
    per_label = _per_label_thresholds(decided["val"], *seen_args)
    curves = {kind: reliability(scores["val", kind], seen.truth, balanced=True) for kind in kinds}
    plain = {kind: reliability(scores["val", kind], seen.truth, balanced=False)["ece"] for kind in kinds}
    unseen_curves = {
        kind: reliability(scores["val_unseen", kind], unseen.truth, balanced=True) for kind in kinds
    }
    _, prior, learned = learned_priors(model, train)
    spearman = rank_correlation(learned, prior)
    pearson = None if spearman is None else round(float(pearsonr(learned, prior).statistic), 4)
    calibration = Calibration(
        split="val_unseen",
        threshold=float(threshold),  # already short: see best_threshold
        threshold_segment_f1_macro=round(float(f1), 4),
        threshold_unseen=float(threshold),
        threshold_unseen_segment_f1_macro=round(float(f1), 4),
        segment_f1_macro_at_0_5=round(float(at_half["f1_macro"]), 4),
        threshold_event_f1_macro=round(float(event["f1_macro"]), 4),
        threshold_seen=float(threshold_seen),
        threshold_seen_segment_f1_macro=round(float(f1_seen), 4),
        per_prompt=per_label,
        ece_balanced={k: round(v["ece"], 4) for k, v in curves.items()},
        ece_plain={k: round(v, 4) for k, v in plain.items()},
        ece_balanced_unseen={k: round(v["ece"], 4) for k, v in unseen_curves.items()},
        beta_prior_spearman=spearman,
        beta_prior_pearson=pearson,
        score_norm=None if model.score_norm is None else model.score_norm.entry(),
        n_labels=len(unseen.vocabulary),
        n_mixtures=len(unseen.ids),
        n_labels_seen=len(seen.vocabulary),
        n_mixtures_seen=len(seen.ids),
    )
    if real_dir is not None and params.calibration.threshold_from == "val_real":
        calibration = _real_threshold(model, model_params, calibration, model_dir, real_dir)
    # the cohort first, so a calibration.json that normalises is never left without it; written
    # either way (the model's frame moments over training mixtures), used only as score_norm says
    cohort.save(model_dir)
    atomic_write_text(model_dir / "calibration.json", json.dumps(calibration.to_json(), indent=2))
    real = _real_validation(params, model, model_params, calibration, model_dir, real_dir)
    calibration = replace(calibration, val_real=real)
    report_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(report_dir / "metrics.json", json.dumps(calibration.metrics(), indent=2))
    unseen_curve = {f"{detected}_unseen": unseen_curves[detected]}
    _plot_reliability(curves | unseen_curve, report_dir / "reliability.png")
    _plot_beta_prior(prior, learned, calibration.beta_prior_spearman, report_dir / "beta_prior.png")
    return calibration


def cohort_rows(train: FeatureCache, params: Params) -> np.ndarray:
    """The training mixtures whose frames form the cohort: `calibration.cohort_mixtures` of them
    (all, when there are fewer), drawn with a fixed seed, in order."""
    n = min(params.calibration.cohort_mixtures, len(train))
    return np.sort(np.random.default_rng(0).choice(len(train), size=n, replace=False))


def classifier_fusion(model: Any, params: Params) -> ClassifierFusion | None:
    """The backbone classifier the detector's scores are fused with (`flam_core.model.fusion`),
    when `calibration.classifier_weight` > 0 and the scores are normalised over the cohort
    (`score_norm: cohort`): YAMNet's classifier and the text encoder's features of its 521 class
    names. None otherwise."""
    import torch

    from flam_core.model.yamnet import load_class_names

    if not params.calibration.classifier_weight > 0 or params.calibration.score_norm != "cohort":
        return None
    yamnet = getattr(model.audio_encoder, "yamnet", None)
    if yamnet is None:
        raise ConfigError(
            "calibration.classifier_weight > 0 fuses the scores with YAMNet's classifier, which needs "
            "model.audio_encoder=yamnet; set calibration.classifier_weight=0"
        )
    with torch.no_grad():
        class_features = model.text_encoder(load_class_names())
    return ClassifierFusion.of(
        yamnet.classifier, class_features, floor=params.calibration.classifier_logit_floor
    )


def cohort_moments(model: Any, train: FeatureCache, params: Params) -> CohortNorm:
    """The moments of `model`'s frame vectors (`FlamModel.frame_vectors`: fused with the
    classifier when `model.fusion` is set) over the cohort's training mixtures (`cohort_rows`;
    `flam_core.model.score_norm`). Fused, the moments are those of the classifier's logits
    centred on their cohort mean (`class_center`): they describe
    `model.fusion.centred(norm.class_center)`, which the caller attaches; `model` is unchanged."""
    import torch

    rows = cohort_rows(train, params)
    frames = []
    with torch.no_grad():
        for start in range(0, len(rows), 64):
            batch = torch.from_numpy(np.asarray(train.features[rows[start : start + 64]], dtype=np.float32))
            vectors = model.frame_vectors(batch)
            frames.append(vectors.reshape(-1, vectors.shape[-1]).float())
    cohort = torch.cat(frames)
    fusion = model.fusion
    if fusion is None:
        return CohortNorm.from_frames(cohort, prior_weight=params.calibration.prior_weight)
    # the classifier's logits centred on their cohort mean (`ClassifierFusion.center`)
    d = model.head.config.embed_dim
    shift = cohort[:, d:].double().mean(0).float()
    cohort[:, d:] -= shift
    center = shift + (fusion.center if fusion.center is not None else 0.0)
    return CohortNorm.from_frames(
        cohort,
        split=d,
        weight=params.calibration.classifier_weight,
        class_features=fusion.class_features,
        class_center=center,
        logit_floor=fusion.floor,
        prior_weight=params.calibration.prior_weight,
    )


def fit_score_map(model: Any, unseen: MixtureSplit) -> CohortNorm:
    """The model's cohort normalisation (`model.score_norm`, its moments set) with the shared map
    `sigmoid(a * logit + b)` (the logit: the z-score plus the weighted prior, `CohortNorm.logits`)
    fitted to the novel labels of `val_unseen` by logistic regression, each label's positive and
    negative frames weighted equally (the even prior of the unbiased score)."""
    from sklearn.linear_model import LogisticRegression

    logits = vocabulary_scores(model, unseen.cache, unseen.vocabulary, kind="logit")
    truth = unseen.truth
    weights = balanced_weights(truth).ravel()
    if not weights.any():
        raise DataError("val_unseen has no label with both sounding and silent frames to calibrate on")
    keep = weights > 0
    fit = LogisticRegression(C=1e4).fit(
        logits.reshape(-1, 1)[keep], truth.ravel()[keep], sample_weight=weights[keep] / weights[keep].mean()
    )
    scale, shift = float(fit.coef_[0, 0]), float(fit.intercept_[0])
    if not scale > 0:
        raise DataError(
            f"on val_unseen the cohort logit does not rise with the truth (slope {scale:.3g}): "
            "the model does not detect novel labels; set calibration.score_norm=none"
        )
    return model.score_norm.with_map(scale, shift)


def _real_threshold(
    model: Any, model_params: Params, calibration: Calibration, model_dir: Path, real_dir: Path
) -> Calibration:
    """`calibration` with its shared threshold chosen on the real-recording validation set."""
    from flam_core.evaluation.real import real_threshold
    from flam_core.inference import FlamDetector

    detector = FlamDetector(model, model_params, calibration.to_json(), source=str(model_dir))
    threshold, f1 = real_threshold(detector, real_dir)
    return replace(
        calibration,
        split="val_real",
        threshold=float(threshold),
        threshold_segment_f1_macro=round(float(f1), 4),
    )


def _real_validation(
    params: Params,
    model: Any,
    model_params: Params,
    calibration: Calibration,
    model_dir: Path,
    real_dir: Path | None,
) -> dict[str, Any] | None:
    """The calibrated detector, and the AudioSet classifier when the evaluation reports it, on the
    real-recording validation set (`flam_core.evaluation.real`); None without one."""
    from flam_core.evaluation.real import evaluate_real_set
    from flam_core.inference import FlamDetector

    if real_dir is None:
        return None
    systems = {"flam": FlamDetector(model, model_params, calibration.to_json(), source=str(model_dir))}
    if params.evaluation.audioset_baseline and params.model.audio_encoder == "yamnet":
        from flam_core.evaluation.real import real_threshold
        from flam_core.model.audioset import audioset_model

        # the classifier at its own threshold, chosen on this set by the same rule (its scores
        # are on a scale of their own); a report figure, so the choice does not matter elsewhere
        classifier = FlamDetector(audioset_model(params), params, {}, source="AudioSet classifier")
        classifier.threshold = real_threshold(classifier, real_dir)[0]
        systems["audioset"] = classifier
    return evaluate_real_set(systems, real_dir)


def _per_label_thresholds(
    scores: np.ndarray, hop: float, vocabulary: list[str], ids: list[str], events: dict
) -> dict[str, float]:
    from flam_core.evaluation.sed import best_threshold

    out = {}
    for k, label in enumerate(vocabulary):
        mine = {i: [e for e in evs if e.label == label] for i, evs in events.items()}
        threshold, _ = best_threshold(scores[:, k : k + 1], hop, [label], ids, mine, criterion="segment")
        out[label] = float(threshold)
    return out


def _plot_reliability(curves: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect")
    names = {
        "posterior": "val, posterior p (prior kept)",
        "unbiased": "val, unbiased s (prior removed)",
        "unbiased_unseen": "val_unseen (never trained on), unbiased s",
        NORMALISED: "val, cohort-normalised (the detector's)",
        f"{NORMALISED}_unseen": "val_unseen (never trained on), cohort-normalised",
    }
    for name, curve in curves.items():
        share = np.asarray(curve["share"])
        used = share > 0
        ax.plot(
            np.asarray(curve["confidence"])[used],
            np.asarray(curve["accuracy"])[used],
            marker="o",
            label=f"{names[name]}: ECE {curve['ece']:.3f}",
        )
    ax.set_xlabel("score")
    ax.set_ylabel("share of active frames (balanced per label)")
    ax.set_title("Reliability on validation frames")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_beta_prior(prior: np.ndarray, learned: np.ndarray, spearman: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(prior, learned, s=10, alpha=0.7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("empirical frame prior of the label (train)")
    ax.set_ylabel("learned sigmoid(beta)")
    shown = "n/a, one shared bias" if spearman is None else f"{spearman:.2f}"
    ax.set_title(f"Per-text bias vs frame prior (Spearman {shown})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
