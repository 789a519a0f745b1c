"""Mixing speed against a bare numpy sum of the same source arrays, and loader throughput.

Usage: python bench/bench_mixer.py LIBRARY_DIR RECIPES_DIR [--n 3000] [--loader-batches 30]
Prints one JSON line. "bare_numpy_per_s" adds the very same float32 slices with the same
gains into a zeroed buffer (no fades, no limiter, no per-row bookkeeping): the floor the
mixer is compared with ("ratio" = mixer time / bare time, same mixtures, same run).
Pin to one core for the per-core figures: `taskset -c 0 python ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from flam_core.config import load_params
from flam_core.data.loader import make_loader
from flam_core.data.mixer import Mixer
from flam_core.data.recipes import read_recipes
from flam_core.data.sources import load_manifest


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("library", type=Path)
    parser.add_argument("recipes", type=Path)
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--loader-batches", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    mixer = Mixer(
        load_manifest(args.library), args.library, params.synth, params.frames, params.audio.sample_rate
    )
    plan = mixer.plan(read_recipes(args.recipes / "train.parquet"))
    n = min(args.n, len(plan))

    # The same source arrays (views of the mixer's float32 pool) and gains, prepared outside
    # the timed loops. Bare sums and the mixer alternate over 5 rounds; the ratio is the
    # median of the per-round ratios, so that machine noise hits both sides alike.
    rows = [
        [
            (
                mixer.pool[plan.src_start[r] : plan.src_start[r] + plan.n_samples[r]],
                plan.dst_start[r],
                plan.gain[r],
            )
            for r in range(plan.row_start[i], plan.row_start[i + 1])
            if plan.n_samples[r] > 0
        ]
        for i in range(n)
    ]
    bare_times, mixer_times = [], []
    for _ in range(5):
        start = time.perf_counter()
        for pieces in rows:
            out = np.zeros(mixer.n_samples, np.float32)
            for source, dst, gain in pieces:
                out[dst : dst + len(source)] += source * gain
        bare_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        for i in range(n):
            mixer.render(plan, i)
        mixer_times.append(time.perf_counter() - start)
    bare, mixing = float(np.median(bare_times)), float(np.median(mixer_times))
    ratio = float(np.median(np.array(mixer_times) / np.array(bare_times)))

    start = time.perf_counter()
    for i in range(n):
        mixer.frame_labels(plan, i)
    labelling = time.perf_counter() - start

    events = int(plan.is_event[: plan.row_start[n]].sum())
    loader = make_loader(params, "train", args.library, args.recipes, mixer=mixer)
    iterator = iter(loader)
    next(iterator)  # workers started
    start = time.perf_counter()
    count = 0
    for _ in range(args.loader_batches):
        count += len(next(iterator)["mixture_id"])
    loading = time.perf_counter() - start
    print(
        json.dumps(
            {
                "mixtures": n,
                "event_pieces_per_mixture": round(events / n, 2),
                "mixer_per_s": round(n / mixing),
                "bare_numpy_per_s": round(n / bare),
                "ratio_mixer_to_bare": round(ratio, 2),
                "labels_per_s": round(n / labelling),
                "loader_workers": params.loader.num_workers,
                "loader_features": params.loader.features,
                "loader_mixtures_per_s": round(count / loading, 1),
                "cpus": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
