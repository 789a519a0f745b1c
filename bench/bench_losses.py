"""Peak memory and time of the frame-wise SED loss (forward + backward): chunked vs naive.

    python bench/bench_losses.py [--batch 512 --texts 2560 --frames 32 --dim 512]
                                 [--chunk-size 256] [--steps 2] [--threads 2]

Prints one JSON line. Defaults are the paper's per-device scale (B=512 audios, K=2560 texts =
5 per audio, L=32 frames, D=512); the naive `[B, K, L]` float32 logits alone are 160 MiB.

How memory is measured: each variant runs in a fresh subprocess (so one cannot inherit the
other's heap) with `MALLOC_MMAP_THRESHOLD_=65536`. A fixed threshold turns off glibc's dynamic
threshold, so every tensor buffer >= 64 KiB is its own `mmap`, unmapped as soon as the tensor
is freed: resident memory then follows the live tensor bytes instead of a heap that never
shrinks. After the inputs are built, the worker resets the kernel's peak-RSS counter
(`echo 5 > /proc/self/clear_refs`), runs one forward + backward, and reads the peak (`VmHWM`
in `/proc/self/status`). `peak_mib` = that peak minus the resident memory just before the step:
the tensors the loss itself allocates (activations, saved tensors, gradients), inputs excluded.
(`tracemalloc` does not see torch's allocator; the CPU profiler's memory events need a
bookkeeping pass and do not see non-tensor buffers such as BLAS workspaces.)

Agreement: both workers save the loss and the gradients w.r.t. frame_emb, text_emb and alpha;
the parent reports the largest relative difference. Time: the mean of `--steps` further steps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from flam_core.losses import sed_loss  # noqa: E402

MIB = 1024 * 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _inputs(batch: int, texts: int, frames: int, dim: int) -> dict[str, torch.Tensor]:
    """Seeded inputs: text k belongs to audio k // 5 and is active in ~30% of its frames."""
    gen = torch.Generator().manual_seed(0)
    frame_emb = F.normalize(torch.randn(batch, frames, dim, generator=gen), dim=-1)
    text_emb = F.normalize(torch.randn(texts, dim, generator=gen), dim=-1)
    alpha = 10 + torch.rand(texts, generator=gen)
    beta = -8 + torch.rand(texts, generator=gen)
    owner = torch.arange(texts) // max(texts // batch, 1)
    labels = (owner[None, :, None] == torch.arange(batch)[:, None, None]) & (
        torch.rand(batch, texts, frames, generator=gen) < 0.3
    )
    text_mask = torch.ones(texts, dtype=torch.bool)
    return {
        "frame_emb": frame_emb.requires_grad_(),
        "text_emb": text_emb.requires_grad_(),
        "alpha": alpha.requires_grad_(),
        "beta": beta.requires_grad_(),
        "labels": labels,
        "text_mask": text_mask,
    }


def _step(inputs: dict[str, torch.Tensor], chunk_size: int | None) -> torch.Tensor:
    for name in ("frame_emb", "text_emb", "alpha", "beta"):
        inputs[name].grad = None
    loss = sed_loss(**inputs, chunk_size=chunk_size)
    loss.backward()
    return loss.detach()


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    chunk_size = None if args.worker == "naive" else args.chunk_size
    inputs = _inputs(args.batch, args.texts, args.frames, args.dim)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (VmHWM)
    before_kib = _status_kib("VmRSS")
    start = time.perf_counter()
    loss = _step(inputs, chunk_size)
    first_s = time.perf_counter() - start
    peak_kib = _status_kib("VmHWM")
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        _step(inputs, chunk_size)
        times.append(time.perf_counter() - start)
    torch.save(
        {
            "loss": loss,
            "grads": {name: inputs[name].grad for name in ("frame_emb", "text_emb", "alpha")},
            "beta_grad_is_none": inputs["beta"].grad is None,
            "peak_mib": (peak_kib - before_kib) / 1024,
            "rss_before_mib": before_kib / 1024,
            "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "first_step_s": first_s,
            "step_s": sum(times) / len(times) if times else first_s,
        },
        args.out,
    )


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--texts", type=int, default=2560)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the measured one")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("naive", "chunked"):
            out = Path(tmp) / f"{variant}.pt"
            subprocess.run(
                [sys.executable, __file__, *sys.argv[1:], "--worker", variant, "--out", str(out)],
                check=True,
                env=env,
            )
            results[variant] = torch.load(out, weights_only=True)
    naive, chunked = results["naive"], results["chunked"]
    report = {
        "bench": "sed_loss_fwd_bwd",
        "shape": {"B": args.batch, "K": args.texts, "L": args.frames, "D": args.dim},
        "chunk_size": args.chunk_size,
        "threads": args.threads,
        "naive_logits_mib": args.batch * args.texts * args.frames * 4 / MIB,
        "naive_peak_mib": round(naive["peak_mib"], 1),
        "chunked_peak_mib": round(chunked["peak_mib"], 1),
        "peak_ratio": round(chunked["peak_mib"] / naive["peak_mib"], 3),
        "naive_step_s": round(naive["step_s"], 3),
        "chunked_step_s": round(chunked["step_s"], 3),
        "naive_maxrss_mib": round(naive["maxrss_mib"], 1),
        "chunked_maxrss_mib": round(chunked["maxrss_mib"], 1),
        "loss_naive": float(naive["loss"]),
        "loss_rel_diff": abs(float(chunked["loss"]) / float(naive["loss"]) - 1),
        "grad_rel_diff": {
            name: _rel_diff(chunked["grads"][name], naive["grads"][name]) for name in naive["grads"]
        },
        "beta_grad_none": bool(naive["beta_grad_is_none"] and chunked["beta_grad_is_none"]),
    }
    report["target_met"] = report["peak_ratio"] <= 0.25
    print(json.dumps(report))


if __name__ == "__main__":
    main()
