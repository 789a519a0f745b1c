"""`results.md`, the evaluation's tables, rendered from synthetic metrics and compared byte for byte
with golden files: every optional part (the ground-truth frame label PSDS rows, the claims, the
PSDS1 shortfall paragraph with and without the ground-truth sentence) in one case or another.

The numbers differ from cell to cell at three decimals, so a value in the wrong column or row shows in the
comparison. The goldens fix the report's content; a change to it regenerates them with
`FLAM_REGENERATE_GOLDEN=1 pytest tests/test_results_markdown.py` and shows in the diff.
"""

from __future__ import annotations

import copy
import os
from itertools import count
from typing import Any

import jinja2
import pytest

from flam_core.config import Params, load_params
from flam_core.evaluation.report import results_markdown
from tests.conftest import ROOT

GOLDEN = ROOT / "tests" / "fixtures" / "results_md"
SPLITS = ("test_unseen", "test_seen")
# The parameters the report prints, fixed here so that the goldens do not follow params.yaml.
PINNED = ("train.steps=1234", "synth.mixture_s=10.0", "frames.n_frames=40")


class _Numbers:
    """Values in [0, 0.97): consecutive ones differ by 0.0137, so neighbouring cells never agree at `.3f`."""

    def __init__(self, start: int) -> None:
        self._next = count(start)

    def __call__(self) -> float:
        return round((0.0213 + 0.0137 * next(self._next)) % 0.97, 4)


def _sed(value: _Numbers, threshold: float, labels: list[str], reverse: bool) -> dict[str, Any]:
    out: dict[str, Any] = {key: value() for key in ("frame_auroc_macro", "frame_auroc_micro")}
    # FLAM takes the labels in order, FLAM-Global in reverse: FLAM's per-label gains all differ
    out["frame_auroc_per_label"] = {label: value() for label in (labels[::-1] if reverse else labels)}
    out |= {key: value() for key in ("clip_auroc_macro", "within_clip_auroc_macro")}
    for n in (1, 2):
        for key in (f"psds{n}", f"psds{n}_alpha_st0", f"psds{n}_class_mean", f"psds{n}_class_std"):
            out[key] = value()
    out |= {key: value() for key in ("event_f1_macro", "segment_f1_macro", "segment_f1_macro_at_0.5")}
    return out | {"threshold": threshold, "n_labels": len(labels), "n_mixtures": 12}


