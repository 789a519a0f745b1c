"""Moment retrieval on long recordings: `flam search`'s ranked spans against exact ground truth.

    python bench/bench_moments.py --model MODEL_DIR --library LIBRARY_DIR --recipes RECIPES_DIR
        [--n 10] [--seed 0] [--min-s 60] [--max-s 300] [--queries caption|label] [--out FILE]

`--n` recordings per test split (`test_unseen`, `test_seen`) of `--min-s`-`--max-s` seconds,
made by the Mixer from the split's clips (`flam_core.evaluation.moments`); every recording
indexed on its own with `build_index` and every query answered by `search`, as `flam index` and
`flam search` would. RECIPES_DIR: the recipes the model was trained from (their source library
must be LIBRARY_DIR). The model's own parameters set the mixtures and the sample rate.

Beside the model, the same recordings are scored with the ground truth snapped to the model's
frame grid (`grid_oracle`): the ceiling of a detector whose segments are runs of whole frames.
Prints the Markdown table (`moments_markdown`) and writes every figure as JSON to `--out`
(default: print only). Benchmarks measure; they assert nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from flam_core.evaluation.moments import grid_oracle, moment_retrieval, moments_markdown
from flam_core.inference import FlamDetector
from flam_core.utils import atomic_write_text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="trained model folder")
    parser.add_argument("--library", type=Path, required=True, help="source library folder")
    parser.add_argument("--recipes", type=Path, required=True, help="the model's recipes folder")
    parser.add_argument("--n", type=int, default=10, help="recordings per test split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-s", type=float, default=60.0, help="shortest recording (seconds)")
    parser.add_argument("--max-s", type=float, default=300.0, help="longest recording (seconds)")
    parser.add_argument("--queries", choices=("caption", "label"), default="caption")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for every figure")
    args = parser.parse_args()
    detector = FlamDetector.from_dir(args.model)
    common = {
        "library_dir": args.library,
        "recipes_dir": args.recipes,
        "n_recordings": args.n,
        "seed": args.seed,
        "min_s": args.min_s,
        "max_s": args.max_s,
        "queries": args.queries,
    }
    started = time.perf_counter()
    flam = moment_retrieval(detector, system=f"FLAM (`{args.model.name}`)", **common)
    wall = time.perf_counter() - started
    ceiling = moment_retrieval(
        detector,
        ranker=grid_oracle(detector.frame_hop_s),
        system=f"ground truth on the {detector.frame_hop_s:g} s frame grid (ceiling)",
        **common,
    )
    print(moments_markdown([flam, ceiling]))
    for split, r in flam["splits"].items():
        print(
            f"{split}: {r['audio_s']:g} s of audio, {r['n_spans']} ground-truth spans, "
            f"{r['predictions_per_query']} spans per answer; indexing and search {r['seconds']:g} s"
        )
    load = os.getloadavg()[0]
    print(f"whole run {wall:.0f} s (sampling, rendering, indexing, search), load average {load:.2f}")
    if args.out is not None:
        atomic_write_text(
            args.out, json.dumps({"systems": [flam, ceiling], "wall_s": round(wall, 1)}, indent=2)
        )


if __name__ == "__main__":
    main()
