import math

import numpy as np
import pandas as pd
import pytest
from psds_eval import PSDSEval
from sed_scores_eval import collar_based, segment_based
from sklearn.metrics import roc_auc_score

from flam_core.errors import DataError
from flam_core.evaluation.frames import frame_auroc, macro_gain_interval, recognition_and_localisation
from flam_core.evaluation.retrieval import retrieval_metrics, zero_shot_accuracy
from flam_core.evaluation.sed import (
    PSDS_SCENARIOS,
    best_threshold,
    event_f1,
    frame_scores_to_sed_scores,
    psds,
    segment_f1,
    shortest_decimal_between,
)
from flam_core.postprocess import median_filter_frames, segments_from_frames

HOP = 0.3125
L = 32
VOCAB = ["dog", "rain", "siren"]


def planted_case(seed: int, signal: float):
    """Random events on the 32-frame grid and frame scores that rise `signal` inside them."""
    rng = np.random.default_rng(seed)
    ids = [f"clip{m}.wav" for m in range(6)]
    truth = np.zeros((len(ids), len(VOCAB), L), dtype=bool)
    ground_truth = {audio_id: [] for audio_id in ids}
    for m, audio_id in enumerate(ids):
        for k, label in enumerate(VOCAB):
            if m < 2 or rng.random() < 0.7:
                start = int(rng.integers(0, L - 4))
                end = min(L, start + int(rng.integers(2, 12)))
                truth[m, k, start:end] = True
                ground_truth[audio_id].append((start * HOP, end * HOP, label))
    probs = np.clip(truth * signal + rng.random(truth.shape) * (1 - signal), 0, 1).round(1)
    return probs, ids, ground_truth, truth


def reference_psds(probs, ids, ground_truth, scenario: int, alpha_st: float | None = None) -> float:
    """PSDS from psds_eval (the DCASE reference) with one operating point per distinct score,
    at the scenario's alpha_st unless `alpha_st` is given.

    psds_eval 0.5.3's `PSDSEval.psds` crashes under numpy >= 2.3 when max_efpr is not one of
    the curve's x values (`int()` of a 2-D `np.argwhere`), so its final AUC step is done here
    the way `_auc` does it, after inserting max_efpr into the curve.
    """
    params = PSDS_SCENARIOS[scenario] | ({} if alpha_st is None else {"alpha_st": alpha_st})
    columns = ["filename", "onset", "offset", "event_label"]
    gt = pd.DataFrame(
        [(a, on, off, lab) for a, evs in ground_truth.items() for on, off, lab in evs], columns=columns
    )
    meta = pd.DataFrame([(a, L * HOP) for a in ids], columns=["filename", "duration"])
    evaluator = PSDSEval(
        dtc_threshold=params["dtc_threshold"],
        gtc_threshold=params["gtc_threshold"],
        cttc_threshold=params["cttc_threshold"] or 0.3,
        ground_truth=gt,
        metadata=meta,
        class_names=VOCAB,
    )
    levels = np.unique(probs)
    for threshold in np.concatenate([[levels[0] - 1], (levels[1:] + levels[:-1]) / 2]):
        rows = [
            (audio_id, on, off, label)
            for m, audio_id in enumerate(ids)
            for k, label in enumerate(VOCAB)
            for on, off, _ in segments_from_frames(probs[m, k], HOP, threshold, median_frames=1)
        ]
        evaluator.add_operating_point(pd.DataFrame(rows, columns=columns), info={"threshold": threshold})
    _, _, tpr_efpr = evaluator.psd_roc_curves(params["alpha_ct"])
    roc = evaluator._effective_tp_ratio(tpr_efpr, params["alpha_st"])
    x, y, max_efpr = roc.xp, roc.yp, params["max_efpr"]
    if max_efpr not in x:
        i = int(np.searchsorted(x, max_efpr))
        x, y = np.insert(x, i, max_efpr), np.insert(y, i, y[i - 1])
    return evaluator._auc(x, y, max_efpr, params["alpha_st"] > 0) / max_efpr


# ---------------------------------------------------------------- score tables


def test_score_tables_follow_the_frame_grid():
    probs = np.random.default_rng(0).random((2, 3, L))
    tables = frame_scores_to_sed_scores(probs, HOP, VOCAB, ["a", "b"])
    assert list(tables) == ["a", "b"]
    table = tables["b"]
    assert list(table.columns) == ["onset", "offset", *VOCAB]
    assert table["onset"].iloc[5] == 5 * HOP and table["offset"].iloc[5] == 6 * HOP
    assert table["offset"].iloc[-1] == pytest.approx(10.0)
    np.testing.assert_array_equal(table[VOCAB].to_numpy(), probs[1].T)


# ---------------------------------------------------------------- PSDS


