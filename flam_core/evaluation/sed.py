"""SED metrics of frame scores: PSDS (DCASE scenarios 1 and 2, with DCASE's alpha_st = 1 and
with alpha_st = 0 as open-vocabulary SED papers report it), collar-based event F1 and
segment-based F1.

Frame scores `[M, K, L]` (mixture, vocabulary label, frame) become sed_scores_eval score
DataFrames (frame l spans `[l * hop, (l + 1) * hop)`), and the metrics are sed_scores_eval's:
PSDS is computed exactly over all thresholds, F1 at a decision threshold. Event F1 matches
detected and reference events with collars (200 ms, DCASE); segment F1 compares activity in
1 s segments, which does not punish a detection for the frame grid's coarse onsets. As in
sed_scores_eval, a frame is detected when its score is strictly above the threshold.
`segments_from_frames` (from `flam_core.postprocess`, re-exported here) turns one score track
into (onset, offset, score) segments with the reference post-processing (3-frame median filter,
then thresholding).

Every function checks its inputs and raises `DataError` naming the problem; sed_scores_eval's
own checks are assertions or bare `ValueError`s that would surface far from the cause.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from itertools import pairwise
from typing import Literal

import numpy as np
import pandas as pd
from sed_scores_eval import collar_based, intersection_based, segment_based
from sed_scores_eval.base_modules.scores import create_score_dataframe

from flam_core.data.events import Event
from flam_core.errors import DataError
from flam_core.postprocess import check_hop, is_number

GroundTruth = Mapping[str, Sequence[Event]]

PSDS_SCENARIOS: dict[int, dict[str, float | None]] = {
    1: {
        "dtc_threshold": 0.7,
        "gtc_threshold": 0.7,
        "cttc_threshold": None,
        "alpha_ct": 0.0,
        "alpha_st": 1.0,
        "max_efpr": 100.0,
    },
    2: {
        "dtc_threshold": 0.1,
        "gtc_threshold": 0.1,
        "cttc_threshold": 0.3,
        "alpha_ct": 0.5,
        "alpha_st": 1.0,
        "max_efpr": 100.0,
    },
}

_RESERVED_COLUMNS = {"onset", "offset"}
_SHOWN = 5


def _show(items: Sequence) -> str:
    items = list(items)
    more = f" (+{len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return f"{items[:_SHOWN]}{more}"


def _check_scores(
    probs: np.ndarray, hop_s: float, vocabulary: Sequence[str], audio_ids: Sequence[str]
) -> tuple[np.ndarray, list[str], list[str]]:
    probs = np.asarray(probs)
    if probs.dtype == np.bool_:
        probs = probs.astype(np.float64)
    if probs.ndim != 3:
        raise DataError(f"frame scores must be [M, K, L] (mixture, label, frame), got shape {probs.shape}")
    if probs.size == 0:
        raise DataError(f"frame scores are empty (shape {probs.shape})")
    if not np.issubdtype(probs.dtype, np.number) or np.issubdtype(probs.dtype, np.complexfloating):
        raise DataError(f"frame scores must be real numbers, got dtype {probs.dtype}")
    if isinstance(vocabulary, str) or isinstance(audio_ids, str):
        raise DataError("vocabulary and audio_ids must be sequences of strings, not a single string")
    vocabulary = list(vocabulary)
    audio_ids = list(audio_ids)
    if probs.shape[0] != len(audio_ids):
        raise DataError(
            f"frame scores hold {probs.shape[0]} mixtures but {len(audio_ids)} audio ids were given"
        )
    if probs.shape[1] != len(vocabulary):
        raise DataError(f"frame scores hold {probs.shape[1]} labels but the vocabulary has {len(vocabulary)}")
    bad = ~np.isfinite(probs)
    if bad.any():
        m, k, frame = np.argwhere(bad)[0]
        raise DataError(
            f"frame scores hold {int(bad.sum())} NaN/inf value(s), first at audio {audio_ids[m]!r}, "
            f"label {vocabulary[k]!r}, frame {frame}"
        )
    check_hop(hop_s)
    for name, values in (("vocabulary", vocabulary), ("audio ids", audio_ids)):
        if not all(isinstance(v, str) and v for v in values):
            raise DataError(f"{name} must be non-empty strings, got {_show(values)}")
        duplicates = sorted(v for v, n in Counter(values).items() if n > 1)
        if duplicates:
            raise DataError(f"{name} must be unique; repeated: {_show(duplicates)}")
    reserved = sorted(_RESERVED_COLUMNS.intersection(vocabulary))
    if reserved:
        raise DataError(f"vocabulary labels {reserved} clash with the score table's onset/offset columns")
    backslash = [v for v in vocabulary if "\\" in v]
    if backslash:
        raise DataError(f"vocabulary labels must not contain a backslash: {_show(backslash)}")
    return probs.astype(np.float64, copy=False), vocabulary, audio_ids


def _check_ground_truth(
    ground_truth: GroundTruth,
    vocabulary: Sequence[str],
    audio_ids: Sequence[str],
    durations: Mapping[str, float] | None = None,
    tolerance_s: float = 0.0,
) -> dict[str, list[Event]]:
    """Validated copy of the ground truth: every audio id present, events well formed."""
    if not isinstance(ground_truth, Mapping):
        raise DataError(
            f"ground truth must be a mapping audio id -> events, got {type(ground_truth).__name__}"
        )
    missing = [a for a in audio_ids if a not in ground_truth]
    extra = sorted(set(ground_truth) - set(audio_ids))
    if missing:
        raise DataError(
            f"ground truth lacks {len(missing)} scored audio id(s): {_show(missing)}; "
            "list files without events with an empty event list"
        )
    if extra:
        raise DataError(f"ground truth holds {len(extra)} audio id(s) without frame scores: {_show(extra)}")
    known = set(vocabulary)
    checked: dict[str, list[Event]] = {}
    for audio_id in audio_ids:
        events = []
        for event in ground_truth[audio_id]:
            if len(event) != 3:
                raise DataError(f"{audio_id}: event {event!r} is not (onset, offset, label)")
            onset, offset, label = event
            try:
                onset, offset = float(onset), float(offset)
            except (TypeError, ValueError):
                raise DataError(f"{audio_id}: event {event!r} has a non-numeric onset/offset") from None
            if not (math.isfinite(onset) and math.isfinite(offset)):
                raise DataError(f"{audio_id}: event {event!r} has a NaN/inf onset/offset")
            if onset < 0:
                raise DataError(f"{audio_id}: event {event!r} starts before 0 s")
            if onset >= offset:
                raise DataError(f"{audio_id}: event {event!r} has onset >= offset")
            if label not in known:
                raise DataError(f"{audio_id}: event label {label!r} is not in the vocabulary")
            if durations is not None and offset > durations[audio_id] + tolerance_s:
                raise DataError(
                    f"{audio_id}: event {event!r} ends after the audio ({durations[audio_id]:.3f} s)"
                )
            events.append(Event(onset, offset, label))
        by_label: dict[str, list[tuple[float, float]]] = {}
        for onset, offset, label in events:
            by_label.setdefault(label, []).append((onset, offset))
        for label, spans in by_label.items():
            spans.sort()
            for (_, prev_off), (on, off) in pairwise(spans):
                if on <= prev_off:
                    raise DataError(
                        f"{audio_id}: {label!r} events overlap or touch (one ends at {prev_off:g} s, the "
                        f"next spans {on:g}-{off:g} s); merge them into one event"
                    )
        checked[audio_id] = events
    present = {label for events in checked.values() for _, _, label in events}
    absent = [label for label in vocabulary if label not in present]
    if absent:
        raise DataError(
            f"vocabulary label(s) {_show(absent)} have no ground-truth event, so their recall is undefined; "
            "evaluate with a vocabulary restricted to labels that occur"
        )
    return checked


def _check_durations(
    durations: Mapping[str, float], audio_ids: Sequence[str], span_s: float, hop_s: float
) -> dict[str, float]:
    if not isinstance(durations, Mapping):
        raise DataError(f"durations must be a mapping audio id -> seconds, got {type(durations).__name__}")
    missing = [a for a in audio_ids if a not in durations]
    if missing:
        raise DataError(f"durations lack {len(missing)} audio id(s): {_show(missing)}")
    out = {}
    for audio_id in audio_ids:
        value = durations[audio_id]
        if not is_number(value) or not math.isfinite(value) or value <= 0:
            raise DataError(f"{audio_id}: duration must be a positive number of seconds, got {value!r}")
        if value > span_s + hop_s:
            raise DataError(
                f"{audio_id}: audio lasts {value:.3f} s but the frame scores cover only {span_s:.3f} s"
            )
        out[audio_id] = float(value)
    return out


def frame_scores_to_sed_scores(
    probs: np.ndarray, hop_s: float, vocabulary: Sequence[str], audio_ids: Sequence[str]
) -> dict[str, pd.DataFrame]:
    """sed_scores_eval score tables: per audio id, columns onset, offset and one per label."""
    probs, vocabulary, audio_ids = _check_scores(probs, hop_s, vocabulary, audio_ids)
    timestamps = np.arange(probs.shape[2] + 1) * float(hop_s)
    return {
        audio_id: create_score_dataframe(probs[m].T, timestamps, vocabulary)
        for m, audio_id in enumerate(audio_ids)
    }


def psds(
    probs: np.ndarray,
    hop_s: float,
    vocabulary: Sequence[str],
    audio_ids: Sequence[str],
    ground_truth: GroundTruth,
    durations: Mapping[str, float],
    scenario: int = 1,
    alpha_st: float | None = None,
) -> dict:
    """PSDS of DCASE scenario 1 or 2 (`PSDS_SCENARIOS`), exact over all thresholds.

    `alpha_st` weighs the spread of the per-class true-positive rates subtracted from their
    mean (None: the scenario's DCASE value, 1). The same scenario with alpha_st = 0, the
    setting of open-vocabulary SED papers, comes with every result: it is the area under the
    mean per-class TPR vs eFPR curve, read from the same per-class PSD-ROCs, so it costs no
    second pass over the scores.

    Returns {"psds", "psds_alpha_st0", "per_label" (single-class PSDS), "scenario", "params"
    (the settings used, alpha_st included), "etpr", "efpr"} where etpr/efpr are the PSD-ROC at
    the chosen alpha_st (effective TP ratio vs effective FP per hour).
    """
    if scenario not in PSDS_SCENARIOS:
        raise DataError(f"PSDS scenario must be one of {sorted(PSDS_SCENARIOS)}, got {scenario!r}")
    params = dict(PSDS_SCENARIOS[scenario])
    if alpha_st is not None:
        if not is_number(alpha_st) or not math.isfinite(alpha_st) or alpha_st < 0:
            raise DataError(f"alpha_st must be a non-negative number (DCASE: 1), got {alpha_st!r}")
        params["alpha_st"] = float(alpha_st)
    scores = frame_scores_to_sed_scores(probs, hop_s, vocabulary, audio_ids)
    if params["alpha_ct"] and len(vocabulary) < 2:
        raise DataError(
            f"PSDS scenario {scenario} weighs cross-triggers between labels and needs at least 2 labels, "
            f"got {list(vocabulary)}"
        )
    span_s = np.shape(probs)[2] * float(hop_s)
    checked_durations = _check_durations(durations, list(audio_ids), span_s, float(hop_s))
    truth = _check_ground_truth(
        ground_truth, list(vocabulary), list(audio_ids), checked_durations, float(hop_s)
    )
    value, per_label, (etpr, efpr), class_rocs = intersection_based.psds(
        scores=scores,
        ground_truth=truth,
        audio_durations=checked_durations,
        unit_of_time="hour",
        **params,
    )
    # The per-class PSD-ROCs do not depend on alpha_st: only their combination does.
    mean_tpr, mean_efpr = intersection_based.multi_class_psd_roc_from_single_class_psd_rocs(
        class_rocs, alpha_st=0.0, max_efpr=params["max_efpr"]
    )
    value_st0 = intersection_based.psds_from_psd_roc(mean_tpr, mean_efpr, params["max_efpr"])
    return {
        "psds": float(value),
        "psds_alpha_st0": float(value_st0),
        "per_label": {label: float(v) for label, v in per_label.items()},
        "scenario": scenario,
        "params": params,
        "etpr": np.asarray(etpr),
        "efpr": np.asarray(efpr),
    }


def _check_threshold(threshold: float | Mapping[str, float], vocabulary: Sequence[str]) -> float | dict:
    if isinstance(threshold, Mapping):
        missing = [label for label in vocabulary if label not in threshold]
        extra = sorted(set(threshold) - set(vocabulary))
        if missing or extra:
            raise DataError(
                f"per-label thresholds must cover the vocabulary exactly; missing {_show(missing)}, "
                f"unknown {_show(extra)}"
            )
        values = {label: threshold[label] for label in vocabulary}
    else:
        values = {"threshold": threshold}
    for name, value in values.items():
        if not is_number(value) or not math.isfinite(value):
            raise DataError(f"threshold for {name!r} must be a finite number, got {value!r}")
    if isinstance(threshold, Mapping):
        return {label: float(v) for label, v in values.items()}
    return float(threshold)


def _collar_args(onset_collar: float, offset_collar: float, offset_collar_rate: float) -> dict[str, float]:
    args = {
        "onset_collar": onset_collar,
        "offset_collar": offset_collar,
        "offset_collar_rate": offset_collar_rate,
    }
    for name, value in args.items():
        if not is_number(value) or not math.isfinite(value) or value < 0:
            raise DataError(f"{name} must be a non-negative number, got {value!r}")
    return {name: float(value) for name, value in args.items()}


def _scores_and_truth(
    probs: np.ndarray,
    hop_s: float,
    vocabulary: Sequence[str],
    audio_ids: Sequence[str],
    ground_truth: GroundTruth,
) -> tuple[dict[str, pd.DataFrame], dict]:
    """Checked score tables and ground truth for the threshold metrics (F1, best threshold)."""
    scores = frame_scores_to_sed_scores(probs, hop_s, vocabulary, audio_ids)
    return scores, _check_ground_truth(ground_truth, list(vocabulary), list(audio_ids))


def _f1_result(f: Mapping, p: Mapping, r: Mapping, stats: Mapping, vocabulary: Sequence[str]) -> dict:
    per_label = {
        label: {
            "f1": float(f[label]),
            "precision": float(p[label]),
            "recall": float(r[label]),
            "tp": int(stats[label]["tps"]),
            "fp": int(stats[label]["fps"]),
            "n_ref": int(stats[label]["n_ref"]),
        }
        for label in vocabulary
    }
    return {
        "f1_macro": float(f["macro_average"]),
        "precision_macro": float(p["macro_average"]),
        "recall_macro": float(r["macro_average"]),
        "f1_micro": float(f["micro_average"]),
        "precision_micro": float(p["micro_average"]),
        "recall_micro": float(r["micro_average"]),
        "per_label": per_label,
    }


def event_f1(
    probs: np.ndarray,
    hop_s: float,
    vocabulary: Sequence[str],
    audio_ids: Sequence[str],
    ground_truth: GroundTruth,
    threshold: float | Mapping[str, float],
    onset_collar: float = 0.2,
    offset_collar: float = 0.2,
    offset_collar_rate: float = 0.2,
) -> dict:
    """Collar-based event F1 at a threshold (one for all labels, or a dict per label).

    Returns macro (mean over labels) and micro (pooled counts) F1/precision/recall and, per
    label, {"f1", "precision", "recall", "tp", "fp", "n_ref"}. sed_scores_eval's convention:
    a label with no detection has precision 1 in the per-label and macro figures, while the
    micro precision of a system with no detection at all is 0.
    """
    scores, truth = _scores_and_truth(probs, hop_s, vocabulary, audio_ids, ground_truth)
    thr = _check_threshold(threshold, list(vocabulary))
    f, p, r, stats = collar_based.fscore(
        scores, truth, thr, **_collar_args(onset_collar, offset_collar, offset_collar_rate)
    )
    return _f1_result(f, p, r, stats, vocabulary)


def _segment_args(probs: np.ndarray, hop_s: float, audio_ids: Sequence[str], segment_length: float) -> dict:
    """Every clip lasts the frames' span (mixtures, or clips padded to one width)."""
    if not is_number(segment_length) or not math.isfinite(segment_length) or segment_length <= 0:
        raise DataError(f"segment_length must be a positive number of seconds, got {segment_length!r}")
    span_s = float(np.shape(probs)[2] * hop_s)
    return {
        "audio_durations": dict.fromkeys(audio_ids, span_s),
        "segment_length": float(segment_length),
    }


def segment_f1(
    probs: np.ndarray,
    hop_s: float,
    vocabulary: Sequence[str],
    audio_ids: Sequence[str],
    ground_truth: GroundTruth,
    threshold: float | Mapping[str, float],
    segment_length: float = 1.0,
) -> dict:
    """Segment-based F1 at a threshold: a label counts as active in a `segment_length` segment
    when any of its frames there scores above the threshold (detection) or any reference event
    overlaps it (reference). Same return shape as `event_f1`, with segments as the counts."""
    scores, truth = _scores_and_truth(probs, hop_s, vocabulary, audio_ids, ground_truth)
    thr = _check_threshold(threshold, list(vocabulary))
    f, p, r, stats = segment_based.fscore(
        scores, truth, threshold=thr, **_segment_args(probs, hop_s, audio_ids, segment_length)
    )
    return _f1_result(f, p, r, stats, vocabulary)


def best_threshold(
    probs: np.ndarray,
    hop_s: float,
    vocabulary: Sequence[str],
    audio_ids: Sequence[str],
    ground_truth: GroundTruth,
    average: Literal["macro", "micro"] = "macro",
    criterion: Literal["event", "segment"] = "event",
    onset_collar: float = 0.2,
    offset_collar: float = 0.2,
    offset_collar_rate: float = 0.2,
    segment_length: float = 1.0,
) -> tuple[float, float]:
    """The single threshold (shared by all labels) that maximises macro or micro F1, collar-based
    event F1 (`criterion="event"`) or segment-based F1 (`"segment"`).

    sed_scores_eval's `best_fscore` optimises each label's threshold separately, so the shared
    one is found here from its per-label operating-point curves: F1 only changes where some
    label's curve changes, so every open interval between consecutive change points is tried,
    which is exact. Ties go to the highest threshold. The threshold returned is the number with
    the fewest decimals strictly inside the best interval (0.52 rather than 0.5213...), so it
    can be stored and read back as it is and still gives exactly the F1 returned: rounding it
    afterwards can cross a change point, where scores crowd together near 0 or 1. Returns
    (threshold, F1).
    """
    if average not in ("macro", "micro"):
        raise DataError(f"average must be 'macro' or 'micro', got {average!r}")
    if criterion not in ("event", "segment"):
        raise DataError(f"criterion must be 'event' or 'segment', got {criterion!r}")
    scores, truth = _scores_and_truth(probs, hop_s, vocabulary, audio_ids, ground_truth)
    if criterion == "event":
        curves, _ = collar_based.accumulated_intermediate_statistics(
            scores=scores, ground_truth=truth, **_collar_args(onset_collar, offset_collar, offset_collar_rate)
        )
    else:
        curves, _ = segment_based.accumulated_intermediate_statistics(
            scores, truth, **_segment_args(probs, hop_s, audio_ids, segment_length)
        )
    change_points = np.unique(np.concatenate([c[0] for c in curves.values()]))
    change_points = change_points[np.isfinite(change_points)]
    # Interval i is (lows[i], highs[i]): below every change point, then between neighbours.
    lows = np.concatenate([[-np.inf], change_points[:-1]])
    highs = change_points
    candidates = np.concatenate([[change_points[0] - 1.0], lows[1:] + (highs[1:] - lows[1:]) / 2])
    tps, fps, n_refs = [], [], []
    for label in vocabulary:
        curve_scores, stats = curves[label]
        order = np.argsort(curve_scores, kind="stable")
        # The operating point of threshold t is the first curve score strictly above t.
        idx = order[np.searchsorted(curve_scores[order], candidates, side="right")]
        tps.append(stats["tps"][idx])
        fps.append(stats["fps"][idx])
        n_refs.append(stats["n_ref"])
    tp, fp, n_ref = np.stack(tps), np.stack(fps), np.asarray(n_refs, dtype=np.float64)[:, None]
    if average == "macro":
        f1 = (2 * tp / (tp + fp + n_ref)).mean(axis=0)
    else:
        f1 = 2 * tp.sum(0) / (tp.sum(0) + fp.sum(0) + n_ref.sum())
    # Neighbouring float64 change points leave no number strictly between them: no threshold
    # reaches that operating point, so it cannot be chosen.
    f1 = np.where((candidates > lows) & (candidates < highs), f1, -np.inf)
    best = len(f1) - 1 - int(np.argmax(f1[::-1]))
    return shortest_decimal_between(float(lows[best]), float(highs[best])), float(f1[best])


def shortest_decimal_between(low: float, high: float) -> float:
    """The number with the fewest decimals strictly between `low` and `high` (`low` may be
    -inf); the one nearest the middle among those. Needs a float strictly between them."""
    if not low < high:
        raise DataError(f"no number lies strictly between {low!r} and {high!r}")
    if not math.isfinite(low):
        return float(math.ceil(high) - 1)
    middle = low + (high - low) / 2
    for decimals in range(18):
        candidate = round(middle, decimals)
        if low < candidate < high:
            return float(candidate)
    if not low < middle < high:
        raise DataError(f"no float lies strictly between {low!r} and {high!r}")
    return float(middle)
