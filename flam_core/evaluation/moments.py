"""Audio moment retrieval on long recordings: `flam search`'s ranked spans, scored as moment
retrieval benchmarks score them.

Task. A query is a text and one recording (1-5 minutes); the answer is a ranked list of
`(onset, offset, score)` spans of that recording. Its ground truth is every span in which the
described sound is heard (one or more).

Metrics, with the conventions of Moment-DETR's `standard_eval` (Lighthouse, which covers audio
moment retrieval, evaluates with the same code), as fractions in [0, 1] rather than percentages:

- R1@0.5, R1@0.7: the share of queries whose top-1 span has a temporal IoU of at least 0.5
  (0.7) with some ground-truth span of the query.
- mAP: the mean over IoU thresholds 0.5, 0.55, ..., 0.95 of the mean over queries of the average
  precision of each query's ranked spans (ActivityNet's detection AP, one query at a time:
  spans in rank order, each a true positive when its best-overlapping ground-truth span not yet
  taken reaches the threshold; precision made monotone from the right and summed over the
  recall steps, recall counted against all of the query's ground-truth spans). `map@0.5` and
  `map@0.75` are two of its terms.

The ranking is by score, highest first; equal scores keep the order the spans were given in
(`flam search` gives them best first), so a tie never depends on the sort's whims. Only the
`MAX_PREDICTIONS` (10) best spans count, as in Moment-DETR, or as many as the query has
ground-truth spans when that is more: a long recording can hold a sound more than ten times,
and a perfect answer should still score 1 (with at most ten spans, Moment-DETR's figure). A
query without any prediction counts, with IoU 0 and AP 0 (Moment-DETR's script drops such
queries instead).

Benchmark set. Recordings are made by the `Mixer` from the source clips of a test split only
(`test_unseen`: the held-out labels, never trained on; `test_seen`: training labels in clips
never trained on): the recipe sampler (`sample_chunk`, with the `synth` parameters) draws
`mixture_s`-long mixtures from `ClipPool.for_split`, and a recording of 1-5 minutes is several
consecutive mixtures concatenated. The Mixer renders fixed-length mixtures, so concatenation is
how a recording gets long; the ground truth of mixture k is the Mixer's exact times shifted by
its start, `k * mixture_s`, so no span is approximate. A moment is one placed sound: a recipe
piece from the start of its first active span to the end of its last (`Mixer.pieces`; a clip's
short silences stay inside its moment, where `Mixer.events` would cut it into active spans), and
moments of one label that overlap or touch are one. An event never crosses a mixture boundary;
a sound that ends at one and starts again at the next becomes one moment. Every mixture of a
recording plays the same background clip, each from where the previous one stopped (its looped
offset advanced by `mixture_s`), so the bed is continuous. Everything follows from the seed.

Queries: by default one per distinct event caption of a recording. Its ground truth is every
span of every event label in the recording that the caption describes, i.e. whose captions in
the source library include it: a caption shared by two labels ("a computer voice speaking
german" for a male and a female voice) is answered by both, and another caption of the same
sound is not a false positive. With `queries="label"`, one query per event label, the label as
its text. The recording's background label is not queried, nor a caption of it (the bed sounds
throughout), nor a text whose labels have no active span in the recording.

Scoring. Each recording is indexed on its own with `build_index` and each of its queries
answered by `search` at the model's calibrated threshold, its best `SEARCH_TOP` segments
(more than any query has moments, so that only the metric's cutoff applies): exactly the
spans `flam index` and `flam search` give for a folder holding that one recording.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import soundfile as sf

from flam_core.errors import ConfigError, DataError
from flam_core.utils import atomic_dir, atomic_write_text, stable_seed

if TYPE_CHECKING:
    from flam_core.config import Params
    from flam_core.data.mixer import Mixer, MixPlan
    from flam_core.inference import FlamDetector

IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))  # 0.5:0.05:0.95
R1_THRESHOLDS: tuple[float, ...] = (0.5, 0.7)
MAX_PREDICTIONS = 10  # ranked spans per query that count at least (Moment-DETR's max_pred_windows)
SEARCH_TOP = 100  # segments asked of `search` per query
MOMENT_SPLITS = ("test_unseen", "test_seen")
SPLIT_NOTES = {"test_unseen": "held-out labels", "test_seen": "training labels, unseen clips"}
QueryKind = Literal["caption", "label"]
Span = tuple[float, float]
Prediction = tuple[float, float, float]  # onset, offset, score


# --- metrics -------------------------------------------------------------------------------------
def temporal_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`[N, 2]` x `[M, 2]` spans (onset, offset; offset > onset) -> `[N, M]` intersection over union."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1, 2), np.asarray(b, dtype=np.float64).reshape(-1, 2)
    inter = np.clip(
        np.minimum(a[:, None, 1], b[None, :, 1]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None
    )
    union = (a[:, None, 1] - a[:, None, 0]) + (b[None, :, 1] - b[None, :, 0]) - inter
    return inter / union


def _as_rows(what: str, rows: Any, width: int) -> np.ndarray:
    try:
        array = np.asarray(rows, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{what} must be a list of {width}-number rows ({exc})") from None
    if array.size == 0:
        return np.zeros((0, width))
    if array.ndim != 2 or array.shape[1] != width:
        raise DataError(f"{what} must be rows of {width} numbers, got an array of shape {array.shape}")
    bad = ~np.isfinite(array).all(axis=1)
    if bad.any():
        raise DataError(f"{what} holds NaN or infinite values, first at row {int(np.flatnonzero(bad)[0])}")
    return array


def _check_spans(what: str, spans: np.ndarray) -> None:
    """Spans start at or after 0 and last a positive time (IoU needs a positive union)."""
    bad = (spans[:, 0] < 0) | (spans[:, 1] <= spans[:, 0])
    if bad.any():
        onset, offset = spans[np.flatnonzero(bad)[0], :2]
        raise DataError(
            f"{what}: span ({onset:g}, {offset:g}) is not a time span; an onset is >= 0 and its offset "
            "after it"
        )


def average_precision(
    truth: np.ndarray, ranked: np.ndarray, thresholds: Sequence[float] = IOU_THRESHOLDS
) -> np.ndarray:
    """AP of ranked spans `[N, 2]` (best first) against one query's ground truth `[M, 2]`, per
    IoU threshold (`[len(thresholds)]`). See the module docstring for the matching rule."""
    ap = np.zeros(len(thresholds))
    if len(ranked) == 0:
        return ap
    iou = temporal_iou(ranked, truth)
    best_first = np.argsort(-iou, axis=1, kind="stable")
    for t, threshold in enumerate(thresholds):
        taken = np.zeros(len(truth), dtype=bool)
        hit = np.zeros(len(ranked), dtype=bool)
        for i, candidates in enumerate(best_first):
            for j in candidates:
                if iou[i, j] < threshold:
                    break
                if not taken[j]:
                    taken[j] = hit[i] = True
                    break
        found = np.cumsum(hit)
        precision = found / np.arange(1, len(ranked) + 1)
        envelope = np.maximum.accumulate(precision[::-1])[::-1]  # best precision at this recall or more
        recall_step = np.diff(found, prepend=0) / len(truth)
        ap[t] = float(np.sum(recall_step * envelope))
    return ap


def moment_metrics(
    truth: Sequence[Sequence[Span]],
    predictions: Sequence[Sequence[Prediction]],
    max_predictions: int = MAX_PREDICTIONS,
) -> dict[str, Any]:
    """R1@0.5, R1@0.7 and mAP (IoU 0.5:0.05:0.95) of ranked predictions; see the module docstring.

    `truth[q]`: query q's ground-truth `(onset, offset)` spans, at least one; `predictions[q]`:
    its predicted `(onset, offset, score)` spans in any order (ranked here by score, ties kept in
    the given order), possibly none; the best `max(max_predictions, len(truth[q]))` count.
    Returns `r1@0.5`, `r1@0.7`, `map`, `map@0.5`, `map@0.75`, `map_by_iou` and `n_queries`.
    """
    if isinstance(max_predictions, bool) or not isinstance(max_predictions, int) or max_predictions < 1:
        raise DataError(f"max_predictions must be a positive integer, got {max_predictions!r}")
    if len(truth) != len(predictions):
        raise DataError(
            f"{len(truth)} queries have ground truth but {len(predictions)} have predictions: one "
            "list of predictions per query, in the same order (an empty list for no answer)"
        )
    if not len(truth):
        raise DataError("no query to score")
    ap = np.zeros((len(truth), len(IOU_THRESHOLDS)))
    top_iou = np.zeros(len(truth))
    for q, (spans, predicted) in enumerate(zip(truth, predictions, strict=True)):
        gt = _as_rows(f"query {q}: ground truth", spans, 2)
        if not len(gt):
            raise DataError(f"query {q} has no ground-truth span: leave queries without one out")
        _check_spans(f"query {q}: ground truth", gt)
        rows = _as_rows(f"query {q}: predictions", predicted, 3)
        _check_spans(f"query {q}: predictions", rows)
        ranked = rows[np.argsort(-rows[:, 2], kind="stable")[: max(max_predictions, len(gt))], :2]
        ap[q] = average_precision(gt, ranked)
        if len(ranked):
            top_iou[q] = temporal_iou(ranked[:1], gt).max()
    per_threshold = ap.mean(axis=0)
    return {
        **{f"r1@{t:g}": float(np.mean(top_iou >= t)) for t in R1_THRESHOLDS},
        "map": float(per_threshold.mean()),
        "map@0.5": float(per_threshold[IOU_THRESHOLDS.index(0.5)]),
        "map@0.75": float(per_threshold[IOU_THRESHOLDS.index(0.75)]),
        "map_by_iou": {f"{t:g}": float(v) for t, v in zip(IOU_THRESHOLDS, per_threshold, strict=True)},
        "n_queries": len(truth),
    }


# --- benchmark set -------------------------------------------------------------------------------
@dataclass(frozen=True)
class MomentQuery:
    """One query of one recording: its text and the spans where what it describes is heard."""

    text: str
    labels: tuple[str, ...]  # the recording's event labels the text describes
    spans: tuple[Span, ...]  # every span of those labels in the recording, merged, by onset


@dataclass(frozen=True)
class Recording:
    name: str  # file stem, "<split>-<nnn>"
    split: str
    mixtures: tuple[int, ...]  # the plan's mixtures, in playing order, one per `mixture_s`
    duration_s: float
    background: str  # the clip playing under the whole recording
    background_label: str
    queries: tuple[MomentQuery, ...]


@dataclass(frozen=True)
class MomentSet:
    """Long recordings of one test split, as a Mixer plan and the queries of each recording."""

    split: str
    seed: int
    plan: MixPlan
    recordings: tuple[Recording, ...]

    @property
    def queries(self) -> list[MomentQuery]:
        return [q for r in self.recordings for q in r.queries]

    def render(self, mixer: Mixer, recording: Recording) -> np.ndarray:
        """The recording's samples: its mixtures rendered by the Mixer, end to end (float32)."""
        return np.concatenate([mixer.render(self.plan, i) for i in recording.mixtures])


