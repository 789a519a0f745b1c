"""Shard write throughput: render the first N mixtures of a recipe split into tar shards.

    python bench/bench_shards.py LIBRARY_DIR RECIPES_DIR SPLIT N [--flac-preview] [--params params.yaml]

Prints one JSON line: mixtures/s and bytes/mixture of `write_split_shards` (the mixer is
built before the clock starts; its pool load is reported separately as `mixer_build_s`).
The parameters are loaded with the profile recorded in the recipes' `summary.json`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from flam_core.config import load_params
from flam_core.data.mixer import Mixer
from flam_core.data.shards import write_split_shards
from flam_core.data.sources import load_manifest


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("library_dir", type=Path)
    parser.add_argument("recipes_dir", type=Path)
    parser.add_argument("split")
    parser.add_argument("n", type=int, help="mixtures to write (the first N of the split)")
    parser.add_argument("--params", type=Path, default=None, help="params.yaml (default: found from cwd)")
    parser.add_argument("--flac-preview", action="store_true", help="also write the 16-bit FLAC preview")
    args = parser.parse_args()

    profile = json.loads((args.recipes_dir / "summary.json").read_text()).get("profile", "default")
    params = load_params(args.params, profile=profile)
    started = time.perf_counter()
    mixer = Mixer(
        load_manifest(args.library_dir),
        args.library_dir,
        params.synth,
        params.frames,
        params.audio.sample_rate,
    )
    build_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        recipes = pq.read_table(args.recipes_dir / f"{args.split}.parquet")
        subset = recipes.filter(pc.less(recipes["mixture_id"], args.n))
        recipe_path = Path(tmp) / f"{args.split}.parquet"
        pq.write_table(subset, recipe_path)
        out = Path(tmp) / "shards"
        out.mkdir()
        started = time.perf_counter()
        summary = write_split_shards(
            mixer,
            recipe_path,
            out,
            args.split,
            params.shards.max_shard_mb,
            flac_preview=args.flac_preview,
        )
        seconds = time.perf_counter() - started
    n = summary["n_mixtures"]
    result = {
        "split": args.split,
        "n_mixtures": n,
        "flac_preview": args.flac_preview,
        "sample_rate": params.audio.sample_rate,
        "mixture_s": params.synth.mixture_s,
        "mixer_build_s": round(build_s, 3),
        "write_s": round(seconds, 3),
        "mixtures_per_s": round(n / seconds, 1) if seconds > 0 else None,
        "bytes": summary["bytes"],
        "bytes_per_mixture": round(summary["bytes"] / max(n, 1)),
        "n_shards": summary["n_shards"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
