"""Start-up time of `flam detect` on one 10 s file: a new process each run, as a user's shell
starts it, with the prompt cache empty (the text encoder loads) and full (it does not).

    python bench/bench_start.py --model models/flam [--runs 5]

Each run is `flam detect <10 s wav> -p siren -p "dog barking" --model M --json`, timed from the
process start to its exit (wall). "uncached": the prompt cache (`FLAM_PROMPT_CACHE`) is emptied
before every run; "cached": it holds both prompts (one run fills it first). The page cache is
warm (the same files every run). Also checks what the user sees: stdout is the JSON detection
and stderr is empty. Prints one row per mode: median, min and max of the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

FLAM = str(Path(sys.executable).parent / "flam")
PROMPTS = ["siren", "dog barking"]


def _clip(path: Path) -> None:
    rng = np.random.default_rng(0)
    t = np.arange(10 * 16000) / 16000
    audio = 0.05 * rng.standard_normal(t.size) + 0.3 * np.sin(2 * np.pi * 700 * t) * (t > 4) * (t < 6)
    sf.write(path, audio.astype(np.float32), 16000)


def _run(args: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    return time.perf_counter() - start, done


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="flam-start-") as tmp:
        audio, cache = Path(tmp) / "ten.wav", Path(tmp) / "prompts"
        _clip(audio)
        env = {**os.environ, "FLAM_PROMPT_CACHE": str(cache)}
        prompts = [x for p in PROMPTS for x in ("-p", p)]
        command = [FLAM, "detect", str(audio), *prompts, "--model", str(args.model), "--json"]
        for mode in ("uncached", "cached"):
            times = []
            if mode == "cached":
                _run(command, env)  # fills the cache
            for _ in range(args.runs):
                if mode == "uncached":
                    shutil.rmtree(cache, ignore_errors=True)
                wall, done = _run(command, env)
                if done.returncode != 0:
                    raise SystemExit(f"flam detect failed: {done.stderr}")
                json.loads(done.stdout)  # stdout is the result, nothing else
                if done.stderr.strip():
                    raise SystemExit(f"flam detect wrote to stderr: {done.stderr!r}")
                times.append(wall)
            median, spread = statistics.median(times), f"min {min(times):.2f}, max {max(times):.2f}"
            print(f"{mode:9s} median {median:.2f} s ({spread}; {args.runs} runs, stderr empty)", flush=True)


if __name__ == "__main__":
    main()