@pytest.mark.parametrize("scenario", [1, 2])
def test_perfect_and_silent_scores_give_psds_one_and_zero(scenario):
    _, ids, ground_truth, truth = planted_case(1, 0.5)
    durations = dict.fromkeys(ids, 10.0)
    perfect = psds(truth, HOP, VOCAB, ids, ground_truth, durations, scenario)
    assert perfect["psds"] == pytest.approx(1.0)
    assert perfect["per_label"] == pytest.approx(dict.fromkeys(VOCAB, 1.0))
    silent = psds(np.zeros(truth.shape), HOP, VOCAB, ids, ground_truth, durations, scenario)
    assert silent["psds"] == 0.0


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize(("scenario", "signal"), [(1, 0.45), (2, 0.3)])
def test_psds_agrees_with_the_dcase_reference(scenario, signal):
    # With one psds_eval operating point per distinct score the two computations coincide, with
    # DCASE's alpha_st = 1 and with the alpha_st = 0 of open-vocabulary SED papers.
    probs, ids, ground_truth, _ = planted_case(0, signal)
    ours = psds(probs, HOP, VOCAB, ids, ground_truth, dict.fromkeys(ids, 10.0), scenario)
    reference = reference_psds(probs, ids, ground_truth, scenario)
    assert 0.1 < reference < 0.9  # a case where thresholds, tolerances and alpha_st all matter
    assert ours["psds"] == pytest.approx(reference, abs=1e-6)
    assert ours["scenario"] == scenario and ours["params"] == PSDS_SCENARIOS[scenario]
    reference_st0 = reference_psds(probs, ids, ground_truth, scenario, alpha_st=0.0)
    assert reference_st0 > reference + 0.01  # the classes' spread costs something here
    assert ours["psds_alpha_st0"] == pytest.approx(reference_st0, abs=1e-6)
    # Asked for directly, alpha_st = 0 gives the same number from the full computation.
    direct = psds(probs, HOP, VOCAB, ids, ground_truth, dict.fromkeys(ids, 10.0), scenario, alpha_st=0.0)
    assert direct["psds"] == pytest.approx(reference_st0, abs=1e-6)
    assert direct["params"] == PSDS_SCENARIOS[scenario] | {"alpha_st": 0.0}


@pytest.mark.parametrize("scenario", [1, 2])
def test_alpha_st_subtracts_the_spread_of_the_class_tpr(scenario):
    """Worked by hand. 2 files of 36 s (0.02 h: one false alarm is 50 per hour), 0.5 s frames.
    dog: events in a and b, found at 0.9 and 0.6, and a false alarm in a at 0.8, so its TPR is
    0.5 at eFPR 0 and 1 from eFPR 50 on. cat: one event found at 0.7 and no false alarm, TPR 1
    from eFPR 0. Over eFPR [0, 100): mean TPR 0.75 (std 0.25) on [0, 50), 1 (std 0) on [50, 100).
    alpha_st = 0: (0.75 * 50 + 1 * 50) / 100 = 0.875; alpha_st = 1: (0.5 * 50 + 1 * 50) / 100
    = 0.75. Single-class PSDS: dog (0.5 * 50 + 1 * 50) / 100 = 0.75, cat 1. No detection crosses
    into another label's event, so scenario 2's cross-trigger term changes nothing."""
    hop, ids, vocab = 0.5, ["a", "b"], ["dog", "cat"]
    probs = np.zeros((2, 2, 72))
    probs[0, 0, 4:8] = 0.9  # dog 2-4 s in a
    probs[0, 0, 20:24] = 0.8  # dog false alarm 10-12 s in a
    probs[1, 0, 4:8] = 0.6  # dog 2-4 s in b
    probs[1, 1, 30:34] = 0.7  # cat 15-17 s in b
    ground_truth = {"a": [(2.0, 4.0, "dog")], "b": [(2.0, 4.0, "dog"), (15.0, 17.0, "cat")]}
    durations = {"a": 36.0, "b": 36.0}
    result = psds(probs, hop, vocab, ids, ground_truth, durations, scenario)
    assert result["per_label"] == pytest.approx({"dog": 0.75, "cat": 1.0})
    assert result["psds"] == pytest.approx(0.75)
    assert result["psds_alpha_st0"] == pytest.approx(0.875)
    np.testing.assert_allclose(result["etpr"], [0.5, 1.0, 1.0])
    np.testing.assert_allclose(result["efpr"], [0.0, 50.0, 100.0])
    half = psds(probs, hop, vocab, ids, ground_truth, durations, scenario, alpha_st=0.5)
    assert half["psds"] == pytest.approx((0.625 * 50 + 1 * 50) / 100)
    assert half["psds_alpha_st0"] == pytest.approx(0.875)
    for bad in (-1.0, math.nan, "1", True):
        with pytest.raises(DataError, match="alpha_st must be a non-negative number"):
            psds(probs, hop, vocab, ids, ground_truth, durations, scenario, alpha_st=bad)


