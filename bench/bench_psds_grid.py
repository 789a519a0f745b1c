"""PSDS on the model's frame grid against sub-frame boundaries (linear interpolation).

    python bench/bench_psds_grid.py models/flam models/global [--split test_seen] [--up 8]

For the ground-truth frame labels (what a model that reproduced its training targets would
score) and each trained model: PSDS1 of the unbiased frame scores as `evaluate` computes it
(each frame a constant score over its 0.3125 s), and of the same scores interpolated linearly
between frame centres onto a grid `--up` times finer, with and without the detector's 3-frame
median filter first. Also the mean and standard deviation of the single-class PSDS1 (PSDS1
subtracts that spread, alpha_st = 1). Measures only; nothing is chosen from it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy.interpolate import make_interp_spline

from flam_core.config import load_params
from flam_core.data.mixer import Mixer
from flam_core.evaluation.frames import vocabulary_scores
from flam_core.evaluation.sed import psds
from flam_core.evaluation.splits import MixtureSplit
from flam_core.model.folder import load_model
from flam_core.postprocess import median_filter_frames


def interpolate_frames(scores: np.ndarray, up: int) -> np.ndarray:
    """`[..., L]` scores at frame centres -> `[..., L * up]` at the centres of a finer grid,
    linear between centres and constant beyond the first and last."""
    n = scores.shape[-1]
    centres = np.arange(n) + 0.5
    fine = (np.arange(n * up) + 0.5) / up
    line = make_interp_spline(centres, scores, k=1, axis=-1)
    return line(np.clip(fine, centres[0], centres[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--split", default="test_unseen")
    parser.add_argument("--up", type=int, default=8, help="finer grid: this many points per frame")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    params = load_params(args.params)
    mixer = Mixer.for_library(params, Path(params.sources.out_dir))
    split = MixtureSplit(
        params, args.split, Path(params.train.features_dir), mixer, Path(params.synth.out_dir)
    )
    hop = params.frame_hop_s
    scored = {"frame labels": split.truth.astype(np.float32)}
    for folder in args.models:
        model, _, _ = load_model(folder)
        scored[str(folder)] = vocabulary_scores(model, split.cache, split.vocabulary)
    print(f"| scores ({args.split}) | median filter | frame grid | {args.up}x finer grid |")
    print("|---|---|---|---|")
    for name, scores in scored.items():
        for median in (1, 3):
            cells = []
            filtered = median_filter_frames(scores, median)
            for grid, step in ((filtered, hop), (interpolate_frames(filtered, args.up), hop / args.up)):
                result = psds(
                    grid, step, split.vocabulary, split.ids, split.events, split.durations, scenario=1
                )
                per_class = np.fromiter(result["per_label"].values(), dtype=np.float64)
                cells.append(
                    f"{result['psds']:.4f} (classes {per_class.mean():.3f} +- {per_class.std():.3f})"
                )
            print(f"| {name} | {median} frames | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
