"""Detection on real recordings and detection speed.

    python bench/bench_detect.py [--model models/flam] [--library data/sources] [--hour-s 3600]
                                 [--audioset [--features data/features]]

1. Hit rate: every event clip of the source library's test split (real recordings, never
   trained on; seen labels and held-out labels separately) goes through `FlamDetector.detect`
   with its label as the prompt, as a file on disk. A hit is a detected segment that overlaps
   one of the clip's known active spans (from the library manifest). A false alarm: the same
   clip prompted with another clip's label (of the same group) gives any segment. Also
   reported, had one threshold been used for every prompt: the hit rate (the best frame score
   inside an active span passes it) and the false-alarm rate (the other prompt's best frame
   score anywhere passes it).
   With `--audioset`, the same for the AudioSet classifier baseline (the frozen backbone's own
   classifier, `flam_core.model.audioset`) through the same detector, at thresholds chosen as
   `evaluate` chooses them for a model without calibration: on `val` for training labels, on
   `val_unseen` for the others (the cached features of `--features`).
2. Real-time factor: one hour of audio (real mixtures rendered back to back) with 10 prompts,
   the whole `detect` call (decoding excluded), on this machine's CPU threads.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from flam_core.audio.io import read_audio
from flam_core.config import load_params
from flam_core.data.mixer import Mixer
from flam_core.data.recipes import read_recipes
from flam_core.data.sources import load_manifest
from flam_core.evaluation.report import validation_thresholds
from flam_core.evaluation.splits import VALIDATION_OF, MixtureSplit
from flam_core.inference import FlamDetector
from flam_core.model.audioset import audioset_model

PROMPTS = [
    "dog barking",
    "a siren wails",
    "glass breaking",
    "footsteps",
    "a bell rings",
    "speech",
    "rain",
    "a car passes",
    "music",
    "a door closes",
]


SWEEP = (0.5, 0.6, 0.7, 0.8, 0.9)


def hit_rate(detector: FlamDetector, library: Path) -> dict[str, dict]:
    manifest = load_manifest(library)
    clips = manifest[(manifest["split"] == "test") & (manifest["kind"] == "event")]
    out = {}
    for group, rows in (("seen", clips[~clips["heldout"]]), ("unseen", clips[clips["heldout"]])):
        if rows.empty:
            continue
        labels = rows["label"].to_numpy()
        # Another clip's label of the same group, never the clip's own: the false-alarm prompt.
        shift = np.roll(np.arange(len(rows)), len(rows) // 2)
        hits, best, alarms, other_best = [], [], [], []
        for row, other in zip(rows.itertuples(), labels[shift], strict=True):
            prompts = [row.label] if other == row.label else [row.label, other]
            detection = detector.detect(library / row.path, prompts)
            spans = np.asarray([list(s) for s in row.active_spans], dtype=float).reshape(-1, 2)
            mine = [seg for seg in detection.segments if seg["prompt"] == row.label]
            hits.append(any(((spans[:, 0] < g["offset"]) & (spans[:, 1] > g["onset"])).any() for g in mine))
            times = (np.arange(detection.probs.shape[1]) + 0.5) * detection.frame_hop_s
            inside = ((times[:, None] >= spans[:, 0]) & (times[:, None] < spans[:, 1])).any(axis=1)
            best.append(float(detection.probs[0][inside].max()) if inside.any() else 0.0)
            if other != row.label:
                alarms.append(any(seg["prompt"] == other for seg in detection.segments))
                other_best.append(float(detection.probs[1].max()))
        best_arr = np.asarray(best)
        out[group] = {
            "clips": len(rows),
            "hit_rate": round(float(np.mean(hits)), 3),
            "false_alarm_rate": round(float(np.mean(alarms)), 3),
            "hit_rate_at": {t: round(float((best_arr > t).mean()), 3) for t in SWEEP},
            "false_alarm_rate_at": {t: round(float((np.asarray(other_best) > t).mean()), 3) for t in SWEEP},
        }
    return out


def audioset_detector(params, library: Path, recipes: Path, features: Path) -> FlamDetector:
    """The AudioSet classifier as a detector: thresholds by `evaluate`'s rule for a model without
    calibration, the `val` one for every training label (the library's labels not held out),
    the `val_unseen` one for any other prompt."""
    model = audioset_model(params)
    mixer = Mixer.for_library(params, library)
    validation = {
        name: MixtureSplit(params, name, features, mixer, recipes) for name in VALIDATION_OF.values()
    }
    thresholds = validation_thresholds(model, validation, params.frame_hop_s)
    manifest = load_manifest(library)
    seen = sorted(set(manifest.loc[(manifest["kind"] == "event") & ~manifest["heldout"], "label"]))
    unseen, seen_threshold = thresholds["test_unseen"], thresholds["test_seen"]
    print(f"AudioSet classifier thresholds: val_unseen {unseen}, val {seen_threshold}")
    calibration = {"threshold": unseen, "per_prompt": dict.fromkeys(seen, seen_threshold)}
    return FlamDetector(model, params, calibration, source="AudioSet classifier")


def real_time_factor(detector: FlamDetector, params, library: Path, recipes: Path, seconds: float) -> dict:
    mixer = Mixer.for_library(params, library)
    plan = mixer.plan(read_recipes(recipes / "test_seen.parquet"))
    n = int(np.ceil(seconds / params.synth.mixture_s))
    audio = np.concatenate([mixer.render(plan, i % len(plan)) for i in range(n)])[: int(seconds * 16000)]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "hour.flac"
        sf.write(path, audio, 16000)
        samples, _ = read_audio(path, detector.sample_rate)
    detector.detect(samples[: 16000 * 30], PROMPTS, sample_rate=detector.sample_rate)  # warm-up
    start = time.perf_counter()
    detection = detector.detect(samples, PROMPTS, sample_rate=detector.sample_rate)
    elapsed = time.perf_counter() - start
    return {
        "audio_s": len(samples) / detector.sample_rate,
        "seconds": round(elapsed, 2),
        "rtf": round(elapsed / (len(samples) / detector.sample_rate), 5),
        "frames": detection.probs.shape[1],
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="models/flam")
    parser.add_argument("--library", type=Path, default=Path("data/sources"))
    parser.add_argument("--recipes", type=Path, default=Path("data/recipes"))
    parser.add_argument("--hour-s", type=float, default=3600.0)
    parser.add_argument("--skip-hits", action="store_true")
    parser.add_argument("--skip-rtf", action="store_true")
    parser.add_argument(
        "--audioset", action="store_true", help="also the hit rate of the AudioSet classifier baseline"
    )
    parser.add_argument("--features", type=Path, default=Path("data/features"))
    args = parser.parse_args()
    detector = FlamDetector.from_uri(args.model)
    params = load_params("params.yaml")
    if not args.skip_hits:
        print("hit rate on the library's test clips (label as prompt):", hit_rate(detector, args.library))
        if args.audioset:
            baseline = audioset_detector(params, args.library, args.recipes, args.features)
            print("AudioSet classifier, same clips:", hit_rate(baseline, args.library))
    if not args.skip_rtf:
        print(
            "real-time factor, 10 prompts:",
            real_time_factor(detector, params, args.library, args.recipes, args.hour_s),
        )


if __name__ == "__main__":
    main()