@pytest.mark.parametrize(("scenario", "signal"), [(1, 0.45), (2, 0.3)])
def test_psds_alpha_st0_is_the_mean_single_class_psds(scenario, signal):
    # The area under the mean of staircase curves is the mean of their areas.
    probs, ids, ground_truth, _ = planted_case(3, signal)
    result = psds(probs, HOP, VOCAB, ids, ground_truth, dict.fromkeys(ids, 10.0), scenario)
    assert result["psds_alpha_st0"] == pytest.approx(np.mean(list(result["per_label"].values())), abs=1e-9)
    assert result["psds"] <= result["psds_alpha_st0"]


def test_psds_scenario2_tolerates_loose_boundaries_that_scenario1_rejects():
    # The dog detection is half as long again as its event: intersection 1/1.5 < 0.7 fails the
    # scenario-1 detection tolerance but passes scenario 2's 0.1. The cat is found exactly.
    ids = ["a"]
    ground_truth = {"a": [(1.25, 3.75, "dog"), (20 * HOP, 24 * HOP, "cat")]}
    probs = np.zeros((1, 2, L))
    probs[0, 0, 4:16] = 1.0  # 1.25 .. 5.0 s
    probs[0, 1, 20:24] = 1.0
    durations = {"a": 10.0}
    strict = psds(probs, HOP, ["dog", "cat"], ids, ground_truth, durations, 1)
    assert strict["per_label"] == {"dog": 0.0, "cat": 1.0}
    assert strict["psds"] == 0.0  # mean 0.5 minus alpha_st * std 0.5
    assert psds(probs, HOP, ["dog", "cat"], ids, ground_truth, durations, 2)["psds"] == pytest.approx(1.0)
    with pytest.raises(DataError, match="at least 2 labels"):
        psds(probs[:, :1], HOP, ["dog"], ids, {"a": ground_truth["a"][:1]}, durations, 2)


def test_psds_accepts_files_without_events():
    ids = ["a", "empty"]
    probs = np.zeros((2, 1, L))
    probs[0, 0, 4:8] = 0.9
    ground_truth = {"a": [(4 * HOP, 8 * HOP, "dog")], "empty": []}
    result = psds(probs, HOP, ["dog"], ids, ground_truth, {"a": 10.0, "empty": 10.0}, 1)
    assert result["psds"] == pytest.approx(1.0)
    # A false alarm in the empty file now costs: the PSD-ROC starts at a non-zero FP rate.
    probs[1, 0, 10:12] = 0.95
    worse = psds(probs, HOP, ["dog"], ids, ground_truth, {"a": 10.0, "empty": 10.0}, 1)
    assert worse["psds"] < 1.0


# ---------------------------------------------------------------- event F1


def small_f1_case():
    """2 files, 2 labels: dog found in a (TP), dog false alarm in b (FP), rain missed in b (FN)."""
    ids = ["a", "b"]
    ground_truth = {"a": [(1.25, 3.125, "dog")], "b": [(5.0, 7.5, "rain")]}
    probs = np.zeros((2, 2, L))
    probs[0, 0, 4:10] = 0.9  # a/dog 1.25 .. 3.125 s, exact
    probs[1, 0, 20:26] = 0.8  # b/dog: no dog there
    probs[1, 1, 16:24] = 0.3  # b/rain: right place, below the threshold
    return probs, ids, ground_truth


def test_event_f1_hand_computed():
    probs, ids, ground_truth = small_f1_case()
    result = event_f1(probs, HOP, ["dog", "rain"], ids, ground_truth, threshold=0.5)
    dog, rain = result["per_label"]["dog"], result["per_label"]["rain"]
    assert (dog["tp"], dog["fp"], dog["n_ref"]) == (1, 1, 1)
    assert (rain["tp"], rain["fp"], rain["n_ref"]) == (0, 0, 1)
    assert dog["precision"] == 0.5 and dog["recall"] == 1.0 and dog["f1"] == pytest.approx(2 / 3)
    assert rain["recall"] == 0.0 and rain["f1"] == 0.0
    assert rain["precision"] == 1.0  # sed_scores_eval: no detection -> precision 1
    assert result["f1_macro"] == pytest.approx(1 / 3)
    assert result["precision_macro"] == pytest.approx(0.75)
    assert result["recall_macro"] == pytest.approx(0.5)
    assert result["precision_micro"] == 0.5 and result["recall_micro"] == 0.5
    assert result["f1_micro"] == pytest.approx(0.5)


def test_event_f1_threshold_is_strict_and_per_label():
    probs, ids, ground_truth = small_f1_case()
    # At exactly 0.8 the b/dog false alarm (score 0.8) is no longer detected.
    at = event_f1(probs, HOP, ["dog", "rain"], ids, ground_truth, threshold=0.8)
    assert at["per_label"]["dog"]["fp"] == 0
    per_label = event_f1(probs, HOP, ["dog", "rain"], ids, ground_truth, threshold={"dog": 0.85, "rain": 0.2})
    assert per_label["f1_macro"] == 1.0 and per_label["f1_micro"] == 1.0


