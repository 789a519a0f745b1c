"""Moment retrieval: the metrics on hand-worked cases, the benchmark set (test clips only, exact
and deterministic ground truth), and the whole path from recordings to `flam search`'s figures."""

import json

import numpy as np
import pytest
import soundfile as sf

from flam_core.data.sources import load_manifest
from flam_core.errors import ConfigError, DataError
from flam_core.evaluation.moments import (
    IOU_THRESHOLDS,
    MomentQuery,
    SearchRanker,
    grid_oracle,
    moment_metrics,
    moment_retrieval,
    moment_set,
    moments_markdown,
    temporal_iou,
    write_moment_set,
)
from flam_core.inference import FlamDetector
from flam_core.search import SearchIndex, search


# --- metrics --------------------------------------------------------------------------------------
def one(truth, predictions, **kwargs):
    return moment_metrics([truth], [predictions], **kwargs)


def test_temporal_iou():
    iou = temporal_iou(
        np.array([[0.0, 10.0]]), np.array([[0.0, 5.0], [5.0, 15.0], [20.0, 30.0], [0.0, 10.0]])
    )
    assert iou.shape == (1, 4)
    assert iou[0] == pytest.approx([0.5, 1 / 3, 0.0, 1.0])


def test_a_perfect_top_answer_scores_one():
    m = one([(2.0, 4.0)], [(2.0, 4.0, 0.9)])
    assert m["r1@0.5"] == m["r1@0.7"] == m["map"] == 1.0
    assert m["n_queries"] == 1


def test_an_iou_equal_to_the_threshold_counts():
    # IoU 0.5 exactly: a hit at 0.5, a miss from 0.55 on, so 1 of the 10 AP terms.
    m = one([(0.0, 10.0)], [(0.0, 5.0, 1.0)])
    assert m["r1@0.5"] == 1.0 and m["r1@0.7"] == 0.0
    assert m["map@0.5"] == 1.0 and m["map@0.75"] == 0.0
    assert m["map"] == pytest.approx(0.1)


def test_two_ground_truth_spans_a_duplicate_and_a_near_miss():
    # Ranked: a perfect hit on the first span, the same span again (already taken: a false
    # positive), then the second span with IoU 0.9. Up to IoU 0.9: hits at ranks 1 and 3,
    # precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> AP = 1/2 * 1 + 1/2 * 2/3 = 5/6. At 0.95
    # only the first hit: AP = 1/2. mAP = (9 * 5/6 + 1/2) / 10 = 0.8.
    truth = [(0.0, 10.0), (20.0, 30.0)]
    predictions = [(0.0, 10.0, 0.9), (0.0, 10.0, 0.8), (21.0, 30.0, 0.7)]
    m = one(truth, predictions)
    assert m["r1@0.5"] == m["r1@0.7"] == 1.0
    assert m["map@0.5"] == pytest.approx(5 / 6) and m["map@0.75"] == pytest.approx(5 / 6)
    assert m["map_by_iou"]["0.9"] == pytest.approx(5 / 6) and m["map_by_iou"]["0.95"] == pytest.approx(0.5)
    assert m["map"] == pytest.approx(0.8)


def test_a_span_falls_back_to_the_next_best_ground_truth_when_the_best_is_taken():
    # Both predictions overlap (0, 10) best; the second takes (2, 10) instead, IoU 0.8: a hit up
    # to 0.8 (7 thresholds, AP 1), a false positive above (AP 1/2). mAP = (7 + 3/2) / 10.
    m = one([(0.0, 10.0), (2.0, 10.0)], [(0.0, 10.0, 0.9), (0.0, 10.0, 0.8)])
    assert [m["map_by_iou"][f"{t:g}"] for t in IOU_THRESHOLDS] == pytest.approx([1.0] * 7 + [0.5] * 3)
    assert m["map"] == pytest.approx(0.85)


def test_spans_are_ranked_by_score_not_by_list_order():
    m = one([(0.0, 10.0)], [(20.0, 30.0, 0.1), (0.0, 10.0, 0.9)])
    assert m["r1@0.5"] == 1.0 and m["map"] == 1.0


def test_equal_scores_keep_the_given_order():
    hit_first = one([(0.0, 10.0)], [(0.0, 10.0, 0.5), (20.0, 30.0, 0.5)])
    miss_first = one([(0.0, 10.0)], [(20.0, 30.0, 0.5), (0.0, 10.0, 0.5)])
    assert hit_first["r1@0.5"] == 1.0 and hit_first["map"] == 1.0
    # miss then hit: precision 1/2 at recall 1
    assert miss_first["r1@0.5"] == 0.0 and miss_first["map"] == pytest.approx(0.5)


