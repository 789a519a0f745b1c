"""Training throughput: clips/s of one full step (forward, FLAM loss, backward, optimiser step)
for each audio encoder, at the default profile's batch (16 mixtures, 80 text slots, 10 s).

    python bench/bench_train.py [--steps 5] [--batch 16]
    python bench/bench_train.py --gpu-profile [--steps 5] [--batch 64]     # a GPU machine
    python bench/bench_train.py --modes [--steps 5]     # the cached head: FLAM, FLAM-Global, MGA-CLAP

`--gpu-profile` measures what `profile: gpu` trains instead: HTSAT-base from the waveform at
48 kHz, 64 mixtures and 320 text slots a step, MiniLM on the device, with torch Adam (float32
weights; the forward pass and loss in float32, then under bf16 autocast) and through the
DeepSpeed engine of `train.backend=deepspeed` (one process), as `flam train` runs it: the
profile's `infra/deepspeed/zero2.json` (ZeRO-2, bf16), then copies of it with ZeRO-0 in bf16
and ZeRO-2 in float32, which tell the cost of ZeRO-2's partitioning from that of bf16.

Encoders:
- `cached yamnet`: the CPU profile's path: frozen YAMNet's frame features come from the cache,
  only the head trains (context block, projections, scale/bias MLPs);
- `yamnet (frozen, on the fly)`: the same model computing YAMNet's features every step;
- `yamnet (fine-tuned)`, `cnn`, `htsat tiny`, `htsat base`: end to end from the waveform.
`--modes` measures the default CPU profile's cached path once per model of the comparison
(`train.mode` flam, global, mga_clap: FLAM's three terms, FLAM-Global's CLIP term, MGA-CLAP's
codebook, locality-aware block and hard-negative loss), the teacher left out of all three.
Prints one Markdown table row per encoder (the BENCHMARKS.md format).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from flam_core.config import load_params
from flam_core.train import (
    build_loss,
    build_model,
    compute_loss,
    deepspeed_config,
    resolve_device,
    start_runtime,
    to_device,
)


def batch(params, n: int, cached_dim: int | None) -> dict:
    rng = np.random.default_rng(0)
    samples = int(params.synth.mixture_s * params.audio.sample_rate)
    slots = params.loader.texts_per_audio * n
    texts = [f"sound number {i}" for i in range(slots)]
    labels = torch.from_numpy(rng.uniform(size=(n, slots, params.frames.n_frames)) < 0.05)
    out = {
        "mixture_id": torch.arange(n),
        "texts": texts,
        "text_labels": texts,
        "text_mask": torch.ones(slots, dtype=torch.bool),
        "labels": labels,
    }
    if cached_dim:
        out["frame_features"] = torch.randn(n, params.frames.n_frames, cached_dim)
    else:
        out["audio"] = 0.1 * torch.randn(n, samples)
    return out


def measure(
    name: str,
    overrides: list[str],
    steps: int,
    n: int,
    cached_dim: int | None = None,
    engine: bool = False,
    autocast: torch.dtype | None = None,
) -> None:
    """Print one row: the median seconds of `steps` timed steps after one warm-up step.

    `engine`: step through the DeepSpeed engine of `train.backend=deepspeed` (its config from
    `train.deepspeed_config`, completed as `flam train` completes it) instead of torch Adam.
    `autocast`: run the forward pass and the loss under `torch.autocast` in that dtype (the
    weights, gradients and Adam states stay float32).
    """
    params = load_params("params.yaml", overrides=[*overrides, f"loader.batch_size={n}"])
    model = build_model(params, cached_dim)
    loss_fn = build_loss(params)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-4)
    if engine:
        import deepspeed

        device = start_runtime(params).device
        forward, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(params)
        )
    else:
        device = resolve_device(params.train.device)
        forward = model.to(device)
    data = to_device(batch(params, n, cached_dim), device)
    model.train()
    timings = []
    for step in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            losses = compute_loss(forward, loss_fn, data)
        if engine:
            forward.backward(losses["loss"])
            forward.step()
        else:
            optimizer.zero_grad()
            losses["loss"].backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step:  # the first step warms caches up
            timings.append(time.perf_counter() - start)
    seconds = float(np.median(timings))
    count = sum(p.numel() for p in trainable)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"| {name} | {count / 1e6:.2f} M | {seconds:.3f} | {n / seconds:.1f} | {where} |", flush=True)
    del forward, model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()


@torch.no_grad()
def head_inference_ms(overrides: list[str], clips: int = 64, prompts: int = 20, repeats: int = 20) -> float:
    """Median milliseconds of what evaluation and detection run on the head for cached frame
    features: the prompts' embeddings, scale and bias (text features given), every frame's
    detector score and every clip's embedding; the encoders are left out."""
    params = load_params("params.yaml", overrides=overrides)
    head = build_model(params, 1024).head.eval()
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(clips, params.frames.n_frames, 1024, generator=generator)
    text_features = torch.randn(prompts, 384, generator=generator)
    timings = []
    for step in range(repeats + 1):
        start = time.perf_counter()
        text_emb = head.text_embeddings(text_features)
        alpha, beta = head.text_scale_bias(text_features)
        frames = head.contextualise(features)
        head.detector_scores(head.frame_embeddings(frames), text_emb, alpha, beta)
        head.global_embedding(frames)
        if step:
            timings.append(time.perf_counter() - start)
    return 1000 * float(np.median(timings))


