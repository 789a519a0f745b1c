"""Where the detector misses events on real recordings (validation sets only: a test set is refused).

    python bench/bench_real_misses.py models/flam [data/val_real]

The real-recording test counts an event as found when its prompt scores higher somewhere inside
the label's spans than anywhere outside them in the recording (`flam_core.evaluation.real`).
This bench scores every recording of the set with the model as it ships (its calibration,
fused or not) and breaks the event-found rate down by what the recording asks of it:

- the share of the recording's frames the label sounds in;
- how many other labels sound in the same frames as the label (polyphony);
- for each miss, what sounds at the frame where the prompt scores highest outside the label:
  only the ambience, or another event; and then whether that event's label is among the
  prompt's `NEAR` nearest labels of the set in the text encoder's space (a near confusion:
  "recorder" firing on an ocarina) or not;
- the most frequent (prompt, label at the outside maximum) pairs of the misses.
"""

from __future__ import annotations

import argparse
from collections import Counter
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from flam_core.evaluation.frames import frame_truth
from flam_core.evaluation.real import RealSet, event_found
from flam_core.inference import FlamDetector

NEAR = 5
COVERAGE_BINS = (0.0, 0.05, 0.1, 0.2, 1.0)
POLYPHONY_BINS = (0.0, 1.0, 2.0, 4.0, np.inf)


def _table(title: str, values: np.ndarray, bins: tuple[float, ...], found: np.ndarray) -> None:
    print(f"\n| {title} | pairs | event found |\n|---|---|---|")
    for lo, hi in pairwise(bins):
        mask = (values >= lo) & ((values < hi) | (hi == bins[-1]))  # the last bin holds its end
        rate = f"{found[mask].mean():.3f}" if mask.any() else "-"
        print(f"| {lo:g}-{hi:g} | {mask.sum()} | {rate} |")


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path)
    parser.add_argument("real", type=Path, nargs="?", default=Path("data/val_real"))
    args = parser.parse_args()
    real = RealSet.read_for_choosing(args.real)  # never the test set
    detector = FlamDetector.from_dir(args.model)
    dataset, prompts = real.recordings, real.labels
    ambiences = set(real.summary["background_labels"])
    text = F.normalize(detector.model.text_encoder(prompts).float(), dim=-1)
    similarity = (text @ text.T).fill_diagonal_(-2.0)
    near = set()
    for k, row in enumerate(similarity.topk(NEAR, dim=1).indices.tolist()):
        near.update((k, j) for j in row)

    coverage, polyphony, kinds, confusions = [], [], [], Counter()
    for i in dataset.audio_ids:
        probs = detector.detect(dataset.files[i], prompts).probs
        truth = frame_truth(dataset.ground_truth[i], prompts, probs.shape[1], detector.frame_hop_s)
        events = truth & ~np.isin(np.asarray(prompts), list(ambiences))[:, None]
        for label in {e.label for e in dataset.ground_truth[i]} - ambiences:
            k = prompts.index(label)
            hit = event_found(probs[k], truth[k])
            if hit is None:
                continue
            inside, outside = truth[k], ~truth[k]
            coverage.append(inside.mean())
            polyphony.append((events[:, inside].sum(0) - 1).mean())
            if hit:
                kinds.append("found")
                continue
            frame = np.flatnonzero(outside)[probs[k][outside].argmax()]
            there = np.flatnonzero(events[:, frame]).tolist()
            if not there:
                kinds.append("ambience only")
                continue
            kinds.append("near event" if any((k, j) in near for j in there) else "other event")
            confusions.update((label, prompts[j]) for j in there if (k, j) in near)

    cov, poly, kind = map(np.asarray, (coverage, polyphony, kinds))
    found_arr = kind == "found"
    n_rec = len(dataset.audio_ids)
    print(
        f"{args.real}: {n_rec} recordings, {len(prompts)} prompts ({len(ambiences)} ambiences); "
        f"{len(found_arr)} (recording, event label) pairs, {len(found_arr) / n_rec:.1f} per "
        f"recording; event found {found_arr.mean():.3f}"
    )
    _table("the label's share of the recording's frames", cov, COVERAGE_BINS, found_arr)
    _table("other event labels sounding with it (mean over its frames)", poly, POLYPHONY_BINS, found_arr)
    misses = kind[kind != "found"]
    print(f"\n| the outside maximum of a missed event lies over | misses ({len(misses)}) |\n|---|---|")
    for name in ("ambience only", "near event", "other event"):
        print(f"| {name} | {(misses == name).mean():.3f} |")
    print(f"\nmost frequent near confusions (prompt -> a label among its {NEAR} nearest):")
    for (prompt, other), n in confusions.most_common(12):
        print(f"  {prompt} -> {other}: {n}")


if __name__ == "__main__":
    main()