def test_event_f1_collars():
    ids = ["a"]
    ground_truth = {"a": [(1.25, 3.125, "dog")]}
    probs = np.zeros((1, 1, L))
    probs[0, 0, 5:10] = 0.9  # onset 1.5625 s: 0.3125 s late
    assert event_f1(probs, HOP, ["dog"], ids, ground_truth, 0.5)["f1_macro"] == 0.0
    loose = event_f1(probs, HOP, ["dog"], ids, ground_truth, 0.5, onset_collar=0.4)
    assert loose["f1_macro"] == 1.0


def test_segment_f1_hand_computed():
    probs, ids, ground_truth = small_f1_case()
    result = segment_f1(probs, HOP, ["dog", "rain"], ids, ground_truth, threshold=0.5)
    dog, rain = result["per_label"]["dog"], result["per_label"]["rain"]
    # 1 s segments: a/dog 1.25-3.125 s covers segments 1-3, found in all three; the b/dog
    # false alarm 6.25-8.125 s lights segments 6-8; b/rain 5.0-7.5 s (segments 5-7) is missed.
    assert (dog["tp"], dog["fp"], dog["n_ref"]) == (3, 3, 3)
    assert (rain["tp"], rain["fp"], rain["n_ref"]) == (0, 0, 3)
    assert dog["f1"] == pytest.approx(2 / 3) and rain["f1"] == 0.0
    # A 0.3125 s late onset costs a whole event under 200 ms collars, but no segment here.
    late = probs[:1, :1].copy()
    late[0, 0, 4] = 0.0
    assert event_f1(late, HOP, ["dog"], ids[:1], {"a": ground_truth["a"]}, 0.5)["f1_macro"] == 0.0
    assert segment_f1(late, HOP, ["dog"], ids[:1], {"a": ground_truth["a"]}, 0.5)["f1_macro"] == 1.0
    with pytest.raises(DataError, match="segment_length"):
        segment_f1(probs, HOP, ["dog", "rain"], ids, ground_truth, 0.5, segment_length=0.0)


def test_best_threshold_is_exact_and_consistent_with_event_f1():
    probs, ids, ground_truth, _ = planted_case(3, 0.35)
    for average in ("macro", "micro"):
        threshold, f1 = best_threshold(probs, HOP, VOCAB, ids, ground_truth, average=average)
        assert event_f1(probs, HOP, VOCAB, ids, ground_truth, threshold)[f"f1_{average}"] == pytest.approx(f1)
        grid = [
            event_f1(probs, HOP, VOCAB, ids, ground_truth, t)[f"f1_{average}"]
            for t in np.arange(-0.05, 1.0, 0.05)
        ]
        assert f1 == pytest.approx(max(grid))
        assert 0 < f1 < 1


def test_best_threshold_on_segment_f1_is_exact():
    probs, ids, ground_truth, _ = planted_case(5, 0.3)
    threshold, f1 = best_threshold(probs, HOP, VOCAB, ids, ground_truth, criterion="segment")
    assert segment_f1(probs, HOP, VOCAB, ids, ground_truth, threshold)["f1_macro"] == pytest.approx(f1)
    grid = [
        segment_f1(probs, HOP, VOCAB, ids, ground_truth, t)["f1_macro"] for t in np.arange(-0.05, 1.0, 0.05)
    ]
    assert f1 == pytest.approx(max(grid)) and 0 < f1 < 1
    # One label: the shared optimum is sed_scores_eval's own per-label optimum.
    gt_dog = {a: [e for e in evs if e[2] == "dog"] for a, evs in ground_truth.items()}
    _, f1_dog = best_threshold(probs[:, :1], HOP, ["dog"], ids, gt_dog, criterion="segment")
    scores = frame_scores_to_sed_scores(probs[:, :1], HOP, ["dog"], ids)
    f, *_ = segment_based.best_fscore(scores, gt_dog, dict.fromkeys(ids, L * HOP), segment_length=1.0)
    assert f1_dog == pytest.approx(f["dog"])
    with pytest.raises(DataError, match="criterion"):
        best_threshold(probs, HOP, VOCAB, ids, ground_truth, criterion="frame")


def crowded_case():
    """Float32 scores crowded just below 1.0, exact 0s and 1s, and ties across clips.

    dog: in clip a the event (segment 0) scores `high`, the nine other segments `low`, both
    within 1e-4 of 1: F1 is 1 only for thresholds in (low, high). Clip b's dog event scores
    exactly 1.0 over silence at exactly 0.0. rain: clips a and b tie at 0.5 everywhere, with
    one event in b, so a threshold below 0.5 trades a hit for ten false alarms.
    """
    low, high = np.float32(0.99991), np.float32(0.99995)
    ids = ["a", "b"]
    probs = np.zeros((2, 2, L), dtype=np.float32)
    probs[0, 0, :] = low
    probs[0, 0, :3] = high
    probs[1, 0, 16:19] = 1.0
    probs[:, 1, :] = 0.5
    ground_truth = {"a": [(0.0, 1.0, "dog")], "b": [(5.0, 6.0, "dog"), (2.0, 3.0, "rain")]}
    return probs, ids, ground_truth, (float(low), float(high))