def moment_set(
    mixer: Mixer,
    manifest: pd.DataFrame,
    split: str,
    n_recordings: int,
    seed: int,
    min_s: float = 60.0,
    max_s: float = 300.0,
    queries: QueryKind = "caption",
) -> MomentSet:
    """`n_recordings` recordings of `min_s`-`max_s` seconds (whole mixtures) from the clips of a
    test split, with their queries; see the module docstring. The same arguments give the same
    set (and, rendered, the same samples)."""
    from flam_core.data.recipes import ClipPool, sample_chunk
    from flam_core.data.recordings import continuous_backgrounds, merge_spans, mixtures_per_recording

    if split not in MOMENT_SPLITS:
        raise ConfigError(
            "moment retrieval draws on test clips only: split must be one of "
            f"{list(MOMENT_SPLITS)}, got {split!r}"
        )
    if queries not in ("caption", "label"):
        raise ConfigError(f"queries must be 'caption' or 'label', got {queries!r}")
    synth = mixer.synth
    rng = np.random.default_rng(stable_seed(seed, split, "moments"))
    n_mixtures = mixtures_per_recording(rng, n_recordings, synth.mixture_s, min_s, max_s)
    pool = ClipPool.for_split(manifest, split)
    table = sample_chunk(pool, synth, int(n_mixtures.sum()), 0, stable_seed(seed, split, "moment-recipes"))
    recipes = table.to_pandas()
    backgrounds = continuous_backgrounds(recipes, mixer, pool, n_mixtures, rng)
    plan = mixer.plan(recipes)
    label_captions: dict[str, set[str]] = {}
    for label, captions in zip(manifest["label"], manifest["captions"], strict=True):
        label_captions.setdefault(str(label), set()).update(map(str, captions))
    recordings = []
    first = 0
    for r, (n, (clip, background_label)) in enumerate(zip(n_mixtures.tolist(), backgrounds, strict=True)):
        mixtures = tuple(range(first, first + n))
        first += n
        spans: dict[str, list[Span]] = {}  # label -> where its pieces sound
        texts: dict[str, None] = {}  # captions (or labels) in order of first onset
        for k, i in enumerate(mixtures):
            shift = k * synth.mixture_s
            for onset, offset, row in mixer.pieces(plan, i):
                label = str(mixer.labels[plan.label[row]])
                if not plan.is_event[row] or label == background_label:
                    continue
                spans.setdefault(label, []).append((onset + shift, offset + shift))
                texts.setdefault(mixer.texts[plan.text[row]] if queries == "caption" else label)
        found = []
        for text in texts:
            if queries == "label":
                labels = (text,) if text in spans else ()
            elif text in label_captions.get(background_label, ()):
                continue  # the text describes the bed too, which sounds throughout
            else:
                labels = tuple(sorted(lab for lab in spans if text in label_captions.get(lab, ())))
            truth = tuple(merge_spans(s for lab in labels for s in spans[lab]))
            if truth:
                found.append(MomentQuery(text=text, labels=labels, spans=truth))
        recordings.append(
            Recording(
                name=f"{split}-{r:03d}",
                split=split,
                mixtures=mixtures,
                duration_s=n * synth.mixture_s,
                background=clip,
                background_label=background_label,
                queries=tuple(found),
            )
        )
    return MomentSet(split=split, seed=seed, plan=plan, recordings=tuple(recordings))


