"""Peak memory of `flam detect` on long recordings.

    python bench/bench_memory.py MODEL_DIR [--workdir DIR] [--short-s 600] [--long-s 7200]
                                           [--pythonpath DIR]

Each input goes through a fresh process of

    python -m flam_core.cli --params params.yaml detect FILE -p dog -p siren \
        --model MODEL_DIR --json > /dev/null

(what `flam detect` runs) and the table gives its peak resident memory (the child's own
`ru_maxrss`, from `os.wait4`) and wall time. Inputs, generated block by block into `--workdir`
(default: a temporary folder, removed afterwards): pink noise at about -30 dBFS with a 440 Hz
tone of 3 s every 5 minutes and a 1 kHz tone of 0.5 s every 61 s,

1. `--short-s` (10 min) at 16 kHz mono, 16-bit WAV;
2. `--long-s` (2 h) at 16 kHz mono, 16-bit WAV;
3. `--long-s` at 48 kHz stereo, 16-bit FLAC (downmixed and resampled to 16 kHz while decoding).

Target: the 2 h peaks within 1.5x of the 10 min one (the detector streams: decoded blocks,
a batch of windows and the `[K, T]` scores, never the whole signal). `--pythonpath DIR` runs
another checkout of `flam_core` (e.g. `git archive <rev> flam_core | tar -x -C DIR`) on the same
files, to compare.

MODEL_DIR: any trained model folder; memory does not depend on the weights, so the cheapest
is the smoke profile's model (about 1.5 min on 2 cores: sources 10 s, recipes 6 s, YAMNet
features 26 s, 30 training steps 40 s; `train --max-steps` writes checkpoints only, no model):

    export MLFLOW_TRACKING_URI=sqlite:////tmp/smoke/runs.db P="--profile smoke" W=/tmp/smoke
    flam $P sources build --out $W/sources
    flam $P synth recipes --library $W/sources --out $W/recipes
    flam $P features --library $W/sources --recipes $W/recipes --out $W/features
    flam $P -S train.features_dir=$W/features train --out $W/model --reports $W/reports
    python bench/bench_memory.py $W/model

(the tests' session fixture `smoke_models` leaves one in `<pytest tmp>/models*/flam` too).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import lfilter

ROOT = Path(__file__).resolve().parents[1]
# Paul Kellet's 1/f filter (economy version): pink noise from white noise, within 0.5 dB.
PINK_B = np.array([0.049922035, -0.095993537, 0.050612699, -0.004408786])
PINK_A = np.array([1.0, -2.494956002, 2.017265875, -0.522189400])
BLOCK_S = 60


def write_test_signal(path: Path, seconds: int, rate: int, channels: int, fmt: str) -> None:
    """Pink noise with a few tones, written a minute at a time (never the whole signal in memory)."""
    rng = np.random.default_rng(0)
    state = np.zeros((channels, len(PINK_A) - 1))
    with sf.SoundFile(path, "w", rate, channels, subtype="PCM_16", format=fmt) as out:
        for start in range(0, seconds, BLOCK_S):
            n = min(BLOCK_S, seconds - start) * rate
            t = start + np.arange(n) / rate
            pink, state = lfilter(PINK_B, PINK_A, rng.standard_normal((channels, n)), axis=1, zi=state)
            block = 0.03 * pink
            block += 0.1 * np.sin(2 * np.pi * 440 * t) * ((t % 300) < 3)
            block += 0.05 * np.sin(2 * np.pi * 1000 * t) * ((t % 61) < 0.5)
            out.write(block.T.astype(np.float32))


def peak_rss(audio: Path, model: Path, pythonpath: Path | None) -> tuple[float, float]:
    """(peak resident MB, wall seconds) of one `flam detect ... --json` process."""
    command = [sys.executable, "-m", "flam_core.cli", "--params", str(ROOT / "params.yaml"), "detect"]
    command += [str(audio), "-p", "dog", "-p", "siren", "--model", str(model.resolve()), "--json"]
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    with tempfile.TemporaryFile() as stderr:
        started = time.perf_counter()
        # Not from the repository root: `python -m` puts the working folder first on sys.path,
        # ahead of --pythonpath.
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=stderr, cwd=audio.parent, env=env
        )
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            stderr.seek(0)
            raise SystemExit(f"{' '.join(command)} failed:\n{stderr.read().decode()[-3000:]}")
    return usage.ru_maxrss / 1024, seconds  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path, help="a trained model folder")
    parser.add_argument("--workdir", type=Path, help="where to write the test files (kept)")
    parser.add_argument("--short-s", type=int, default=600)
    parser.add_argument("--long-s", type=int, default=7200)
    parser.add_argument("--pythonpath", type=Path, help="run another checkout of flam_core")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-memory-"))
    workdir.mkdir(parents=True, exist_ok=True)
    inputs = [
        (f"{args.short_s / 60:g} min, 16 kHz mono WAV", "short.wav", args.short_s, 16000, 1, "WAV"),
        (f"{args.long_s / 3600:g} h, 16 kHz mono WAV", "long.wav", args.long_s, 16000, 1, "WAV"),
        (f"{args.long_s / 3600:g} h, 48 kHz stereo FLAC", "long48.flac", args.long_s, 48000, 2, "FLAC"),
    ]
    try:
        rows = []
        for label, name, seconds, rate, channels, fmt in inputs:
            path = workdir / name
            if not path.is_file() or sf.info(str(path)).frames != seconds * rate:
                started = time.perf_counter()
                write_test_signal(path, seconds, rate, channels, fmt)
                took = time.perf_counter() - started
                print(f"wrote {path} ({path.stat().st_size / 1e6:.0f} MB) in {took:.0f} s")
            megabytes, wall = peak_rss(path, args.model, args.pythonpath)
            rows.append((label, path.stat().st_size / 1e6, megabytes, wall))
            print(f"{label}: peak RSS {megabytes:.0f} MB, {wall:.1f} s", flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    short_peak = rows[0][2]
    print(f"\n| input | file | peak RSS | vs {rows[0][0].split(',')[0]} | wall |\n|---|---|---|---|---|")
    for label, size, megabytes, wall in rows:
        print(
            f"| {label} | {size:.0f} MB | {megabytes:.0f} MB | {megabytes / short_peak:.2f}x | {wall:.0f} s |"
        )


if __name__ == "__main__":
    main()