def test_best_threshold_is_exact_on_crowded_tied_and_saturated_scores():
    probs, ids, ground_truth, (low, high) = crowded_case()
    vocab = ["dog", "rain"]
    threshold, f1 = best_threshold(probs, HOP, vocab, ids, ground_truth, criterion="segment")

    def f1_at(t: float) -> float:
        return segment_f1(probs, HOP, vocab, ids, ground_truth, threshold=t)["f1_macro"]

    # The optimum lies in (low, high), a gap narrower than 1e-4, and is stored as a short number.
    assert low < threshold < high and threshold == 0.99993
    assert f1_at(threshold) == pytest.approx(f1, abs=1e-12)
    # Exact: no threshold does better, neither between any two distinct scores nor on a grid.
    points = np.unique(probs.astype(np.float64))
    between = np.concatenate([[points[0] - 1], (points[1:] + points[:-1]) / 2, [points[-1] + 1]])
    assert f1 >= max(f1_at(t) for t in between) - 1e-12
    assert f1 >= max(f1_at(t) for t in np.linspace(0.01, 0.99, 99)) - 1e-12
    # Rounding the exact midpoint to 4 decimals, as thresholds once were stored, crosses `low`.
    assert f1_at(round((low + high) / 2, 4)) < f1 - 0.1
    # One label at a time, the shared search is sed_scores_eval's own per-label optimum.
    for k, label in enumerate(vocab):
        mine = {a: [e for e in evs if e[2] == label] for a, evs in ground_truth.items()}
        _, alone = best_threshold(probs[:, k : k + 1], HOP, [label], ids, mine, criterion="segment")
        scores = frame_scores_to_sed_scores(probs[:, k : k + 1], HOP, [label], ids)
        f, *_ = segment_based.best_fscore(scores, mine, dict.fromkeys(ids, L * HOP), segment_length=1.0)
        assert alone == pytest.approx(f[label], abs=1e-12)


def test_shortest_decimal_between():
    assert shortest_decimal_between(0.51, 0.53) == 0.52
    assert shortest_decimal_between(0.41, 0.58) == 0.5
    assert shortest_decimal_between(0.99991, 0.99995) == 0.99993
    assert shortest_decimal_between(-math.inf, 0.003) == 0.0
    assert shortest_decimal_between(-math.inf, 0.0) == -1.0
    tight = float(np.float32(0.9))
    assert tight < shortest_decimal_between(tight, float(np.nextafter(np.float32(0.9), 1))) < 0.90000007
    with pytest.raises(DataError, match="strictly between"):
        shortest_decimal_between(0.5, 0.5)
    with pytest.raises(DataError, match="strictly between"):
        shortest_decimal_between(1.0, float(np.nextafter(1.0, 2.0)))


def test_best_threshold_matches_sed_scores_eval_for_one_label():
    probs, ids, ground_truth, _ = planted_case(4, 0.35)
    gt_dog = {a: [e for e in evs if e[2] == "dog"] for a, evs in ground_truth.items()}
    threshold, f1 = best_threshold(probs[:, :1], HOP, ["dog"], ids, gt_dog)
    assert event_f1(probs[:, :1], HOP, ["dog"], ids, gt_dog, threshold)["f1_macro"] == pytest.approx(f1)
    scores = frame_scores_to_sed_scores(probs[:, :1], HOP, ["dog"], ids)
    f, *_ = collar_based.best_fscore(
        scores, gt_dog, onset_collar=0.2, offset_collar=0.2, offset_collar_rate=0.2
    )
    assert f1 == pytest.approx(f["dog"])


# ---------------------------------------------------------------- segments


def test_segments_recover_planted_spans_exactly():
    track = np.full(L, 0.1)
    track[3:8] = 0.7
    track[5] = 0.95
    track[20:32] = 0.6
    segments = segments_from_frames(track, HOP, threshold=0.5)
    assert segments == [(3 * HOP, 8 * HOP, 0.95), (20 * HOP, 10.0, 0.6)]
    assert segments_from_frames(track, HOP, threshold=0.99) == []


def test_median_filter_removes_a_one_frame_spike_and_fills_a_one_frame_gap():
    track = np.zeros(L)
    track[10] = 0.9  # spike
    track[20:24] = 0.8
    track[25:28] = 0.8  # one-frame gap at 24
    assert segments_from_frames(track, HOP, 0.5, median_frames=1)[0] == (10 * HOP, 11 * HOP, 0.9)
    assert segments_from_frames(track, HOP, 0.5) == [(20 * HOP, 28 * HOP, 0.8)]


def test_segments_threshold_is_strict_like_sed_scores_eval():
    track = np.zeros(L)
    track[4:8] = 0.5
    assert segments_from_frames(track, HOP, 0.5, median_frames=1) == []
    assert segments_from_frames(track, HOP, 0.49, median_frames=1) == [(4 * HOP, 8 * HOP, 0.5)]