def write_moment_set(moments: MomentSet, mixer: Mixer, out_dir: Path) -> dict[str, Path]:
    """Render every recording to `<out_dir>/<name>/<name>.wav` (float32 WAV at the Mixer's rate:
    the samples exactly) beside `moments.json` (recordings, queries, ground truth). Returns each
    recording's file. The folder appears complete or not at all."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as staging:
        for recording in moments.recordings:
            folder = staging / recording.name
            folder.mkdir()
            sf.write(
                folder / f"{recording.name}.wav", moments.render(mixer, recording), mixer.sample_rate, "FLOAT"
            )
        description = {
            "split": moments.split,
            "seed": moments.seed,
            "recordings": [
                {
                    "name": r.name,
                    "duration_s": r.duration_s,
                    "background": r.background,
                    "background_label": r.background_label,
                    "queries": [
                        {"text": q.text, "labels": list(q.labels), "spans": [list(s) for s in q.spans]}
                        for q in r.queries
                    ],
                }
                for r in moments.recordings
            ],
        }
        atomic_write_text(staging / "moments.json", json.dumps(description, indent=2))
    return {r.name: out_dir / r.name / f"{r.name}.wav" for r in moments.recordings}


# --- scoring -------------------------------------------------------------------------------------
Ranker = Callable[[Path, MomentQuery], Sequence[Prediction]]


class SearchRanker:
    """`flam search`'s ranked spans: each recording indexed on its own (`build_index`, as
    `flam index` does for a folder holding only that file) and each query answered by `search`
    over that index, at the detector's calibrated threshold, its `top` best segments. An index
    left in `index_root` by an earlier run is brought up to date, as `flam index` does (a
    recording written again is embedded again)."""

    def __init__(self, detector: FlamDetector, index_root: Path, top: int = SEARCH_TOP) -> None:
        self.detector, self.root, self.top = detector, Path(index_root), top
        self._open: tuple[Path, Any] | None = None  # one index at a time: recordings come in order
        self._indexed: set[Path] = set()

    def _index(self, audio: Path) -> Any:
        from flam_core.search import SearchIndex, build_index

        if self._open is None or self._open[0] != audio:
            folder = self.root / audio.stem
            if audio not in self._indexed:
                build_index(audio.parent, folder, self.detector, progress=False)
                self._indexed.add(audio)
            self._open = (audio, SearchIndex.open(folder))
        return self._open[1]

    def __call__(self, audio: Path, query: MomentQuery) -> list[Prediction]:
        from flam_core.search import search

        hits = search(self._index(audio), self.detector, query.text, top=self.top)
        strays = {h["file"] for h in hits} - {audio.name}
        if strays:
            raise DataError(f"the index of {audio.name} answered with other files: {sorted(strays)}")
        return [(h["onset"], h["offset"], h["score"]) for h in hits]


def grid_oracle(hop_s: float) -> Ranker:
    """The ground truth as a frame-grid detector could give it: each span replaced by the grid
    span (boundaries multiples of `hop_s`) with the highest IoU, all scored 1, in time order.
    What a perfect model reaches when its segments are runs of whole frames (a span much shorter
    than a frame cannot reach IoU 0.5): the ceiling beside a model's figures."""
    if not (isinstance(hop_s, int | float) and math.isfinite(hop_s) and hop_s > 0):
        raise ConfigError(f"the frame hop must be a positive number of seconds, got {hop_s!r}")

    def rank(audio: Path, query: MomentQuery) -> list[Prediction]:
        out = []
        for onset, offset in query.spans:
            starts = {math.floor(onset / hop_s) * hop_s, math.ceil(onset / hop_s) * hop_s}
            ends = {math.floor(offset / hop_s) * hop_s, math.ceil(offset / hop_s) * hop_s}
            options = np.array([(a, b) for a in starts for b in ends if b > a])
            best = options[np.argmax(temporal_iou(options, [(onset, offset)])[:, 0])]
            out.append((float(best[0]), float(best[1]), 1.0))
        return out

    rank.__name__ = f"ground truth on a {hop_s:g} s grid"
    return rank