def test_a_query_without_predictions_counts_as_a_miss():
    m = moment_metrics([[(0.0, 10.0)], [(5.0, 6.0)]], [[(0.0, 10.0, 1.0)], []])
    assert m["n_queries"] == 2
    assert m["r1@0.5"] == 0.5 and m["r1@0.7"] == 0.5 and m["map"] == pytest.approx(0.5)


def test_only_the_best_ten_spans_count():
    misses = [(20.0 + k, 21.0 + k, 1.0 - 0.01 * k) for k in range(10)]
    predictions = [*misses, (0.0, 10.0, 0.5)]
    assert one([(0.0, 10.0)], predictions)["map"] == 0.0
    # with an 11th place the hit counts at precision 1/11
    assert one([(0.0, 10.0)], predictions, max_predictions=11)["map"] == pytest.approx(1 / 11)


def test_the_top_span_may_match_any_ground_truth_span():
    m = one([(0.0, 2.0), (10.0, 14.0)], [(10.0, 14.0, 1.0)])
    assert m["r1@0.7"] == 1.0
    assert m["map"] == pytest.approx(0.5)  # half the ground truth found, at precision 1


@pytest.mark.parametrize(
    ("truth", "predictions", "kwargs", "message"),
    [
        ([[(0, 1)]], [], {}, "1 queries have ground truth but 0 have predictions"),
        ([], [], {}, "no query"),
        ([[]], [[]], {}, "query 0 has no ground-truth span"),
        ([[(2, 2)]], [[]], {}, r"query 0: ground truth: span \(2, 2\) is not a time span"),
        ([[(-1, 2)]], [[]], {}, "is not a time span"),
        ([[(0, 1)]], [[(0, 1, float("nan"))]], {}, "query 0: predictions holds NaN"),
        ([[(0, 1)]], [[(3, 1, 0.5)]], {}, r"query 0: predictions: span \(3, 1\)"),
        ([[(0, 1)]], [[(0, 1)]], {}, "rows of 3 numbers"),
        ([[(0, 1)]], [[("a", 1, 2)]], {}, "list of 3-number rows"),
        ([[(0, 1)]], [[(0, 1, 1)]], {"max_predictions": 0}, "max_predictions must be a positive integer"),
    ],
)
def test_bad_inputs_are_refused_with_the_reason(truth, predictions, kwargs, message):
    with pytest.raises(DataError, match=message):
        moment_metrics(truth, predictions, **kwargs)


# --- the benchmark set ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def manifest(smoke_library):
    library, _ = smoke_library
    return load_manifest(library)


def clip_rows(mixer, manifest, plan):
    """The manifest row of every clip a plan plays."""
    return manifest.set_index("clip_id").loc[np.array(list(mixer.clip_index))[plan.clip]]


@pytest.mark.parametrize(("split", "heldout"), [("test_unseen", True), ("test_seen", False)])
def test_recordings_use_only_test_clips_and_follow_from_the_seed(mixer, manifest, split, heldout):
    moments = moment_set(mixer, manifest, split, 3, seed=5, min_s=30.0, max_s=60.0)
    rows = clip_rows(mixer, manifest, moments.plan)
    assert (rows["split"] == "test").all()
    captions = {label: set() for label in manifest["label"]}
    for label, texts in zip(manifest["label"], manifest["captions"], strict=True):
        captions[label].update(texts)
    events = rows[rows["kind"] == "event"]
    assert len(events) and (events["heldout"] == heldout).all()
    assert len(moments.recordings) == 3 and moments.queries
    for recording in moments.recordings:
        assert 30.0 <= recording.duration_s <= 60.0
        assert recording.duration_s == len(recording.mixtures) * mixer.synth.mixture_s
        for query in recording.queries:
            spans = np.array(query.spans)
            assert (spans[:, 0] >= 0).all() and (spans[:, 1] <= recording.duration_s).all()
            assert (spans[1:, 0] > spans[:-1, 1]).all()  # sorted, merged
            assert query.labels and recording.background_label not in query.labels
            assert all(query.text in captions[label] for label in query.labels)
            assert query.text not in captions[recording.background_label]
    again = moment_set(mixer, manifest, split, 3, seed=5, min_s=30.0, max_s=60.0)
    assert again.recordings == moments.recordings
    assert np.array_equal(again.plan.src_start, moments.plan.src_start)
    other = moment_set(mixer, manifest, split, 3, seed=6, min_s=30.0, max_s=60.0)
    assert other.recordings != moments.recordings