@pytest.mark.parametrize("k", [2, 3, 4, 5, 7])
def test_median_filter_frames_equals_scipys_median_filter(k):
    """The numpy rank selection gives exactly scipy.ndimage.median_filter's values (edges repeated,
    even sizes included), ties and constant runs too."""
    from scipy.ndimage import median_filter

    rng = np.random.default_rng(k)
    for shape in [(9,), (3, 40), (2, 5, 33), (1, 1)]:
        probs = rng.random(shape).astype(np.float32)
        probs[..., ::4] = 0.5
        expected = median_filter(probs, size=(1,) * (probs.ndim - 1) + (k,), mode="nearest")
        got = median_filter_frames(probs, k)
        assert got.dtype == probs.dtype and np.array_equal(got, expected), (shape, k)


def test_median_filter_frames_acts_on_the_frame_axis_only():
    probs = np.zeros((2, 3, L))
    probs[1, 2, 7] = 1.0
    probs[1, :, 12] = 1.0  # all labels at one frame: a filter across labels would keep it
    assert not median_filter_frames(probs).any()
    assert median_filter_frames(probs, 1) is probs


# ---------------------------------------------------------------- frame AUROC and its gain


def test_frame_auroc_per_label_and_macro_agree_with_scikit_learn():
    probs, _, _, truth = planted_case(seed=3, signal=0.4)
    truth[:, 2] = False  # "siren" never sounds: it has no AUROC and stays out of the macro
    result = frame_auroc(truth, probs)
    expected = [roc_auc_score(truth[:, k].ravel(), probs[:, k].ravel()) for k in range(2)]
    assert result["per_label"][:2] == pytest.approx(expected)
    assert np.isnan(result["per_label"][2])
    assert result["macro"] == pytest.approx(np.mean(expected))
    assert result["n_labels"] == 2
    assert result["micro"] == pytest.approx(roc_auc_score(truth.ravel(), probs.ravel()))


def test_recognition_and_localisation_separate_knowing_if_from_knowing_when():
    rng = np.random.default_rng(4)
    truth = np.zeros((40, 2, L), dtype=bool)
    for m in range(40):  # label k sounds in the clips m with m % 2 == k, over a run of frames
        start = rng.integers(0, L - 8)
        truth[m, m % 2, start : start + rng.integers(2, 8)] = True
    present = truth.any(axis=2, keepdims=True)
    # A clip-level detector: the same score over the whole clip, high where the label sounds.
    clip_only = np.broadcast_to(present, truth.shape).astype(float)
    assert recognition_and_localisation(truth, clip_only) == {"clip": 1.0, "within_clip": 0.5}
    # Placing events exactly but ranking clips backwards: every frame of an absent clip outscores
    # the active frames of the clips where the label sounds.
    backwards = np.where(present, 0.5 + 0.1 * truth, 0.9)
    assert recognition_and_localisation(truth, backwards) == {"clip": 0.0, "within_clip": 1.0}
    # And against scikit-learn on noisy scores.
    noisy = truth + rng.normal(0.0, 1.0, truth.shape)
    result = recognition_and_localisation(truth, noisy)
    clip, within = [], []
    for k in range(2):
        clips = present[:, k, 0]
        clip.append(roc_auc_score(clips, noisy[:, k].max(axis=1)))
        within.append(roc_auc_score(truth[clips, k].ravel(), noisy[clips, k].ravel()))
    assert result == pytest.approx({"clip": np.mean(clip), "within_clip": np.mean(within)})
    with pytest.raises(DataError, match="one \\[M, K, L\\] shape"):
        recognition_and_localisation(truth, noisy[:, :, :-1])
    with pytest.raises(DataError, match="present in some clips and absent from others"):
        recognition_and_localisation(np.ones_like(truth), noisy)


def test_gain_interval_matches_the_normal_theory_interval_on_many_labels():
    rng = np.random.default_rng(0)
    labels = [f"label{i}" for i in range(400)]
    baseline = dict(zip(labels, rng.uniform(0.5, 0.8, len(labels)), strict=True))
    diff = rng.normal(0.08, 0.1, len(labels))
    ours = {label: baseline[label] + d for label, d in zip(labels, diff, strict=True)}
    interval = macro_gain_interval(ours, baseline)
    assert interval["gain"] == pytest.approx(diff.mean())
    # With 400 labels the bootstrap interval is the textbook mean +- 1.96 standard errors.
    half = 1.96 * diff.std(ddof=1) / math.sqrt(len(labels))
    assert interval["low"] == pytest.approx(diff.mean() - half, abs=0.15 * half)
    assert interval["high"] == pytest.approx(diff.mean() + half, abs=0.15 * half)
    assert interval["n_better"] == int((diff > 0).sum()) and interval["n_labels"] == 400
    # Seeded: the same labels give the same interval.
    assert macro_gain_interval(ours, baseline) == interval


