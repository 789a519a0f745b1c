"""The real-recording test set: built from held-out sources only, written in rotating formats,
with exact ground truth, and scored with metrics that a perfect system maxes out."""

from __future__ import annotations

import json
import math
import shutil
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from flam_core.config import split_source
from flam_core.data.realset import ENCODINGS, REAL_SPLIT, VAL_REAL_SPLIT, build_real_set
from flam_core.data.sources import held_out_source_mask, load_manifest
from flam_core.data.tsv import read_sed_tsv
from flam_core.detection import Detection
from flam_core.errors import DataError
from flam_core.evaluation.frames import frame_truth
from flam_core.evaluation.real import RealSet, evaluate_real_set, real_threshold
from tests.conftest import HELD_OUT, smoke_params


def test_the_set_holds_only_held_out_sources_with_their_ambiences_as_prompts(real_set, smoke_library):
    out, summary = real_set
    manifest = load_manifest(smoke_library[0])
    assert {split_source(e)[0] for e in smoke_params().sources.held_out_sources} == {HELD_OUT}
    assert set(manifest.loc[manifest["split"] == REAL_SPLIT, "source_package"]) == {HELD_OUT}
    held = manifest[manifest["split"] == REAL_SPLIT]
    others = manifest[manifest["split"] != REAL_SPLIT]
    assert summary.sources == [HELD_OUT]
    # every label comes from a held-out clip; labels shared with training sources are allowed
    # (a dog is a dog), but none of the set's audio is a training clip (the clips are held out)
    assert set(summary.labels) <= set(held["label"])
    assert set(summary.background_labels) <= set(held[held["kind"] == "background"]["label"])
    assert summary.background_labels, "the ambiences' own labels are prompts too"
    assert not set(held["clip_id"]) & set(others["clip_id"])
    recordings = read_sed_tsv(out / "recordings.tsv")
    ambience_labels = set(summary.background_labels)
    for name, events in recordings.items():
        # one ambience plays under the whole recording: its label is in the truth
        assert {e.label for e in events} & ambience_labels, name
    assert json.loads((out / "summary.json").read_text())["labels"] == summary.labels


def test_the_validation_twin_holds_only_validation_sources_and_no_test_clip(
    real_set, smoke_library, tmp_path
):
    _, summary = real_set
    params = smoke_params()
    manifest = load_manifest(smoke_library[0])
    val = build_real_set(params, smoke_library[0], tmp_path / "val_real", split=VAL_REAL_SPLIT)
    chosen = held_out_source_mask(
        manifest["source_package"], manifest["origin"], params.sources.validation_sources
    )
    assert set(manifest.loc[manifest["split"] == VAL_REAL_SPLIT, "clip_id"]) == set(
        manifest.loc[chosen, "clip_id"]
    )
    val_clips = manifest[manifest["split"] == VAL_REAL_SPLIT]
    assert val.recordings == params.test_real.recordings and val.clips > 0 and val.background_labels
    assert set(val.labels) <= set(val_clips["label"])
    # the two sets share no recording: the test's labels come from other clips of the source
    test_clips = manifest[manifest["split"] == REAL_SPLIT]
    assert not set(val_clips["clip_id"]) & set(test_clips["clip_id"])
    assert set(val.labels) != set(summary.labels)
    with pytest.raises(DataError, match="no real-recording set for split 'val'"):
        build_real_set(params, smoke_library[0], tmp_path / "nope", split="val")
    assert not (tmp_path / "nope").exists()


