"""Search latency at a million frames, and indexing throughput on real mixtures.

    python bench/bench_search.py MODEL_DIR LIBRARY_DIR RECIPES_DIR [--frames 1000000] [--queries 20]
        [--mixtures 40] [--split val] [--workdir DIR]

1. Latency. A synthetic index of `--frames` random unit vectors (float16, files of 32-2048
   frames) is written in the index's own format with MODEL_DIR's model reference, so that
   `search` runs exactly as on a real index: product-quantizer fast scan, exact re-ranking,
   segment assembly. Text embeddings of the queries are computed (and cached) before the clock
   starts; the index is opened before too. Reported for 1000 and 2000 re-ranked candidates:
   median and p95 of `search` (top 10) at the model's calibrated threshold and at 0.5, the PQ
   candidate scan alone (`SearchIndex.top_frames`), and recall@10 of the scan against exact
   search (a float32 BLAS scan over every frame, also timed). A random frame has cosine ~0 with
   any text, i.e. an unbiased score ~0.5: at threshold 0.5 half of all frames pass, the worst
   case for segment assembly (every visited file is a mesh of short segments). Random vectors
   are also the hardest case for quantization: real embeddings cluster, which only helps.
2. Throughput. `--mixtures` mixtures of a recipe split are rendered to 10 s WAV files, and
   again concatenated into 60 s files, and indexed with `build_index`: audio seconds per second.

Prints one JSON object. Benchmarks measure; they assert nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from flam_core.config import load_params
from flam_core.data.mixer import Mixer
from flam_core.data.recipes import read_recipes
from flam_core.data.sources import load_manifest
from flam_core.inference import FlamDetector
from flam_core.search import SearchIndex, build_index, model_reference, search, write_embeddings

QUERIES = [
    "a dog barking",
    "a bell ringing",
    "someone speaking english",
    "a car passing by",
    "piano notes",
    "a door creaking",
    "hand clapping",
    "an alarm clock beeping",
    "a trumpet playing",
    "water splashing",
    "birds chirping",
    "a church organ",
    "a crash cymbal",
    "a person laughing",
    "a telephone ringing",
    "a guitar strummed",
    "rain falling",
    "footsteps",
    "a horse galloping",
    "a flute melody",
]


def synthetic_files(n_frames: int, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    left, k = n_frames, 0
    while left > 0:
        n = min(left, int(rng.integers(32, 2049)))
        x = rng.standard_normal((n, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        yield f"synthetic/{k:06d}.wav", x
        left, k = left - n, k + 1


def latency(detector: FlamDetector, workdir: Path, n_frames: int, n_queries: int) -> dict:
    index_dir = workdir / "synthetic-index"
    started = time.perf_counter()
    written = write_embeddings(
        index_dir, model_reference(detector), synthetic_files(n_frames, detector.model.vector_dim)
    )
    build_s = time.perf_counter() - started
    started = time.perf_counter()
    index = SearchIndex.open(index_dir)
    open_s = time.perf_counter() - started
    queries = (QUERIES * (n_queries // len(QUERIES) + 1))[:n_queries]
    vectors = {q: detector.ranking_vector(q) for q in queries}
    search(index, detector, queries[0])  # first call checks the model fingerprint once
    # Exact reference: every frame in float32 (4 bytes per dimension per frame), one BLAS matvec.
    exact = np.concatenate([np.asarray(c, dtype=np.float32) for c in index.chunks])
    exact_ms, exact_top = [], {}
    for q in queries:
        start = time.perf_counter()
        scores = exact @ vectors[q]
        exact_top[q] = set(np.argpartition(-scores, 10)[:10].tolist())
        exact_ms.append(1e3 * (time.perf_counter() - start))
    del exact
    by_rerank = {}
    for rerank in (1000, 2000):
        index.rerank = rerank
        search_ms, scan_ms, recall, worst_ms = [], [], [], []
        for q in queries:
            start = time.perf_counter()
            search(index, detector, q, top=10)
            search_ms.append(1e3 * (time.perf_counter() - start))
            start = time.perf_counter()
            search(index, detector, q, top=10, threshold=0.5)
            worst_ms.append(1e3 * (time.perf_counter() - start))
            start = time.perf_counter()
            rows, _ = index.top_frames(vectors[q], 10)
            scan_ms.append(1e3 * (time.perf_counter() - start))
            recall.append(len(set(rows.tolist()) & exact_top[q]) / 10)
        by_rerank[rerank] = {
            "search_ms_median": round(float(np.median(search_ms)), 1),
            "search_ms_p95": round(float(np.percentile(search_ms, 95)), 1),
            "search_threshold_0.5_ms_median": round(float(np.median(worst_ms)), 1),
            "search_threshold_0.5_ms_p95": round(float(np.percentile(worst_ms, 95)), 1),
            "scan_ms_median": round(float(np.median(scan_ms)), 1),
            "recall_at_10_vs_exact": round(float(np.mean(recall)), 4),
        }
    disk = sum(p.stat().st_size for p in index_dir.rglob("*") if p.is_file())
    codes = sum(p.stat().st_size for p in index_dir.rglob("*.codes.npy"))
    return {
        "frames": written["frames"],
        "files": written["files"],
        "method": index.method,
        "write_and_pq_s": round(build_s, 1),
        "open_s": round(open_s, 2),
        "exact_float32_ms_median": round(float(np.median(exact_ms)), 1),
        "rerank": by_rerank,
        "queries": len(queries),
        "index_mb_on_disk": round(disk / 2**20, 1),
        "pq_codes_mb": round(codes / 2**20, 1),
    }


def throughput(
    detector: FlamDetector, library: Path, recipes: Path, split: str, n: int, workdir: Path
) -> dict:
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    mixer = Mixer(load_manifest(library), library, params.synth, params.frames, params.audio.sample_rate)
    plan = mixer.plan(read_recipes(recipes / f"{split}.parquet"))
    n = min(n, len(plan))
    audio = [mixer.render(plan, i) for i in range(n)]
    out = {}
    for name, group in (("10s_files", 1), ("60s_files", 6)):
        folder = workdir / name
        folder.mkdir(parents=True)
        for k in range(0, n - group + 1, group):
            sf.write(folder / f"{k:05d}.wav", np.concatenate(audio[k : k + group]), mixer.sample_rate)
        summary = build_index(folder, workdir / f"{name}-index", detector, progress=False)
        out[name] = {
            "files": summary["embedded"],
            "audio_s": summary["audio_s"],
            "seconds": summary["seconds"],
            "audio_s_per_s": summary["audio_s_per_s"],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path)
    parser.add_argument("library", type=Path)
    parser.add_argument("recipes", type=Path)
    parser.add_argument("--frames", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--mixtures", type=int, default=36)
    parser.add_argument("--split", default="val")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-search-"))
    workdir.mkdir(parents=True, exist_ok=True)
    detector = FlamDetector.from_dir(args.model)
    try:
        result = {
            "latency": latency(detector, workdir, args.frames, args.queries),
            "indexing": throughput(detector, args.library, args.recipes, args.split, args.mixtures, workdir),
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
