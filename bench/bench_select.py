"""Model selection figures on the validation splits only (never the test splits).

    python bench/bench_select.py models/flam models/global [more model folders]

For each trained model folder: macro frame AUROC of the unbiased scores on `val` (training
labels) and `val_unseen` (held-out labels, disjoint from `test_unseen`'s), label as prompt;
on `val_unseen` also its two parts, recognition (clip AUROC) and localisation (within-clip
AUROC; `flam_core.evaluation.frames.recognition_and_localisation`); and text<->audio
retrieval over the `val` + `val_unseen` mixtures, each captioned by its first
events' captions, exactly as stage `evaluate` does on the test splits.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flam_core.config import load_params
from flam_core.data.mixer import Mixer
from flam_core.evaluation.frames import frame_auroc, recognition_and_localisation, vocabulary_scores
from flam_core.evaluation.report import clip_retrieval
from flam_core.evaluation.splits import MixtureSplit
from flam_core.model.folder import load_model

KEYS = ("t2a_R@5", "t2a_mAP@10", "a2t_R@5")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    params = load_params(args.params)
    features, recipes = Path(params.train.features_dir), Path(params.synth.out_dir)
    mixer = Mixer.for_library(params, Path(params.sources.out_dir))
    splits = [MixtureSplit(params, name, features, mixer, recipes) for name in ("val", "val_unseen")]
    for folder in args.models:
        model, _, _ = load_model(folder)
        # Each split scored once: its frame AUROC and, on val_unseen, the AUROC's two parts.
        scores = {split.name: vocabulary_scores(model, split.cache, split.vocabulary) for split in splits}
        auroc = {split.name: frame_auroc(split.truth, scores[split.name])["macro"] for split in splits}
        parts = recognition_and_localisation(splits[1].truth, scores["val_unseen"])
        retrieval = clip_retrieval(model, splits, params.evaluation.caption_events)
        figures = {
            "val_auroc": round(auroc["val"], 4),
            "val_unseen_auroc": round(auroc["val_unseen"], 4),
            "val_unseen_clip_auroc": round(parts["clip"], 4),
            "val_unseen_within_clip_auroc": round(parts["within_clip"], 4),
        } | {key: retrieval[key] for key in KEYS}
        print(folder, json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
