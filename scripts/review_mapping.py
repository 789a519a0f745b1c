"""Review a Debian package's label mapping against YAMNet's AudioSet classifier.

For every file that `flam_core/data/catalog/mappings/<package>.yaml` maps, print the mapped
label and kind next to the classifier's top classes (mean score over the clip's 0.96 s
patches), the duration and the level, and flag rows where no word of the label appears among
the top classes' names. A flag is a prompt to listen, not a verdict: AudioSet has no class
for many everyday labels ("footsteps on gravel" vs "Walk, footsteps" matches, "lava
bubbling" vs "Boiling" does not), so mislabels are judged by ear and by the package's credits,
and every fix or drop is noted in the mapping file.

    PYTHONPATH=. python scripts/review_mapping.py supertux-data [--top 3] [--tsv out.tsv]
        [--flagged-only] [--cache-dir DIR]

Needs the YAMNet weights (`scripts/convert_yamnet.py`), which also writes the class names
(`yamnet_class_map.csv`) next to them.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

import numpy as np
import torch

from flam_core.audio.io import read_audio
from flam_core.config import Params
from flam_core.data.catalog.debian import AUDIO_SUFFIXES, fetch_package, load_mapping, map_files
from flam_core.model.yamnet import default_weights_path, load_class_names, load_yamnet

RATE = 16000
MAX_SECONDS = 30.0  # longer files are reviewed on their first 30 s, as the library caps them
# Label words too generic to count as agreement with a class name.
STOP_WORDS = {"a", "an", "the", "of", "on", "in", "into", "with", "and", "at", "by", "from", "to", "being"}
STOP_WORDS |= {"sound", "someone", "something"}


def words(text: str) -> set[str]:
    """Lower-case word stems (plural and -ing endings cut) of `text`, without stop words."""
    stems = set()
    for word in re.findall(r"[a-z]+", text.lower()):
        if word in STOP_WORDS:
            continue
        for suffix in ("ing", "es", "s"):
            if word.endswith(suffix) and len(word) - len(suffix) >= 3:
                word = word[: -len(suffix)]
                break
        stems.add(word)
    return stems


def level_dbfs(samples: np.ndarray) -> tuple[float, float]:
    """(peak, RMS) in dBFS."""
    peak = float(np.max(np.abs(samples))) if samples.size else 0.0
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if samples.size else 0.0
    return 20 * np.log10(peak + 1e-12), 20 * np.log10(rms + 1e-12)


def review(package: str, cache_dir: Path, top: int) -> list[dict[str, object]]:
    """One row per mapped file: label, kind, file, duration, levels, top classes, flag."""
    mapping = load_mapping(package)
    root = fetch_package(package, cache_dir) / mapping.root
    relpaths = [
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()
    ]
    selected, report = map_files(mapping, relpaths, seed=0)
    weights = default_weights_path()
    names = load_class_names(weights)
    model = load_yamnet(weights)
    rows = []
    for rel, rule in selected:
        samples, _ = read_audio(root / rel, sample_rate=RATE)
        duration = len(samples) / RATE
        samples = samples[: int(MAX_SECONDS * RATE)]
        scores = model.predict_waveform(torch.from_numpy(np.ascontiguousarray(samples)))[0].mean(0).numpy()
        best = np.argsort(scores)[::-1][:top]
        top_names = [names[i] for i in best]
        peak, rms = level_dbfs(samples)
        agrees = bool(words(rule.label) & words(" ".join(top_names)))
        rows.append(
            {
                "file": rel,
                "label": rule.label,
                "kind": rule.kind,
                "duration_s": round(duration, 2),
                "peak_dbfs": round(peak, 1),
                "rms_dbfs": round(rms, 1),
                "top": "; ".join(f"{names[i]} {scores[i]:.2f}" for i in best),
                "flag": "" if agrees else "CHECK",
            }
        )
    print(
        f"{package}: {report.mapped} mapped, {report.excluded} excluded, {report.unmapped} unmapped"
        + (f" (e.g. {', '.join(report.unmapped_examples[:5])})" if report.unmapped else ""),
        file=sys.stderr,
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package")
    parser.add_argument("--top", type=int, default=3, help="classifier classes listed per file")
    parser.add_argument("--tsv", type=Path, help="also write the rows as a TSV file")
    parser.add_argument("--flagged-only", action="store_true", help="print only rows flagged CHECK")
    parser.add_argument("--cache-dir", type=Path, help="package cache (default: the params' cache_dir)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cache_dir = args.cache_dir or Params().cache_path
    rows = review(args.package, cache_dir, args.top)
    for row in rows:
        if args.flagged_only and not row["flag"]:
            continue
        print(
            f"{row['flag']:5} {row['label']:<32} {row['kind']:<10} {row['duration_s']:>6.2f}s "
            f"{row['rms_dbfs']:>6.1f}dB | {row['top']} | {row['file']}"
        )
    flagged = sum(1 for r in rows if r["flag"])
    print(f"{len(rows)} files, {flagged} flagged CHECK", file=sys.stderr)
    if args.tsv:
        with args.tsv.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["file"], delimiter="\t")
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
