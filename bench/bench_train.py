"""Training throughput on this CPU: clips/s of one full step (forward, FLAM loss, backward, Adam)
for each audio encoder, at the default profile's batch (16 mixtures, 80 text slots, 10 s).

    python bench/bench_train.py [--steps 5] [--batch 16]

Encoders:
- `cached yamnet`: the CPU profile's path: frozen YAMNet's frame features come from the cache,
  only the head trains (context block, projections, scale/bias MLPs);
- `yamnet (frozen, on the fly)`: the same model computing YAMNet's features every step;
- `yamnet (fine-tuned)`, `cnn`, `htsat tiny`, `htsat base`: end to end from the waveform.
Prints one Markdown table row per encoder (the BENCHMARKS.md format).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from flam_core.config import load_params
from flam_core.train import build_loss, build_model, compute_loss

TEXTS = [f"sound number {i}" for i in range(80)]


def batch(params, n: int, cached_dim: int | None) -> dict:
    rng = np.random.default_rng(0)
    samples = int(params.synth.mixture_s * params.audio.sample_rate)
    slots = params.loader.texts_per_audio * n
    labels = torch.from_numpy(rng.uniform(size=(n, slots, params.frames.n_frames)) < 0.05)
    out = {
        "mixture_id": torch.arange(n),
        "texts": TEXTS[:slots],
        "text_labels": TEXTS[:slots],
        "text_mask": torch.ones(slots, dtype=torch.bool),
        "labels": labels,
    }
    if cached_dim:
        out["frame_features"] = torch.randn(n, params.frames.n_frames, cached_dim)
    else:
        out["audio"] = 0.1 * torch.randn(n, samples)
    return out


def measure(name: str, overrides: list[str], steps: int, n: int, cached_dim: int | None = None) -> None:
    params = load_params("params.yaml", overrides=overrides)
    model = build_model(params, cached_dim)
    loss_fn = build_loss(params)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-4)
    data = batch(params, n, cached_dim)
    model.train()
    timings = []
    for step in range(steps + 1):
        start = time.perf_counter()
        losses = compute_loss(model, loss_fn, data)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        if step:  # the first step warms caches up
            timings.append(time.perf_counter() - start)
    seconds = float(np.median(timings))
    count = sum(p.numel() for p in trainable)
    print(f"| {name} | {count / 1e6:.2f} M | {seconds:.3f} | {n / seconds:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}; batch {args.batch} x 10 s")
    print("| encoder | trainable parameters | s/step (median) | clips/s |")
    print("|---|---|---|---|")
    measure("cached yamnet (default CPU profile)", [], args.steps * 4, args.batch, cached_dim=1024)
    measure("yamnet (frozen, on the fly)", [], args.steps, args.batch)
    measure("yamnet (fine-tuned)", ["model.frozen_audio=false"], args.steps, args.batch)
    measure(
        "cnn (from scratch)", ["model.audio_encoder=cnn", "model.frozen_audio=false"], args.steps, args.batch
    )
    for size in ("tiny", "base"):
        measure(
            f"htsat {size} (48 kHz, from scratch)",
            ["profile=gpu", f"model.htsat_size={size}", "model.train_text_encoder=false"],
            max(2, args.steps // 2),
            args.batch // 2 if size == "base" else args.batch,
        )


if __name__ == "__main__":
    main()