def deepspeed_variant(base: str, folder: Path, stage: int, bf16: bool) -> str:
    """The override `train.deepspeed_config=` a copy of the DeepSpeed JSON `base` with ZeRO
    `stage` and bf16 on or off, written into `folder`."""
    config = json.loads(Path(base).read_text())
    config.setdefault("zero_optimization", {})["stage"] = stage
    config["bf16"] = {"enabled": bf16}
    path = folder / f"zero{stage}-{'bf16' if bf16 else 'fp32'}.json"
    path.write_text(json.dumps(config, indent=2))
    return f"train.deepspeed_config={path}"


def gpu_rows(common: list[str], steps: int, n: int) -> None:
    """The rows of `--gpu-profile`: torch Adam in float32 and under bf16 autocast, then the
    DeepSpeed engine with the profile's config and two copies of it that change one thing each."""
    gpu = ["profile=gpu", "model.htsat_size=base", *common]
    measure("htsat base, torch Adam, float32", gpu, steps, n)
    measure("htsat base, torch Adam, bf16 autocast", gpu, steps, n, autocast=torch.bfloat16)
    base = load_params("params.yaml", overrides=gpu).train.deepspeed_config
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        folder = Path(tmp)
        configs = {
            "ZeRO-2, bf16": [],  # the profile's own
            "ZeRO-0, bf16": [deepspeed_variant(base, folder, stage=0, bf16=True)],
            "ZeRO-2, float32": [deepspeed_variant(base, folder, stage=2, bf16=False)],
        }
        for name, config in configs.items():
            measure(f"htsat base, DeepSpeed {name}", [*gpu, *config], steps, n, engine=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, help="mixtures a step (default 16; 64 with --gpu-profile)")
    parser.add_argument("--gpu-profile", action="store_true", help="the GPU profile's model and batch")
    parser.add_argument("--modes", action="store_true", help="the cached head for flam, global and mga_clap")
    parser.add_argument("-S", dest="overrides", action="append", default=[], help="key=value for every row")
    args = parser.parse_args()
    common = args.overrides
    print(f"torch threads: {torch.get_num_threads()}")
    print("| encoder | trainable parameters | s/step (median) | clips/s | device |")
    print("|---|---|---|---|---|")
    if args.gpu_profile:
        gpu_rows(common, args.steps, args.batch or 64)
        return
    n = args.batch or 16
    if args.modes:
        modes = ("flam", "global", "mga_clap")
        for mode in modes:
            name = f"cached yamnet, train.mode={mode}"
            measure(name, [f"train.mode={mode}", *common], args.steps * 4, n, cached_dim=1024)
        print("\n| model | head inference, 64 clips x 20 prompts (ms, median) |\n|---|---|")
        for mode in modes:
            print(f"| train.mode={mode} | {head_inference_ms([f'train.mode={mode}', *common]):.1f} |")
        return
    measure("cached yamnet (default CPU profile)", common, args.steps * 4, n, cached_dim=1024)
    measure("yamnet (frozen, on the fly)", common, args.steps, n)
    measure("yamnet (fine-tuned)", ["model.frozen_audio=false", *common], args.steps, n)
    cnn = ["model.audio_encoder=cnn", "model.frozen_audio=false", *common]
    measure("cnn (from scratch)", cnn, args.steps, n)
    for size in ("tiny", "base"):
        measure(
            f"htsat {size} (48 kHz, from scratch)",
            ["profile=gpu", f"model.htsat_size={size}", "model.train_text_encoder=false", *common],
            max(2, args.steps // 2),
            n // 2 if size == "base" else n,
        )


if __name__ == "__main__":
    main()
