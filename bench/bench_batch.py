"""Throughput of `flam detect` over many files: one `--out` run against the single-file CLI in a loop.

    python bench/bench_batch.py MODEL_DIR [--files 50] [--min-s 10] [--max-s 30] [--single-runs 5]
                                          [--workers 1] [--cores 0,1] [--workdir DIR]

`--files` recordings (real-looking audio: pink-ish noise with tones, lengths uniform in
[`--min-s`, `--max-s`] seconds, 16 / 44.1 / 48 kHz, mono and stereo, WAV and FLAC) are written
to `--workdir` (default: a temporary folder, removed afterwards). Then, pinned to `--cores`
(default: the first two cores, `os.sched_setaffinity`, inherited by the children):

1. batch: one process of `flam detect DIR -p dog -p siren --model MODEL_DIR --out OUT
   --workers W` over every file;
2. single: `--single-runs` processes of `flam detect FILE -p dog -p siren --model MODEL_DIR --json`
   on the first files; their mean wall time per audio second is extrapolated to all files (the
   loop a user runs today: each process imports torch and loads the model for one file).

Both report audio hours per wall hour (= audio seconds per wall second). MODEL_DIR: any trained
model folder (speed does not depend on the weights; see `bench/bench_memory.py` for the smoke
model's commands).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

FLAM = [sys.executable, "-m", "flam_core.cli"]
PROMPTS = ["-p", "dog barking", "-p", "a siren wails"]


def write_files(folder: Path, n: int, min_s: float, max_s: float, seed: int = 0) -> list[tuple[Path, float]]:
    """`n` recordings under `folder`: (path, seconds)."""
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        rate = (16000, 44100, 48000)[i % 3]
        seconds = float(rng.uniform(min_s, max_s))
        t = np.arange(int(seconds * rate)) / rate
        noise = np.cumsum(rng.normal(0, 0.02, t.size)).astype(np.float32)
        noise -= np.convolve(noise, np.ones(64) / 64, mode="same")  # drift removed: pink-ish noise
        tone = 0.2 * np.sin(2 * np.pi * (300 + 50 * i) * t) * (np.sin(2 * np.pi * 0.2 * t) > 0.5)
        mono = (0.3 * noise + tone).astype(np.float32)
        samples = np.stack([mono, mono], axis=1) if i % 2 else mono
        path = folder / f"take{i:03d}.{'flac' if i % 4 == 1 else 'wav'}"
        sf.write(path, samples, rate)
        files.append((path, len(t) / rate))
    return files


def timed(args: list[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    return time.perf_counter() - started, done


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path)
    parser.add_argument("--files", type=int, default=50)
    parser.add_argument("--min-s", type=float, default=10.0)
    parser.add_argument("--max-s", type=float, default=30.0)
    parser.add_argument("--single-runs", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--cores", default="0,1", help="CPU cores to run on (comma separated)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    os.sched_setaffinity(0, {int(c) for c in args.cores.split(",")})
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as scratch:
        work = args.workdir or Path(scratch)
        audio = work / "audio"
        audio.mkdir(parents=True, exist_ok=True)
        files = write_files(audio, args.files, args.min_s, args.max_s)
        total_s = sum(s for _, s in files)
        out = work / "out"
        batch_cmd = [
            *FLAM, "detect", str(audio), *PROMPTS, "--model", str(args.model),
            "--out", str(out), "--workers", str(args.workers),
        ]  # fmt: skip
        batch_wall, done = timed(batch_cmd, root)
        if done.returncode != 0:
            raise SystemExit(f"batch run failed ({done.returncode}): {done.stderr[-2000:]}")
        summary = next(line for line in done.stderr.splitlines() if line.startswith("detect:"))
        singles = []
        for path, seconds in files[: args.single_runs]:
            wall, one = timed(
                [*FLAM, "detect", str(path), *PROMPTS, "--model", str(args.model), "--json"], root
            )
            if one.returncode != 0:
                raise SystemExit(f"single run failed ({one.returncode}): {one.stderr[-2000:]}")
            singles.append((wall, seconds))
        per_file = float(np.mean([w for w, _ in singles]))
        single_rate = sum(s for _, s in singles) / sum(w for w, _ in singles)  # audio s per wall s
        loop_wall = total_s / single_rate
    batch_rate = total_s / batch_wall
    print(f"{args.files} files, {total_s / 3600:.3f} h of audio ({args.min_s:g}-{args.max_s:g} s each), "
          f"cores {args.cores}, load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"batch summary: {summary}")
    print()
    print("| way | wall for all files | audio-hours per wall hour | per file |")
    print("|---|---|---|---|")
    print(
        f"| one `flam detect DIR --out OUT --workers {args.workers}` | {batch_wall:.1f} s | "
        f"**{batch_rate:.0f}** | {batch_wall / args.files:.2f} s |"
    )
    print(
        f"| `flam detect FILE --json` per file ({len(singles)} runs timed, extrapolated) | "
        f"{loop_wall:.1f} s | {single_rate:.1f} | {per_file:.2f} s |"
    )
    print(f"\nspeed-up: {batch_rate / single_rate:.1f}x")
    print("batch command: " + " ".join(batch_cmd[2:]))


if __name__ == "__main__":
    main()