def score_moment_set(moments: MomentSet, audio: dict[str, Path], ranker: Ranker) -> dict[str, Any]:
    """`moment_metrics` of `ranker`'s answers to every query of a set (rounded to 4 decimals),
    with the set's size: recordings, queries, ground-truth spans, audio seconds, wall seconds."""
    started = time.perf_counter()
    truth, predictions = [], []
    for recording in moments.recordings:
        for query in recording.queries:
            truth.append(query.spans)
            predictions.append(list(ranker(audio[recording.name], query)))
    if not truth:
        raise DataError(f"the {moments.split} recordings have no query: draw more recordings")
    metrics = moment_metrics(truth, predictions)
    rounded = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
    rounded["map_by_iou"] = {k: round(v, 4) for k, v in metrics["map_by_iou"].items()}
    return rounded | {
        "n_recordings": len(moments.recordings),
        "n_spans": sum(len(s) for s in truth),
        "predictions_per_query": round(float(np.mean([len(p) for p in predictions])), 2),
        "audio_s": round(sum(r.duration_s for r in moments.recordings), 1),
        "seconds": round(time.perf_counter() - started, 1),
    }


def _check_library(library_dir: Path, recipes_dir: Path) -> None:
    """The recipes (the model's training data) were sampled from this library, so its test clips
    are clips the model never trained on."""
    summaries = {}
    for folder, what in ((library_dir, "source library"), (recipes_dir, "recipes")):
        path = folder / "summary.json"
        if not path.is_file():
            raise DataError(f"{what} summary not found: {path}")
        summaries[what] = json.loads(path.read_text())
    if summaries["recipes"].get("sources_manifest_hash") != summaries["source library"].get("manifest_hash"):
        raise DataError(
            f"the recipes in {recipes_dir} were sampled from another source library than {library_dir}: "
            "its test clips may be clips the model was trained on. Use the library the recipes came from"
        )


