"""FLAM against FLAM-Global with the text encoder frozen or fine-tuned, on cached frame features.

    python bench/bench_text_finetune.py --features data/features \\
        --run "flam" --run "global:train.mode=global" \\
        --run "flam, text tuned:model.train_text_encoder=true,train.text_lr=2e-5" \\
        [-S key=value ...] [--json out.json]

Each `--run NAME[:key=value,...]` trains the head of `params.yaml` (plus `-S` overrides, then
the run's own) on the cached features of `--features` with `flam_core.train.train`, without an
MLflow run, and prints one Markdown row as soon as it ends: the quick validation (macro frame
AUROC on `val`, seen labels, and on `val_unseen`, labels never trained on), seconds per step
and the device. Fine-tuning MiniLM costs ~7x a frozen-encoder step on 2 CPU cores
(BENCHMARKS.md), so this is a GPU benchmark; `--steps` shortens it anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from flam_core.config import Params, load_params
from flam_core.train import TrainResult, train


def parse_run(spec: str) -> tuple[str, list[str]]:
    name, _, overrides = spec.partition(":")
    return name.strip(), [o.strip() for o in overrides.split(",") if o.strip()]


@contextlib.contextmanager
def trained(params: Params, features: Path) -> Iterator[tuple[TrainResult, Path]]:
    """Train `params` on the cached `features` into a temporary folder, without an MLflow run;
    yields the final metrics and the model folder, removed on exit."""
    with tempfile.TemporaryDirectory() as tmp:
        result = train(
            params,
            features_dir=features,
            out_dir=Path(tmp) / "model",
            report_dir=Path(tmp) / "reports",
            track=False,
        )
        assert result is not None  # one process
        yield result, Path(tmp) / "model"


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--features", type=Path, required=True, help="a `flam features` folder")
    parser.add_argument("--run", action="append", required=True, help="NAME[:key=value,...]")
    parser.add_argument("-S", dest="overrides", action="append", default=[], help="key=value for every run")
    parser.add_argument("--steps", type=int, help="train.steps for every run (default: params)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    common = args.overrides + ([f"train.steps={args.steps}"] if args.steps else [])
    rows = []
    print("| run | val AUROC | val_unseen AUROC | s/step | device |")
    print("|---|---|---|---|---|")
    for name, overrides in map(parse_run, args.run):
        params = load_params("params.yaml", overrides=common + overrides)
        with trained(params, args.features) as (metrics, _):
            row = {
                "run": name,
                "overrides": overrides,
                "val_auroc": metrics.validation["val_frame_auroc_macro"],
                "val_unseen_auroc": metrics.validation["val_unseen_frame_auroc_macro"],
                "s_per_step": round(metrics.train_seconds / metrics.steps, 4),
                "device": device_name(),
            }
        rows.append(row)
        print(
            f"| {name} | {row['val_auroc']:.3f} | {row['val_unseen_auroc']:.3f} | {row['s_per_step']:.3f} "
            f"| {row['device']} |",
            flush=True,
        )
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
