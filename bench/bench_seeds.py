"""FLAM against FLAM-Global over training seeds: how much the claim's gap moves between runs.

    python bench/bench_seeds.py --features data/features --seeds 0 1 2 3 4 \\
        [--run "FLAM" --run "FLAM-Global:train.mode=global"] [-S key=value ...] [--steps N] \\
        [--json out.json]
    python bench/bench_seeds.py --summarise a.json b.json     # the summary of earlier runs

Each `--run NAME[:key=value,...]` (default: FLAM and FLAM-Global) trains the head of
`params.yaml` once per seed (`train.seed`) on the cached features of `--features`, with
`flam_core.train.train` and no MLflow run, and is scored from the same cache on `val_unseen`
and `test_unseen` (held-out labels, label as prompt, unbiased scores): macro frame AUROC and
its two parts, recognition (clip AUROC) and localisation (within-clip AUROC). These are the
figures `evaluate` reports for the test splits (its vocabulary is the cache's event labels).
One row is printed per training as it ends, then, per split, each run's mean +- standard
deviation over the seeds and the paired gap (first run minus second, same seed): mean, spread,
range and how many seeds reach +0.10. The frozen-encoder head trains in ~3.5 min on 2 CPU
cores and in ~25 s on a GPU (BENCHMARKS.md), so several seeds are a GPU job; they can be spread
over processes (`--seeds 0 1`, `--seeds 2 3`, each with its own `--json`) and summarised
together with `--summarise`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from bench_text_finetune import parse_run, trained  # bench/ is on the path of a bench script

from flam_core.config import load_params
from flam_core.evaluation.frames import (
    event_vocabulary,
    frame_auroc,
    recognition_and_localisation,
    truth_matrix,
    vocabulary_scores,
)
from flam_core.features import FeatureCache
from flam_core.model.folder import load_model

SPLITS = ("val_unseen", "test_unseen")
PARTS = ("frame", "clip", "within_clip")
TARGET = 0.10  # the claim: FLAM's unseen frame AUROC exceeds FLAM-Global's by >= 0.10


def score(model, features: Path) -> dict[str, dict[str, float]]:
    """Frame, clip and within-clip macro AUROC of `model` on each held-out split."""
    out = {}
    for split in SPLITS:
        cache = FeatureCache(features, split)
        vocabulary = event_vocabulary(cache)
        truth = truth_matrix(cache, vocabulary)
        scores = vocabulary_scores(model, cache, vocabulary)
        parts = recognition_and_localisation(truth, scores)
        out[split] = {"frame": frame_auroc(truth, scores)["macro"]} | parts
    return out


def summary(rows: list[dict], names: list[str]) -> list[str]:
    """Markdown lines: each run's mean +- std per split and part, then the paired gap."""
    lines = ["| split | run | frame AUROC | clip AUROC | within-clip AUROC |", "|---|---|---|---|---|"]
    by_run = {name: [r for r in rows if r["run"] == name] for name in names}
    for split in SPLITS:
        for name in names:
            cells = []
            for part in PARTS:
                values = np.array([r[split][part] for r in by_run[name]])
                cells.append(f"{values.mean():.3f} +- {values.std(ddof=1) if len(values) > 1 else 0:.3f}")
            lines.append(f"| {split} | {name} ({len(by_run[name])} seeds) | " + " | ".join(cells) + " |")
    if len(names) < 2:
        return lines
    first, second = names[0], names[1]
    seeds = sorted({r["seed"] for r in by_run[first]} & {r["seed"] for r in by_run[second]})
    lines += [
        "",
        f"| split | {first} minus {second}, paired by seed | mean +- std | min | max "
        f"| seeds >= +{TARGET:.2f} |",
        "|---|---|---|---|---|---|",
    ]
    for split in SPLITS:
        for part in PARTS:
            gap = np.array(
                [
                    next(r for r in by_run[first] if r["seed"] == s)[split][part]
                    - next(r for r in by_run[second] if r["seed"] == s)[split][part]
                    for s in seeds
                ]
            )
            spread = gap.std(ddof=1) if len(gap) > 1 else 0.0
            reached = f"{int((gap >= TARGET).sum())} of {len(gap)}" if part == "frame" else "-"
            label = part.replace("_", "-")
            lines.append(
                f"| {split} | {label} AUROC | {gap.mean():+.3f} +- {spread:.3f} | {gap.min():+.3f} "
                f"| {gap.max():+.3f} | {reached} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--features", type=Path, help="a `flam features` folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--run", action="append", help="NAME[:key=value,...] (default: FLAM, FLAM-Global)")
    parser.add_argument("-S", dest="overrides", action="append", default=[], help="key=value for every run")
    parser.add_argument("--steps", type=int, help="train.steps for every run (default: params)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--summarise", type=Path, nargs="+", help="print the summary of these --json files")
    args = parser.parse_args()
    if args.summarise:
        rows = [row for path in args.summarise for row in json.loads(path.read_text())]
        print("\n".join(summary(rows, list(dict.fromkeys(row["run"] for row in rows)))))
        return
    if args.features is None:
        parser.error("--features is required to train")
    runs = [parse_run(spec) for spec in args.run or ["FLAM", "FLAM-Global:train.mode=global"]]
    common = args.overrides + ([f"train.steps={args.steps}"] if args.steps else [])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"device: {device}")
    columns = " | ".join(f"{split} frame / clip / within-clip" for split in SPLITS)
    print(f"| run | seed | {columns} | s/step |")
    print("|---|---|---|---|---|")
    rows = []
    for seed in args.seeds:
        for name, overrides in runs:
            params = load_params("params.yaml", overrides=common + overrides + [f"train.seed={seed}"])
            with trained(params, args.features) as (metrics, folder):
                figures = score(load_model(folder)[0], args.features)
            row = {"run": name, "seed": seed, "overrides": overrides, "device": device}
            row |= {"s_per_step": round(metrics["train_seconds"] / metrics["steps"], 4)} | figures
            rows.append(row)
            cells = [" / ".join(f"{figures[s][p]:.3f}" for p in PARTS) for s in SPLITS]
            print(f"| {name} | {seed} | {cells[0]} | {cells[1]} | {row['s_per_step']:.3f} |", flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=2))
    print()
    print("\n".join(summary(rows, [name for name, _ in runs])))


if __name__ == "__main__":
    main()