def _metrics(
    modes: tuple[str, ...],
    *,
    targets: bool,
    claims: tuple[float, float] | None,
    flam_unseen_psds1: float | None = None,
    real: bool = False,
    normalised: bool = False,
) -> dict[str, Any]:
    """A metrics dict shaped as `evaluate` writes it, every key `results_markdown` reads; `claims`:
    None (no claims) or the unseen AUROC gain and the relative R@5 (the figures with targets)."""
    value = _Numbers(len(modes) + 3 * targets + 5 * (claims is not None))
    unseen = ["dog bark", "siren", "glass breaking", "cat meow"]
    seen = ["speech", "music"]
    models: dict[str, Any] = {}
    for k, mode in enumerate(modes):
        entry: dict[str, Any] = {"threshold_source": "calibration" if mode == "flam" else "validation"}
        entry["test_unseen"] = _sed(value, 0.35 + 0.05 * k, unseen, k % 2 == 1)
        entry["test_seen"] = _sed(value, 0.5 + 0.01 * k, seen, k % 2 == 1)
        if mode == "flam":
            entry["test_unseen_approximate"] = _sed(value, 0.35, unseen, True)
            entry["test_seen_approximate"] = _sed(value, 0.5, seen, True)
            if normalised:  # a calibration that normalises: the head's unbiased score beside it
                entry["test_unseen_unbiased"] = _sed(value, 0.35, unseen, True)
                entry["test_seen_unbiased"] = _sed(value, 0.5, seen, True)
        entry["retrieval"] = {
            f"{d}_{key}": value() for d in ("t2a", "a2t") for key in ("R@1", "R@5", "R@10", "mAP@10")
        } | {"n_pairs": 48}
        # zero-shot: both parts, one of them (a library without two unseen classes), or none
        zero_shot = {"seen": {"top1": value(), "n_clips": 30 + k, "n_classes": 6}}
        if k % 3 == 0:
            zero_shot["unseen"] = {"top1": value(), "n_clips": 20 + k, "n_classes": 4}
        models[mode] = entry | {"zero_shot": zero_shot if k % 3 != 2 else {}}
    if flam_unseen_psds1 is not None:
        models["flam"]["test_unseen"]["psds1"] = flam_unseen_psds1
    metrics: dict[str, Any] = {
        "models": models,
        "gate": {},
        "test_set_hash": "0123456789ab-ba9876543210",
        "claims": {},
    }
    if claims is not None:
        flam, glob = models["flam"], models["global"]
        metrics["claims"] = {
            "unseen_auroc_gain": claims[0],
            "unseen_auroc_gain_target": 0.10,
            "unseen_auroc_gain_ci95_low": -0.0871,
            "unseen_auroc_gain_ci95_high": 0.1629,
            "unseen_auroc_labels_better": 3,
            "unseen_auroc_labels": len(unseen),
            "unseen_clip_auroc_gain": -0.0412,
            "unseen_within_clip_auroc_gain": 0.0957,
            "unseen_psds1_gain": round(flam["test_unseen"]["psds1"] - glob["test_unseen"]["psds1"], 4),
            "seen_psds1_gain": -0.0233,
            "unseen_psds1_alpha_st0_gain": 0.0318,
            "seen_psds1_alpha_st0_gain": -0.0046,
            "retrieval_r5_relative": claims[1],
            "retrieval_r5_relative_target": 0.8,
        }
        if "mga_clap" in models:  # the paper's ordering: here FLAM > FLAM-Global > MGA-CLAP
            metrics["claims"] |= {
                "mga_clap_unseen_auroc_macro": 0.6123,
                "unseen_auroc_gain_over_mga_clap": 0.0712,
                "mga_clap_unseen_auroc_gain": -0.0139,
                "mga_clap_retrieval_r5_relative": 0.9456,
            }
    if real:
        metrics["test_real"] = _real(value, modes)
        metrics["moment_retrieval"] = _moments(value, modes)
        metrics["near_far"] = _near_far(value, modes)
    if targets:
        metrics["frame_label_psds"] = {
            split: {key: value() for key in ("psds1", "psds1_alpha_st0", "psds2", "psds2_alpha_st0")}
            for split in SPLITS
        }
    return metrics


def _real(value: _Numbers, modes: tuple[str, ...]) -> dict[str, Any]:
    """The real-recording test's block of metrics.json: the set, then each model."""
    labels = ["rain", "dog barking", "wind"]
    out: dict[str, Any] = {
        "set": {
            "recordings": 5,
            "recording_s": 150.0,
            "clips": 9,
            "prompts": len(labels),
            "ambiences": ["rain", "wind"],
            "sources": ["held-out-package"],
            "encodings": ["flac 44100 Hz mono", "wav 16000 Hz stereo"],
        }
    }
    for k, mode in enumerate(modes):
        per_label = {label: {"frame_auroc": value(), "event_found": value()} for label in labels}
        per_label["wind"]["frame_auroc"] = None if k == 0 else per_label["wind"]["frame_auroc"]
        recordings = {key: value() for key in ("frame_auroc_macro", "frame_auroc_pooled", "segment_f1_macro")}
        recordings |= {"event_found": None if k == 1 else value(), "false_alarm_rate": value()}
        zero_shot = {"top1": value(), "top5": value(), "n_clips": 9, "n_classes": len(labels)}
        out[mode] = {"recordings": recordings | {"per_label": per_label}, "zero_shot": zero_shot}
    return out


def _moments(value: _Numbers, modes: tuple[str, ...]) -> dict[str, Any]:
    """The moment-retrieval block of metrics.json: the set, then each system and the ceiling."""
    keys = ("r1@0.5", "r1@0.7", "map@0.5", "map")
    setting = {"recordings_per_split": 3, "recording_s": [60.0, 300.0], "seed": 0, "queries": "caption"}
    return {
        "set": setting | {"mixture_s": 10.0},
        "systems": {
            mode: {
                split: {key: value() for key in keys}
                | {"n_recordings": 3, "n_queries": 17 + k, "audio_s": 420.0}
                for split in SPLITS
            }
            for k, mode in enumerate((*modes, "ceiling"))
        },
    }


def _near_far(value: _Numbers, modes: tuple[str, ...]) -> dict[str, Any]:
    """The near/far block: test_unseen for every model, test_real without the last one."""
    out: dict[str, Any] = {"threshold": 0.7, "splits": {}}
    for split, ran in (("test_unseen", modes), ("test_real", modes[:-1])):
        out["splits"][split] = {
            "near": ["dog bark", "siren"],
            "far": ["glass breaking"],
            "nearest_class": {},
            "frame_auroc_macro": {
                m: {"near": value(), "far": None if k == 0 else value()} for k, m in enumerate(ran)
            },
        }
    return out


