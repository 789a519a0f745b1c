"""Recipe sampling speed and memory: N mixtures of one split, sampled and written to Parquet.

Usage: python bench/bench_recipes.py LIBRARY_DIR [--n 1000000] [--split train]
Prints one JSON line: seconds, mixtures/s, rows, file MB, peak RSS (whole process, MB).
Run it pinned to one core for the figure in BENCHMARKS.md: `taskset -c 0 python ...`.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from flam_core.config import load_params
from flam_core.data.recipes import ClipPool, write_split
from flam_core.data.sources import load_manifest


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("library", type=Path)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--split", default="train")
    args = parser.parse_args()
    synth = load_params(Path(__file__).resolve().parents[1] / "params.yaml").synth
    pool = ClipPool.for_split(load_manifest(args.library), args.split)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{args.split}.parquet"
        start = time.perf_counter()
        info = write_split(pool, synth, args.split, args.n, path)
        seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "mixtures": args.n,
                "seconds": round(seconds, 2),
                "mixtures_per_s": round(args.n / seconds),
                "rows": info["n_rows"],
                "file_mb": round(info["bytes"] / 1e6, 1),
                "peak_rss_mb": round(peak_mb),
            }
        )
    )


if __name__ == "__main__":
    main()
