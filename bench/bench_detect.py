"""Detection on real recordings and detection speed.

    python bench/bench_detect.py [--model models/flam] [--library data/sources] [--hour-s 3600]

1. Hit rate: every event clip of the source library's test split (real recordings, never
   trained on; seen labels and held-out labels separately) goes through `FlamDetector.detect`
   with its label as the prompt, as a file on disk. A hit is a detected segment that overlaps
   one of the clip's known active spans (from the library manifest).
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
from flam_core.inference import FlamDetector

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


def hit_rate(detector: FlamDetector, library: Path) -> dict[str, dict[str, float]]:
    manifest = load_manifest(library)
    clips = manifest[(manifest["split"] == "test") & (manifest["kind"] == "event")]
    results: dict[str, list[bool]] = {"seen": [], "unseen": []}
    for row in clips.itertuples():
        detection = detector.detect(library / row.path, [row.label])
        spans = np.asarray([list(s) for s in row.active_spans], dtype=float).reshape(-1, 2)
        hit = any(
            ((spans[:, 0] < seg["offset"]) & (spans[:, 1] > seg["onset"])).any() for seg in detection.segments
        )
        results["unseen" if row.heldout else "seen"].append(hit)
    return {k: {"hit_rate": float(np.mean(v)), "clips": len(v)} for k, v in results.items() if v}


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
    args = parser.parse_args()
    detector = FlamDetector.from_uri(args.model)
    params = load_params("params.yaml")
    if not args.skip_hits:
        print("hit rate on the library's test clips (label as prompt):", hit_rate(detector, args.library))
    print(
        "real-time factor, 10 prompts:",
        real_time_factor(detector, params, args.library, args.recipes, args.hour_s),
    )


if __name__ == "__main__":
    main()