def test_one_background_plays_on_under_the_whole_recording(mixer, manifest):
    moments = moment_set(mixer, manifest, "test_seen", 2, seed=1, min_s=40.0, max_s=40.0)
    plan = moments.plan
    for recording in moments.recordings:
        rows = [r for i in recording.mixtures for r in range(plan.row_start[i], plan.row_start[i + 1])]
        beds = [r for r in rows if not plan.is_event[r]]
        assert len(beds) == len(recording.mixtures) == 4
        assert len({int(plan.clip[r]) for r in beds}) == 1
        clip = int(plan.clip[beds[0]])
        assert list(mixer.clip_index)[clip] == recording.background
        period = mixer.loop_period_s[clip]
        steps = np.mod(np.diff(plan.offset_s[beds]), period)
        assert steps == pytest.approx(np.full(3, mixer.synth.mixture_s % period), abs=1e-9)


def test_ground_truth_is_where_the_described_sound_is(mixer, manifest, tmp_path):
    """The written file is the mixtures end to end; the events of a query's labels, rendered
    alone, hold their energy inside its spans (outside: only the quiet parts of the clips)."""
    moments = moment_set(mixer, manifest, "test_unseen", 2, seed=2, min_s=30.0, max_s=30.0)
    files = write_moment_set(moments, mixer, tmp_path / "set")
    plan, sr = moments.plan, mixer.sample_rate
    described = json.loads((tmp_path / "set" / "moments.json").read_text())
    assert [r["name"] for r in described["recordings"]] == [r.name for r in moments.recordings]
    checked = 0
    for recording in moments.recordings:
        audio, rate = sf.read(files[recording.name], dtype="float32")
        assert rate == sr and len(audio) == round(recording.duration_s * sr)
        assert np.array_equal(audio, moments.render(mixer, recording))
        for query in recording.queries:
            alone = np.concatenate(
                [
                    mixer.render_rows(
                        plan,
                        [
                            r
                            for r in range(plan.row_start[i], plan.row_start[i + 1])
                            if plan.is_event[r] and str(mixer.labels[plan.label[r]]) in query.labels
                        ],
                    )
                    for i in recording.mixtures
                ]
            ).astype(np.float64)
            inside = np.zeros(len(alone), dtype=bool)
            for onset, offset in query.spans:
                inside[round(onset * sr) : round(offset * sr)] = True
            assert np.square(alone[inside]).mean() > 1000 * np.square(alone[~inside]).mean(), query
            checked += 1
    assert checked >= 5


def test_label_queries_have_one_label_each(mixer, manifest):
    moments = moment_set(mixer, manifest, "test_seen", 2, seed=3, min_s=30.0, max_s=30.0, queries="label")
    for recording in moments.recordings:
        texts = [q.text for q in recording.queries]
        assert len(texts) == len(set(texts))
        assert all(q.labels == (q.text,) for q in recording.queries)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "val"}, "test clips only"),
        ({"n_recordings": 0}, "positive integer"),
        ({"min_s": 90.0, "max_s": 60.0}, "min_s <= max_s"),
        ({"min_s": 12.0, "max_s": 18.0}, "whole number of 10 s mixtures"),
        ({"queries": "tags"}, "'caption' or 'label'"),
    ],
)
def test_bad_set_arguments_are_refused(mixer, manifest, kwargs, message):
    args = {"split": "test_seen", "n_recordings": 1, "seed": 0} | kwargs
    with pytest.raises(ConfigError, match=message):
        moment_set(mixer, manifest, **args)


# --- the whole path -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def detector(smoke_models):
    return FlamDetector.from_dir(smoke_models / "flam")


def oracle(audio, query):
    return [(onset, offset, 1.0) for onset, offset in query.spans]


def decoy_first(audio, query):
    """The right spans, ranked below a wrong one (the first a minute later)."""
    onset, offset = query.spans[0]
    return [(onset + 60.0, offset + 60.0, 1.0)] + [(a, b, 0.5) for a, b in query.spans]


def garbage(audio, query):
    return [(onset + 60.0, offset + 60.0, 1.0) for onset, offset in query.spans]