ALL_MODES = (
    "flam",
    "global",
    "mga_clap",
    "no_text_scale",
    "no_text_bias",
    "no_text_scale_bias",
    "no_prior_loss",
)
CASES = {
    # everything: every baseline and one the names table does not know, the ground-truth rows,
    # the claims with FLAM's unseen PSDS1 at zero (the shortfall paragraph, its ground-truth
    # sentence included); both targets missed; a profile other than the default
    "full": (
        ("smoke", *PINNED),
        _metrics(
            (*ALL_MODES, "extra_ablation"),
            targets=True,
            claims=(-0.1532, 0.7421),
            flam_unseen_psds1=0.0,
            normalised=True,
        ),
    ),
    # the claims with FLAM's unseen PSDS1 above zero (no shortfall paragraph), both targets met,
    # no ground-truth rows
    "claims_without_targets": (
        ("default", *PINNED),
        _metrics(ALL_MODES[:3], targets=False, claims=(0.1246, 1.0833)),
    ),
    # the shortfall paragraph without ground-truth figures to cite; the targets' edges
    "shortfall_without_targets": (
        ("default", *PINNED),
        _metrics(("flam", "global"), targets=False, claims=(0.0, 0.8), flam_unseen_psds1=0.0),
    ),
    # the real-recording test: a prompt without an AUROC, a model without an event-found rate
    "real_recordings": (
        ("default", *PINNED),
        _metrics(("flam", "global"), targets=False, claims=None, real=True),
    ),
    # the AudioSet classifier (frozen backbone, no training) as a row of every system table,
    # beside FLAM and FLAM-Global, with the claims and every real-recording part
    "audioset_baseline": (
        ("default", *PINNED),
        _metrics(("flam", "global", "audioset"), targets=False, claims=(0.0731, 0.9116), real=True),
    ),
    # FLAM alone: no claims, but the ground-truth rows
    "flam_only": (("default", *PINNED), _metrics(("flam",), targets=True, claims=None)),
    # MGA-CLAP beside FLAM and FLAM-Global: a row of every system table, the ordering claim
    "mga_clap": (
        ("default", *PINNED),
        _metrics(("flam", "global", "mga_clap"), targets=False, claims=(0.0843, 0.9731), real=True),
    ),
}


def _params(profile: str, *overrides: str) -> Params:
    return load_params(ROOT / "params.yaml", profile=profile, overrides=overrides)