def moment_retrieval(
    detector_or_model_dir: FlamDetector | Path | str,
    library_dir: Path | str,
    recipes_dir: Path | str,
    params: Params | None = None,
    n_recordings: int = 10,
    seed: int = 0,
    min_s: float = 60.0,
    max_s: float = 300.0,
    splits: Sequence[str] = MOMENT_SPLITS,
    queries: QueryKind = "caption",
    top: int = SEARCH_TOP,
    ranker: Ranker | None = None,
    work_dir: Path | str | None = None,
    system: str | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Moment retrieval of a FLAM model on `n_recordings` long recordings per test split.

    `params` (default: the model's own) give the mixtures (`synth`) and the sample rate; the
    library is the one `recipes_dir`'s recipes, the model's training data, were sampled from.
    `ranker` scores another ranking of the same recordings through the same path (a baseline, or
    the ground truth as a check); by default `SearchRanker`. Recordings and indexes go to
    `work_dir` (default: a temporary folder, removed afterwards). Returns the figures per split
    under `splits` with what produced them; `moments_markdown` makes the table.
    """
    from flam_core.data.mixer import Mixer
    from flam_core.data.sources import load_manifest
    from flam_core.inference import FlamDetector

    library_dir, recipes_dir = Path(library_dir), Path(recipes_dir)
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ConfigError(f"top must be a positive integer, got {top!r}")
    unknown = [s for s in splits if s not in MOMENT_SPLITS]
    if unknown or not splits:
        raise ConfigError(f"splits must be among {list(MOMENT_SPLITS)}, got {list(splits)}")
    _check_library(library_dir, recipes_dir)
    if isinstance(detector_or_model_dir, str | Path):
        detector = FlamDetector.from_dir(detector_or_model_dir)
    else:
        detector = detector_or_model_dir
    params = params or detector.params
    mixer = Mixer.for_library(params, library_dir)
    manifest = load_manifest(library_dir)
    sets = [moment_set(mixer, manifest, s, n_recordings, seed, min_s, max_s, queries) for s in splits]
    scratch = None if work_dir is not None else tempfile.mkdtemp(prefix="flam-moments-")
    work = Path(work_dir) if work_dir is not None else Path(str(scratch))
    try:
        rank = ranker or SearchRanker(detector, work / "index", top)
        results = {}
        for moments in sets:
            audio = write_moment_set(moments, mixer, work / "audio" / moments.split)
            results[moments.split] = score_moment_set(moments, audio, rank)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    lengths = "" if (min_s, max_s) == (60.0, 300.0) else f" --min-s {min_s:g} --max-s {max_s:g}"
    return {
        "system": system or f"FLAM ({detector.source})",
        "model": str(detector.source),
        "ranker": "flam search" if ranker is None else getattr(ranker, "__name__", type(ranker).__name__),
        "threshold": detector.threshold,
        "calibrated": bool(detector.calibration),
        "seed": seed,
        "n_recordings": n_recordings,
        "recording_s": [min_s, max_s],
        "mixture_s": params.synth.mixture_s,
        "queries": queries,
        "top": top,
        "iou_thresholds": list(IOU_THRESHOLDS),
        "splits": results,
        "command": command
        or (
            f"python bench/bench_moments.py --model {detector.source} --library {library_dir} "
            f"--recipes {recipes_dir} --n {n_recordings} --seed {seed}{lengths}"
            + ("" if queries == "caption" else f" --queries {queries}")
        ),
    }


def moments_markdown(metrics: dict[str, Any] | Sequence[dict[str, Any]]) -> str:
    """`moment_retrieval` figures as a Markdown section: one row per system and split, then the
    command. Several systems (e.g. FLAM and the `grid_oracle` ceiling) share one table; they
    must have been scored on the same recordings (same seed, number, lengths and queries)."""
    systems = [metrics] if isinstance(metrics, dict) else list(metrics)
    if not systems:
        raise DataError("no moment retrieval figures to show")
    first = systems[0]
    keys = ("seed", "n_recordings", "recording_s", "mixture_s", "queries")
    for other in systems[1:]:
        differ = [k for k in keys if other[k] != first[k]]
        if differ:
            raise DataError(
                f"{other['system']} was scored on other recordings than {first['system']} "
                f"({', '.join(differ)} differ): one table holds one set of recordings"
            )
    low, high = first["recording_s"]
    lengths = f"{low:g} s" if low == high else f"{low:g}-{high:g} s"
    flam = [m for m in systems if m["ranker"] == "flam search"]
    threshold = (
        f" at the model's threshold ({'calibrated' if flam[0]['calibrated'] else 'not calibrated'}: "
        f"{flam[0]['threshold']:g})"
        if flam
        else ""
    )
    lines = [
        "## Moment retrieval on long recordings",
        "",
        f"Each query is a {first['queries']} of the events of one recording of {lengths} (test clips "
        f"only: {first['mixture_s']:g} s mixtures end to end over one continuous background; "
        f"seed {first['seed']}), answered with the recording's ranked spans: `flam search` over an "
        f"index of that recording{threshold}. R1@t: the top span has IoU >= t with a ground-truth "
        f"span; mAP: average precision over IoU 0.5:0.05:0.95 of the best {MAX_PREDICTIONS} spans "
        "(more for a query with more ground-truth spans), Moment-DETR's convention.",
        "",
        "| system | split | R1@0.5 | R1@0.7 | mAP@0.5 | mAP | recordings | queries |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in systems:
        for split, r in m["splits"].items():
            lines.append(
                f"| {m['system']} | {split} ({SPLIT_NOTES.get(split, split)}) | {r['r1@0.5']:.3f} "
                f"| {r['r1@0.7']:.3f} | {r['map@0.5']:.3f} | {r['map']:.3f} | {r['n_recordings']} "
                f"| {r['n_queries']} |"
            )
    lines += ["", "Reproduce with:", "", "```bash", first["command"], "```", ""]
    return "\n".join(lines)