@pytest.mark.slow
def test_flam_search_figures_on_long_recordings_and_the_references(
    detector, smoke_library, smoke_recipes, tmp_path
):
    library, _ = smoke_library
    recipes, _ = smoke_recipes
    args = {"n_recordings": 3, "seed": 0, "min_s": 60.0, "max_s": 60.0}
    flam = moment_retrieval(detector, library, recipes, work_dir=tmp_path / "work", **args)
    assert flam["ranker"] == "flam search" and flam["model"] == str(detector.source)
    assert set(flam["splits"]) == {"test_unseen", "test_seen"}
    for figures in flam["splits"].values():
        assert figures["n_recordings"] == 3 and figures["n_queries"] > 3 and figures["audio_s"] == 180.0
        for key in ("r1@0.5", "r1@0.7", "map", "map@0.5", "map@0.75"):
            assert 0.0 <= figures[key] <= 1.0
        assert figures["r1@0.7"] <= figures["r1@0.5"] and figures["map@0.75"] <= figures["map@0.5"]
        assert figures["predictions_per_query"] > 0  # search always answers
    json.dumps(flam)

    # the figures are those of `search` over an index of each recording alone
    audio = tmp_path / "work" / "audio" / "test_unseen" / "test_unseen-000" / "test_unseen-000.wav"
    hits = search(
        SearchIndex.open(tmp_path / "work" / "index" / "test_unseen-000"), detector, "a dog barking"
    )
    assert hits and {h["file"] for h in hits} == {audio.name}
    ranker = SearchRanker(detector, tmp_path / "work" / "index", top=10)
    query = MomentQuery("a dog barking", (), ((0.0, 1.0),))
    assert ranker(audio, query) == [(h["onset"], h["offset"], h["score"]) for h in hits]

    # the same recordings through the same path: the truth scores 1, rankings that bury or
    # miss it score lower, and the frame grid's ceiling lies between
    perfect = moment_retrieval(detector, library, recipes, ranker=oracle, **args)
    buried = moment_retrieval(detector, library, recipes, ranker=decoy_first, **args)
    wrong = moment_retrieval(detector, library, recipes, ranker=garbage, **args)
    grid = moment_retrieval(detector, library, recipes, ranker=grid_oracle(detector.frame_hop_s), **args)
    for split in ("test_unseen", "test_seen"):
        p, b, w, g = (m["splits"][split] for m in (perfect, buried, wrong, grid))
        assert p["n_queries"] == flam["splits"][split]["n_queries"]
        assert p["r1@0.5"] == p["r1@0.7"] == p["map"] == 1.0
        assert b["r1@0.5"] == 0.0 and 0.0 < b["map"] < p["map"]
        assert w["r1@0.5"] == w["map"] == 0.0
        assert 0.0 < g["map"] <= p["map"] and g["r1@0.5"] > 0.5
    table = moments_markdown([flam, grid])
    unseen_rows = [line for line in table.splitlines() if "| test_unseen (held-out labels) |" in line]
    assert [row.split(" | ")[0] for row in unseen_rows] == [f"| {flam['system']}", f"| {grid['system']}"]
    assert flam["command"] in table and flam["system"] in table
    other_seed = moment_retrieval(detector, library, recipes, ranker=oracle, **(args | {"seed": 1}))
    with pytest.raises(DataError, match="other recordings"):
        moments_markdown([flam, other_seed])


@pytest.mark.slow
def test_an_index_left_by_an_earlier_run_is_brought_up_to_date(detector, mixer, manifest, tmp_path):
    for seed in (7, 8):  # the second set is written over the first, under the same names
        moments = moment_set(mixer, manifest, "test_seen", 1, seed=seed, min_s=30.0, max_s=30.0)
        files = write_moment_set(moments, mixer, tmp_path / "audio")
        query = moments.queries[0]
        reused = SearchRanker(detector, tmp_path / "index")(files["test_seen-000"], query)
    fresh = SearchRanker(detector, tmp_path / "fresh")(files["test_seen-000"], query)
    assert reused == fresh


def test_a_library_other_than_the_recipes_one_is_refused(smoke_library, smoke_recipes, tmp_path):
    library, _ = smoke_library
    recipes, _ = smoke_recipes
    copy = tmp_path / "recipes"
    copy.mkdir()
    summary = json.loads((recipes / "summary.json").read_text()) | {"sources_manifest_hash": "0" * 64}
    (copy / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(DataError, match="another source library"):
        moment_retrieval("unused-model", library, copy)