@pytest.mark.parametrize("case", sorted(CASES))
def test_results_markdown_matches_golden(case: str) -> None:
    (profile, *overrides), metrics = CASES[case]
    text = results_markdown(metrics, _params(profile, *overrides))
    path = GOLDEN / f"{case}.md"
    if os.environ.get("FLAM_REGENERATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("utf-8"))
    assert text == path.read_bytes().decode("utf-8")


def test_cases_cover_the_optional_parts() -> None:
    """The goldens hold each optional part in one case and lack it in another."""
    texts = {case: (GOLDEN / f"{case}.md").read_text(encoding="utf-8") for case in CASES}
    ceiling = "| ground-truth frame labels (ceiling) |"
    claim = "## The claim, on this data"
    shortfall = "PSDS1 subtracts the spread of the true-positive rate over the labels"
    truth = "The ground-truth frame labels themselves reach"
    assert {c for c, t in texts.items() if ceiling in t} == {"full", "flam_only"}
    assert {c for c, t in texts.items() if claim in t} == set(CASES) - {"flam_only", "real_recordings"}
    real = {"real_recordings", "audioset_baseline", "mga_clap"}
    assert {c for c, t in texts.items() if "## Real recordings from held-out sources" in t} == real
    assert {c for c, t in texts.items() if "## Moment retrieval on long recordings" in t} == real
    assert {c for c, t in texts.items() if "## Held-out prompts near AudioSet" in t} == real
    assert {c for c, t in texts.items() if shortfall in t} == {"full", "shortfall_without_targets"}
    assert {c for c, t in texts.items() if truth in t} == {"full"}
    detector = "| cohort-normalised sigmoid(a (z + lambda beta) + b) (the detector) |"
    assert {c for c, t in texts.items() if detector in t} == {"full"}
    assert all(t.count("| unbiased p / (p + sigmoid(beta)) |") == 1 for t in texts.values())
    assert "# profile: smoke" in texts["full"] and "| extra_ablation |" in texts["full"]
    assert texts["full"].count("missed by") == 2 and texts["claims_without_targets"].count(": met") == 2
    assert "(target >= 0.80: met)" in texts["shortfall_without_targets"]


def test_the_audioset_classifier_is_a_row_of_every_system_table() -> None:
    """With the baseline in the metrics, its row follows the trained models' in every table of
    systems: SED AUROC, PSDS, thresholds, single-class PSDS, retrieval, zero-shot, real
    recordings, moment retrieval (one row per split), near/far, clip/within-clip; and it is a
    column of the per-prompt table of the recordings. Metrics without it give no such row."""
    name = "AudioSet classifier (frozen backbone, no training)"
    texts = {case: (GOLDEN / f"{case}.md").read_text(encoding="utf-8") for case in CASES}
    assert {c for c, t in texts.items() if name in t} == {"audioset_baseline"}
    lines = texts["audioset_baseline"].splitlines()
    rows = [k for k, line in enumerate(lines) if line.startswith(f"| {name} |")]
    assert len(rows) == 11
    before = [lines[k - 1].split(" | ")[0] for k in rows]
    assert before == ["| FLAM-Global"] * 7 + ["| FLAM-Global", f"| {name}"] + ["| FLAM-Global"] * 2
    assert f"| prompt | FLAM | FLAM-Global | {name} |" in lines
    # The claims compare FLAM with FLAM-Global only: the baseline is no column of their prompt table.
    assert "| prompt | FLAM | FLAM-Global | gain |" in lines


def test_rows_follow_the_models_and_prompts_order() -> None:
    """Model rows in the order of `metrics['models']`; held-out prompts by FLAM's gain, largest first."""
    _, metrics = CASES["full"]
    text = results_markdown(metrics, _params("smoke", *PINNED))
    rows = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| FLAM")]
    assert rows[:6] == [
        "| FLAM",
        "| FLAM-Global",
        "| FLAM w/o per-text scale",
        "| FLAM w/o per-text bias",
        "| FLAM w/o per-text scale and bias",
        "| FLAM w/o prior loss",
    ]
    ours = metrics["models"]["flam"]["test_unseen"]["frame_auroc_per_label"]
    theirs = metrics["models"]["global"]["test_unseen"]["frame_auroc_per_label"]
    start = text.index("| prompt | FLAM | FLAM-Global | gain |")
    table = text[start:].splitlines()[2 : 2 + len(ours)]
    gains = [float(line.strip("|").split(" | ")[-1]) for line in table]
    assert gains == sorted(gains, reverse=True) and len(set(gains)) == len(gains)
    labels = [line.split(" | ")[0].removeprefix("| ") for line in table]
    assert labels == sorted(ours, key=lambda k: ours[k] - theirs[k], reverse=True)


def test_a_missing_metric_fails_the_rendering() -> None:
    """A key the report needs and the metrics lack is an error, not an empty table cell."""
    _, metrics = CASES["claims_without_targets"]
    broken = copy.deepcopy(metrics)
    del broken["models"]["global"]["test_seen"]["psds2_alpha_st0"]
    with pytest.raises(jinja2.UndefinedError, match="psds2_alpha_st0"):
        results_markdown(broken, _params("default", *PINNED))


def test_mga_clap_is_a_row_of_every_system_table_and_in_the_claims() -> None:
    """MGA-CLAP among the models: its row after FLAM-Global's in every table of systems (SED
    AUROC, PSDS, thresholds, single-class PSDS, retrieval, zero-shot, clip/within-clip, real
    recordings, moment retrieval per split, near/far), and the paper's ordering in the claims."""
    texts = {case: (GOLDEN / f"{case}.md").read_text(encoding="utf-8") for case in CASES}
    ordering = "the paper's ordering does not hold"
    assert {c for c, t in texts.items() if ordering in t} == {"claims_without_targets", "full", "mga_clap"}
    lines = texts["mga_clap"].splitlines()
    rows = [k for k, line in enumerate(lines) if line.startswith("| MGA-CLAP |")]
    assert len(rows) == 11
    before = [lines[k - 1].split(" | ")[0] for k in rows]
    assert before == ["| FLAM-Global"] * 8 + ["| MGA-CLAP"] + ["| FLAM-Global"] * 2