def test_gain_interval_of_a_uniform_gain_is_that_gain():
    baseline = {"dog": 0.6, "rain": 0.7, "siren": 0.5}
    interval = macro_gain_interval({k: v + 0.125 for k, v in baseline.items()}, baseline)
    assert (interval["low"], interval["gain"], interval["high"]) == pytest.approx((0.125,) * 3)
    assert interval["n_better"] == 3


@pytest.mark.parametrize(
    ("ours", "baseline", "message"),
    [
        ({"dog": 0.9, "rain": 0.8}, {"dog": 0.7, "siren": 0.6}, "different labels"),
        ({"dog": 0.9}, {"dog": 0.7}, "at least 2 labels"),
    ],
)
def test_bad_gain_interval_inputs_raise_data_error(ours, baseline, message):
    with pytest.raises(DataError, match=message):
        macro_gain_interval(ours, baseline)


# ---------------------------------------------------------------- retrieval and zero-shot


def test_identity_embeddings_are_retrieved_perfectly():
    emb = np.eye(6)
    result = retrieval_metrics(emb, emb, np.arange(6))
    assert set(result) == {f"{d}_{m}" for d in ("t2a", "a2t") for m in ("R@1", "R@5", "R@10", "mAP@10")}
    assert all(value == 1.0 for value in result.values())


def test_retrieval_hand_built_ranks():
    audio = np.eye(3)
    # Text t describes audio t; t1 ranks its audio second, t2 third.
    text = np.array([[1.0, 0.0, 0.0], [0.9, 0.4, 0.1], [0.9, 0.5, 0.1]])
    result = retrieval_metrics(audio, text, np.array([0, 1, 2]))
    assert result["t2a_R@1"] == pytest.approx(1 / 3)
    assert result["t2a_R@5"] == 1.0
    assert result["t2a_mAP@10"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    # audio 0 ranks t0 first; audio 1: t2 before t1; audio 2: t1 before t2.
    assert result["a2t_R@1"] == pytest.approx(1 / 3)
    assert result["a2t_mAP@10"] == pytest.approx((1 + 1 / 2 + 1 / 2) / 3)


def test_audio_to_text_average_precision_with_several_relevant_texts():
    audio = np.array([[1.0, 0.0], [0.0, 1.0]])
    angles = np.deg2rad([0, 10, 20, 80])
    text = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    text_to_audio = np.array([0, 1, 0, 1])
    result = retrieval_metrics(audio, text, text_to_audio)
    # Each audio's two texts come at ranks 1 and 3: AP = (1/1 + 2/3) / 2.
    assert result["a2t_mAP@10"] == pytest.approx(5 / 6)
    assert result["a2t_R@1"] == 1.0
    # Text at 10 degrees belongs to audio 1 but is closer to audio 0.
    assert result["t2a_R@1"] == pytest.approx(3 / 4)
    assert result["t2a_mAP@10"] == pytest.approx((1 + 1 / 2 + 1 + 1) / 4)


def test_average_precision_is_normalised_by_at_most_ten_relevant():
    audio = np.eye(2)
    text = np.vstack([np.tile([1.0, 0.0], (12, 1)) + np.linspace(0, 0.1, 12)[:, None] * [0, 1], [[0.0, 1.0]]])
    result = retrieval_metrics(audio, text, np.array([0] * 12 + [1]))
    assert result["a2t_mAP@10"] == 1.0


def test_zero_shot_accuracy_small_case():
    scores = np.array(
        [
            [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # target 0: top-1
            [0.1, 0.8, 0.0, 0.0, 0.0, 0.0],  # target 1: top-1
            [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],  # target 4: rank 5
            [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],  # target 5: rank 6
        ]
    )
    result = zero_shot_accuracy(scores, np.array([0, 1, 4, 5]))
    assert result["top1"] == 0.5 and result["top5"] == 0.75 and result["n"] == 4
    assert result["mean_class_accuracy"] == pytest.approx(0.5)  # classes 0, 1 right; 4, 5 wrong
    imbalanced = zero_shot_accuracy(np.array([[1.0, 0.0]] * 4), np.array([0, 0, 0, 1]))
    assert imbalanced["top1"] == 0.75 and imbalanced["mean_class_accuracy"] == 0.5
    assert "top5" not in imbalanced


# ---------------------------------------------------------------- bad inputs


@pytest.fixture
def good():
    probs, ids, ground_truth = small_f1_case()
    return {"probs": probs, "ids": ids, "gt": ground_truth, "vocab": ["dog", "rain"]}


def call_f1(case, **change):
    args = {**case, **change}
    return event_f1(args["probs"], HOP, args["vocab"], args["ids"], args["gt"], threshold=0.5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"probs": np.zeros((2, 2))}, r"\[M, K, L\]"),
        ({"probs": np.zeros((3, 2, L))}, "3 mixtures but 2 audio ids"),
        ({"probs": np.zeros((2, 3, L))}, "3 labels but the vocabulary has 2"),
        ({"probs": np.zeros((0, 2, L)), "ids": []}, "empty"),
        ({"vocab": ["dog", "dog"]}, "repeated"),
        ({"vocab": ["onset", "rain"]}, "clash"),
        ({"gt": {"a": [(1.0, 2.0, "cat")], "b": [(5.0, 7.5, "rain")]}}, "'cat' is not in the vocabulary"),
        ({"gt": {"a": [(2.0, 2.0, "dog")], "b": [(5.0, 7.5, "rain")]}}, "onset >= offset"),
        ({"gt": {"a": [(-1.0, 2.0, "dog")], "b": [(5.0, 7.5, "rain")]}}, "before 0"),
        ({"gt": {"a": [(math.nan, 2.0, "dog")], "b": [(5.0, 7.5, "rain")]}}, "NaN"),
        (
            {"gt": {"a": [(1.0, 2.0, "dog"), (2.0, 3.0, "dog")], "b": [(5.0, 7.5, "rain")]}},
            "overlap or touch",
        ),
        ({"gt": {"a": [(1.25, 3.125, "dog")]}}, r"lacks 1 scored audio id.*'b'"),
        ({"gt": {"a": [(1.25, 3.125, "dog")], "b": [], "c": []}}, r"without frame scores.*'c'"),
        ({"gt": {"a": [(1.25, 3.125, "dog")], "b": []}}, r"\['rain'\] have no ground-truth event"),
    ],
)
def test_bad_sed_inputs_raise_data_error(good, change, message):
    with pytest.raises(DataError, match=message):
        call_f1(good, **change)


