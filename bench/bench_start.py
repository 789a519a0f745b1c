"""Start-up time of `flam detect` on one 10 s file: a new process each run, as a user's shell
starts it, with the prompt cache empty (the text encoder loads) and full (it does not).

    python bench/bench_start.py --model models/flam [--runs 5] [--phases] [--bytecode compiled]

Each run is `flam detect <10 s wav> -p siren -p "dog barking" --model M --json`, timed from the
process start to its exit (wall), with the CPU seconds it used (user + system, its children
included). "uncached": the prompt cache (`FLAM_PROMPT_CACHE`) is emptied before every run;
"cached": it holds both prompts (one run fills it first). The page cache is warm (the same files
every run). Also checks what the user sees: stdout is the JSON detection and stderr is empty.
Prints one row per mode: median, min and max wall time and the median CPU time of the runs, and
the load average of the machine before the runs (other processes share its cores).

`--phases`: where the time of one cached detection goes, in a new process per run (median of
`--runs`): importing the CLI, torch and the detector's code, loading the model, the prompt
embeddings, and scoring the file, with the model's OpenMP threads spinning between operations
(the OpenMP default) and sleeping (`OMP_WAIT_POLICY=PASSIVE`, what `flam detect` sets).

`--bytecode compiled`: the bytecode of every module is compiled before the timed runs (into a
temporary `PYTHONPYCACHEPREFIX`, the environment untouched), as `make install` and the images
compile it at install; by default the modules are imported as the environment holds them (with
PYTHONDONTWRITEBYTECODE set and no bytecode installed, each process compiles them from source).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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

# One cached detection in phases, in a process of its own (argv: model folder, audio file, prompts).
PHASES = """
import json, sys, time
laps, last = {}, time.perf_counter()
def lap(name):
    global last
    now = time.perf_counter(); laps[name] = now - last; last = now
import flam_core.cli; lap("import flam_core.cli")
import torch; lap("import torch")
from flam_core.inference import FlamDetector; lap("import flam_core.inference")
detector = FlamDetector.from_dir(sys.argv[1], cache_prompts=True); lap("load the model")
detector.prompt_embeddings(sys.argv[3:]); lap("prompt embeddings (cached)")
detector.detect(sys.argv[2], sys.argv[3:]); lap("score the 10 s file")
print(json.dumps({"laps": laps, "text encoder loaded": "transformers" in sys.modules}))
"""


def _phases_command(model: Path, audio: Path) -> list[str]:
    return [sys.executable, "-c", PHASES, str(model), str(audio), *PROMPTS]


def _clip(path: Path) -> None:
    rng = np.random.default_rng(0)
    t = np.arange(10 * 16000) / 16000
    audio = 0.05 * rng.standard_normal(t.size) + 0.3 * np.sin(2 * np.pi * 700 * t) * (t > 4) * (t < 6)
    sf.write(path, audio.astype(np.float32), 16000)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(args: list[str], env: dict[str, str]) -> tuple[float, float, subprocess.CompletedProcess[str]]:
    """(wall seconds, CPU seconds, the finished process) of one run of `args`."""
    cpu, start = _children_cpu(), time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    return time.perf_counter() - start, _children_cpu() - cpu, done


def _compile_bytecode(env: dict[str, str], model: Path, audio: Path, cache: Path) -> None:
    """Write the bytecode of every module a detection imports, the text encoder's included (a
    detection with an empty prompt cache `cache`), under `env`'s PYTHONPYCACHEPREFIX."""
    command = [FLAM, "detect", str(audio), "-p", PROMPTS[0], "--model", str(model), "--json"]
    _, _, done = _run(command, {**env, "FLAM_PROMPT_CACHE": str(cache)})
    if done.returncode != 0:
        raise SystemExit(f"flam detect failed: {done.stderr}")


def _load() -> str:
    return "load average " + ", ".join(f"{x:.1f}" for x in os.getloadavg())


def start_up(base: dict[str, str], model: Path, audio: Path, cache: Path, runs: int) -> None:
    env = {**base, "FLAM_PROMPT_CACHE": str(cache)}
    prompts = [x for p in PROMPTS for x in ("-p", p)]
    command = [FLAM, "detect", str(audio), *prompts, "--model", str(model), "--json"]
    for mode in ("uncached", "cached"):
        walls, cpus = [], []
        if mode == "cached":
            _run(command, env)  # fills the cache
        load = _load()
        for _ in range(runs):
            if mode == "uncached":
                shutil.rmtree(cache, ignore_errors=True)
            wall, cpu, done = _run(command, env)
            if done.returncode != 0:
                raise SystemExit(f"flam detect failed: {done.stderr}")
            json.loads(done.stdout)  # stdout is the result, nothing else
            if done.stderr.strip():
                raise SystemExit(f"flam detect wrote to stderr: {done.stderr!r}")
            walls.append(wall)
            cpus.append(cpu)
        print(
            f"{mode:9s} wall median {statistics.median(walls):.2f} s (min {min(walls):.2f}, max "
            f"{max(walls):.2f}), CPU median {statistics.median(cpus):.2f} s; {runs} runs, stderr empty; "
            f"{load}",
            flush=True,
        )


def phases(base: dict[str, str], model: Path, audio: Path, cache: Path, runs: int) -> None:
    base = {k: v for k, v in base.items() if k != "OMP_WAIT_POLICY"}
    base["FLAM_PROMPT_CACHE"] = str(cache)
    subprocess.run(_phases_command(model, audio), env=base, capture_output=True, check=True)  # fills it
    for policy, env in (("spinning (default)", base), ("PASSIVE", {**base, "OMP_WAIT_POLICY": "PASSIVE"})):
        load = _load()
        done = [
            json.loads(
                subprocess.run(
                    _phases_command(model, audio),
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
            )
            for _ in range(runs)
        ]
        if any(run["text encoder loaded"] for run in done):
            raise SystemExit("a detection with its prompts in the cache loaded the text encoder")
        laps = [run["laps"] for run in done]
        print(f"OpenMP threads {policy}, median of {runs} processes ({load}):")
        for name in laps[0]:
            print(f"  {name:28s} {statistics.median(run[name] for run in laps):6.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--phases", action="store_true", help="Also time the phases of one detection.")
    parser.add_argument(
        "--bytecode",
        choices=("installed", "compiled"),
        default="installed",
        help="installed: import the modules as the environment holds them; compiled: compile the "
        "bytecode of every module first.",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="flam-start-") as tmp:
        audio, cache = Path(tmp) / "ten.wav", Path(tmp) / "prompts"
        _clip(audio)
        env = dict(os.environ)
        if args.bytecode == "compiled":
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "bytecode")
            _compile_bytecode(env, args.model, audio, Path(tmp) / "warm-up")
        start_up(env, args.model, audio, cache, args.runs)
        if args.phases:
            phases(env, args.model, audio, cache, args.runs)


if __name__ == "__main__":
    main()