def test_recordings_rotate_formats_rates_and_channels_and_match_their_truth(real_set):
    out, summary = real_set
    params = smoke_params()
    cfg = params.test_real
    recordings = read_sed_tsv(out / "recordings.tsv")
    assert len(recordings) == summary.recordings == cfg.recordings
    seen = set()
    for n, name in enumerate(sorted(recordings)):
        info = sf.info(out / "recordings" / name)
        ext, _, _, rate = ENCODINGS[n % len(ENCODINGS)]
        assert name.endswith(f".{ext}") and info.samplerate == rate
        assert info.channels == 1 + (n // len(ENCODINGS)) % 2
        assert cfg.min_s - 0.01 <= info.duration <= cfg.max_s + 0.01
        assert round(info.duration / params.synth.mixture_s, 3).is_integer()
        seen.add((ext, info.channels))
        for onset, offset, _ in recordings[name]:
            assert 0.0 <= onset < offset <= info.duration + 1e-3
    clips = read_sed_tsv(out / "clips.tsv")
    assert len(clips) == summary.clips > 0
    per_label: dict[str, int] = {}
    for events in clips.values():
        assert len({e.label for e in events}) == 1
        per_label[events[0].label] = per_label.get(events[0].label, 0) + 1
    assert max(per_label.values()) <= cfg.clips_per_label
    assert len(seen) == len(recordings)  # 3 recordings: three distinct encodings


def test_the_same_parameters_give_the_same_set(real_set, smoke_library, tmp_path):
    out, summary = real_set
    again = build_real_set(smoke_params(), smoke_library[0], tmp_path / "again")
    assert again == summary
    for tsv in ("recordings.tsv", "clips.tsv"):
        assert (tmp_path / "again" / tsv).read_text() == (out / tsv).read_text()
    for name in read_sed_tsv(out / "recordings.tsv"):
        a, _ = sf.read(out / "recordings" / name)
        b, _ = sf.read(tmp_path / "again" / "recordings" / name)
        np.testing.assert_array_equal(a, b)


def test_a_library_without_held_out_sources_is_refused_and_nothing_is_written(smoke_library, tmp_path):
    library, _ = smoke_library
    plain = tmp_path / "library"
    plain.mkdir()
    (plain / "clips").symlink_to(library / "clips", target_is_directory=True)
    manifest = load_manifest(library)
    manifest.loc[manifest["split"] == REAL_SPLIT, "split"] = "test"
    manifest.to_parquet(plain / "manifest.parquet")
    with pytest.raises(DataError, match="held_out_sources"):
        build_real_set(smoke_params(), plain, tmp_path / "test_real")
    assert not (tmp_path / "test_real").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["library"]


class _Oracle:
    """Scores each file with its own ground truth (optionally one prompt's scores swapped with
    another's), so the metrics' best and broken cases are known exactly."""

    frame_hop_s = smoke_params().frame_hop_s
    median_frames = 1

    def __init__(self, real: RealSet, swap: tuple[str, str] | None = None) -> None:
        self.truth = {**real.recordings.ground_truth, **real.clips.ground_truth}
        self.durations = {**real.recordings.durations, **real.clips.durations}
        self.swap = swap

    def threshold_for(self, prompt: str) -> float:
        return 0.5

    def detect(self, path: Path, prompts: list[str]) -> Detection:
        name = Path(path).name
        n_frames = math.ceil(self.durations[name] / self.frame_hop_s - 1e-9)
        probs = frame_truth(self.truth[name], prompts, n_frames, self.frame_hop_s).astype(np.float32)
        if self.swap:
            a, b = (prompts.index(p) for p in self.swap)
            probs[[a, b]] = probs[[b, a]]
        segments = [{"prompt": p} for p, row in zip(prompts, probs, strict=True) if row.any()]
        return Detection("oracle", self.frame_hop_s, self.durations[name], prompts, probs, segments)


def test_a_perfect_system_scores_one_and_a_confused_one_does_not(real_set):
    out, summary = real_set
    real = RealSet.read(out)
    result = evaluate_real_set({"oracle": _Oracle(real)}, out)
    recordings, zero_shot = result["oracle"]["recordings"], result["oracle"]["zero_shot"]
    assert recordings["frame_auroc_macro"] == recordings["frame_auroc_pooled"] == 1.0
    assert recordings["event_found"] == 1.0 and recordings["false_alarm_rate"] == 0.0
    assert recordings["segment_f1_macro"] > 0.9  # 1 s segments vs a 25%-of-a-frame truth: edges differ
    assert zero_shot["top1"] == zero_shot["top5"] == 1.0
    assert zero_shot["n_clips"] == summary.clips and zero_shot["n_classes"] == len(summary.labels)
    assert result["set"] == {
        "recordings": summary.recordings,
        "recording_s": round(summary.recording_s, 1),
        "clips": summary.clips,
        "prompts": len(summary.labels),
        "ambiences": summary.background_labels,
        "sources": summary.sources,
        "encodings": summary.encodings,
    }

    sounding = pd.Series(
        [e.label for evs in real.recordings.ground_truth.values() for e in evs]
    ).value_counts()
    a, b = sorted(sounding.index[:2])
    confused = evaluate_real_set({"confused": _Oracle(real, swap=(a, b))}, out)["confused"]["recordings"]
    assert confused["per_label"][a]["frame_auroc"] < 1.0 and confused["per_label"][b]["frame_auroc"] < 1.0
    assert confused["frame_auroc_macro"] < 1.0 and confused["false_alarm_rate"] > 0.0


def test_the_smoke_detector_is_scored_in_range(real_set, smoke_models):
    from flam_core.inference import FlamDetector

    out, summary = real_set
    result = evaluate_real_set({"flam": FlamDetector.from_dir(smoke_models / "flam")}, out)["flam"]
    recordings, zero_shot = result["recordings"], result["zero_shot"]
    for key in (
        "frame_auroc_macro",
        "frame_auroc_pooled",
        "event_found",
        "segment_f1_macro",
        "false_alarm_rate",
    ):
        assert 0.0 <= recordings[key] <= 1.0, key
    assert set(recordings["per_label"]) == set(summary.labels)
    assert 0.0 <= zero_shot["top1"] <= zero_shot["top5"] <= 1.0


class _Noisy(_Oracle):
    """The truth blurred by seeded noise: sounding frames score 0.35-0.95, silent ones 0-0.6."""

    def __init__(self, real: RealSet) -> None:
        super().__init__(real)
        self.threshold = 0.5

    def threshold_for(self, prompt: str) -> float:
        return self.threshold

    def detect(self, path: Path, prompts: list[str]) -> Detection:
        truth = super().detect(path, prompts)
        rng = np.random.default_rng(zlib.crc32(Path(path).name.encode()))
        probs = (0.35 * truth.probs + rng.uniform(0.0, 0.6, truth.probs.shape)).astype(np.float32)
        segments = [
            {"prompt": p} for p, row in zip(prompts, probs, strict=True) if (row > self.threshold).any()
        ]
        return Detection("noisy", self.frame_hop_s, truth.duration_s, prompts, probs, segments)


def test_the_real_threshold_maximises_the_segment_f1_the_test_reports(val_real_set):
    out, _ = val_real_set
    noisy = _Noisy(RealSet.read(out))
    threshold, best = real_threshold(noisy, out)
    assert 0.0 < threshold < 1.0

    def reported(t: float) -> float:
        noisy.threshold = t
        recordings = evaluate_real_set({"noisy": noisy}, out)["noisy"]["recordings"]
        assert recordings["threshold"] == t
        return recordings["segment_f1_macro"]

    assert reported(threshold) == pytest.approx(best, abs=1e-4)
    assert all(reported(t) <= best + 1e-4 for t in (0.3, 0.45, 0.5, 0.55, 0.7))
    # a perfect ranking is separated wherever the threshold falls between its two levels
    threshold, best = real_threshold(_Oracle(RealSet.read(out)), out)
    assert 0.0 <= threshold < 1.0 and best > 0.9


def test_a_set_knows_its_split_and_no_setting_is_chosen_on_the_test(real_set, val_real_set, tmp_path):
    test, val = RealSet.read(real_set[0]), RealSet.read(val_real_set[0])
    assert (test.split, val.split) == (REAL_SPLIT, VAL_REAL_SPLIT)
    assert RealSet.read_for_choosing(val_real_set[0]).split == VAL_REAL_SPLIT
    with pytest.raises(DataError, match="is the real-recording test set"):
        real_threshold(_Oracle(test), real_set[0])
    # a set written before the split was recorded is refused with the fix, not guessed from its name
    old = tmp_path / "val_real"
    shutil.copytree(val_real_set[0], old)
    summary = json.loads((old / "summary.json").read_text())
    del summary["split"]
    (old / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(DataError, match="rebuild it"):
        RealSet.read(old)