def test_nan_scores_are_located(good):
    good["probs"][1, 1, 7] = np.nan
    with pytest.raises(DataError, match=r"NaN/inf.*audio 'b', label 'rain', frame 7"):
        call_f1(good)


def test_bad_thresholds_scenarios_and_durations(good):
    probs, ids, gt, vocab = good["probs"], good["ids"], good["gt"], good["vocab"]
    with pytest.raises(DataError, match="missing \\['rain'\\]"):
        event_f1(probs, HOP, vocab, ids, gt, threshold={"dog": 0.5})
    with pytest.raises(DataError, match="finite number"):
        event_f1(probs, HOP, vocab, ids, gt, threshold=math.nan)
    with pytest.raises(DataError, match="scenario"):
        psds(probs, HOP, vocab, ids, gt, {"a": 10.0, "b": 10.0}, scenario=3)
    with pytest.raises(DataError, match=r"durations lack 1 audio id.*'b'"):
        psds(probs, HOP, vocab, ids, gt, {"a": 10.0}, scenario=1)
    with pytest.raises(DataError, match=r"cover only 10\.000 s"):
        psds(probs, HOP, vocab, ids, gt, {"a": 10.0, "b": 30.0}, scenario=1)
    with pytest.raises(DataError, match="ends after the audio"):
        psds(probs, HOP, vocab, ids, gt, {"a": 10.0, "b": 6.0}, scenario=1)
    with pytest.raises(DataError, match="hop_s"):
        event_f1(probs, 0.0, vocab, ids, gt, threshold=0.5)
    with pytest.raises(DataError, match="average"):
        best_threshold(probs, HOP, vocab, ids, gt, average="weighted")
    with pytest.raises(DataError, match="median_frames"):
        segments_from_frames(probs[0, 0], HOP, 0.5, median_frames=0)
    with pytest.raises(DataError, match=r"\[L\] vector"):
        segments_from_frames(probs[0], HOP, 0.5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((np.eye(3), np.eye(4)[:, :3], np.array([0, 1, 2])), r"\[4\] vector"),
        ((np.eye(3), np.eye(3)[:, :2], np.array([0, 1, 2])), "dimension 3 but text embeddings 2"),
        ((np.eye(3), np.eye(3), np.array([0, 1, 3])), r"outside \[0, 3\)"),
        ((np.eye(3), np.eye(3), np.array([0, 1, 1])), "have no text"),
        ((np.eye(3), np.eye(3), np.array([0.0, 1.0, 2.0])), "integer"),
        ((np.full((3, 3), np.nan), np.eye(3), np.array([0, 1, 2])), "audio embeddings holds 9 NaN"),
        ((np.zeros((3, 3)), np.eye(3), np.array([0, 1, 2])), "all-zero"),
        ((np.zeros((0, 3)), np.eye(3), np.array([0, 1, 2])), "empty"),
    ],
)
def test_bad_retrieval_inputs_raise_data_error(args, message):
    with pytest.raises(DataError, match=message):
        retrieval_metrics(*args)


def test_bad_zero_shot_inputs_raise_data_error():
    with pytest.raises(DataError, match=r"\[3\] vector"):
        zero_shot_accuracy(np.eye(3), np.array([0, 1]))
    with pytest.raises(DataError, match=r"outside \[0, 3\)"):
        zero_shot_accuracy(np.eye(3), np.array([0, 1, 5]))
    with pytest.raises(DataError, match="NaN"):
        zero_shot_accuracy(np.array([[np.nan, 1.0]]), np.array([0]))
