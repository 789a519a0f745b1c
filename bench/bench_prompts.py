"""Cost of new prompts in the text encoder: 1 vs N texts, batched as `TextEncoder.forward` encodes
them (the sorted set, in fixed batches) against one transformer call per text.

    python bench/bench_prompts.py [--n 200] [--repeats 3]

Needs no trained model: the packaged MiniLM text encoder alone. Prints the best of `--repeats`
runs for each way and size, and the extra cost of N prompts over one.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from flam_core.model.text_encoder import TextEncoder

WORDS = ("dog barking", "a siren wails", "glass breaking", "rain on a tin roof")


def prompts(n: int) -> list[str]:
    return [f"{WORDS[i % len(WORDS)]}, take {i} in a small room" for i in range(n)]


def best_of(repeats: int, run: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="prompts in the large request")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    encoder = TextEncoder()
    encoder(["warm up"])

    def batched(texts: list[str]) -> Callable[[], None]:
        def run() -> None:
            encoder._cache.clear()  # new prompts every run
            encoder(texts)

        return run

    def one_per_call(texts: list[str]) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                for text in texts:
                    encoder.encode([text])

        return run

    print(f"| way | 1 prompt (s) | {args.n} prompts (s) | extra for {args.n} (s) |")
    print("|---|---|---|---|")
    for name, way in (("one transformer call per text", one_per_call), ("batched (forward)", batched)):
        one = best_of(args.repeats, way(prompts(1)))
        many = best_of(args.repeats, way(prompts(args.n)))
        print(f"| {name} | {one:.3f} | {many:.2f} | {many - one:.2f} |")


if __name__ == "__main__":
    main()
