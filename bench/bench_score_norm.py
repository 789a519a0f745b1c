"""Cross-prompt score scales on the real-recording validation set (never the test set).

    python bench/bench_score_norm.py models/flam [data/val_real]

Every recording and clip of `val_real` is embedded once by the model and by the backbone's
AudioSet classifier; then each way of scoring a prompt is measured by the real-recording test's
own metrics (`flam_core.evaluation.real.evaluate_real_set`): macro and pooled frame AUROC (pooled: all
prompts' frames together, which asks whether one threshold can serve every prompt), event-found
rate, zero-shot top-1 / top-5 of the isolated clips over the set's labels. Then the prior's
weights at the params' floor and weight on the synthetic validation splits `val` and
`val_unseen` (macro and pooled frame AUROC). Scorings:

- `unbiased`: the head's `p / (p + sigmoid(beta))`, its per-prompt scale and bias predicted
  from the text; `logit`: `alpha * cos + beta`; `cosine`: the bare cosine;
- `cohort`: the cosine's z-score over the cohort of training frames
  (`flam_core.model.score_norm`, the moments `flam calibrate` computes; monotone, so the map
  to a probability does not change these figures);
- `audioset`: the AudioSet classifier baseline's prompt score (`flam_core.model.audioset`);
- `fused floor F w W`: the detector fused with the backbone's classifier
  (`flam_core.model.fusion`): logits floored at F, the classifier's part weighed W, the z-score
  of the sum over the same cohort (the library's own `cohort_moments`, fused), no prior;
- `fused floor F w W prior L`: the same plus L times the head's bias, the prompt's learned prior
  logit (`calibration.prior_weight`), at the params' floor and weight;
- `logit fused floor F w W`: the classifier's part added to `logit` in the head's own scale:
  `alpha * cos + beta + W * alpha * sigma_t * z_c`, with `z_c` the classifier part's z-score over
  the same fused cohort and `sigma_t` the cosine's cohort spread (so W weighs the two parts in
  cohort units, as in `fused`, while each prompt keeps its calibrated scale and bias).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from flam_core.calibrate import cohort_moments, cohort_rows
from flam_core.config import Params, load_params
from flam_core.data.mixer import Mixer
from flam_core.detection import Detection
from flam_core.evaluation.frames import frame_auroc, vocabulary_scores
from flam_core.evaluation.real import RealSet, evaluate_real_set
from flam_core.evaluation.splits import MixtureSplit
from flam_core.features import FeatureCache
from flam_core.inference import FlamDetector
from flam_core.model.audioset import audioset_model
from flam_core.model.flam import FlamModel
from flam_core.model.fusion import ClassifierFusion
from flam_core.model.score_norm import CohortNorm

FLOORS = (-20.0, -13.8, -10.0, -6.9, -4.6, -2.2)
WEIGHTS = (0.125, 0.25, 0.375, 0.5, 1.0)
PRIOR_WEIGHTS = (0.25, 0.5, 1.0, 2.0)


def _embed(detector: FlamDetector, path: Path) -> np.ndarray:
    _, blocks = detector.audio_blocks(path)
    return np.concatenate(list(detector.embed_blocks(blocks)))


class _Cached:
    """One scoring of every file, computed beforehand, as a system the real-recording test runs
    (`flam_core.evaluation.real.FileScorer`): its metrics, not a copy of them."""

    def __init__(self, scores: dict[str, np.ndarray], hop: float) -> None:
        self.scores, self.frame_hop_s = scores, hop

    def detect(self, audio: Path, prompts: list[str]) -> Detection:
        probs = self.scores[str(audio)]
        return Detection("bench", self.frame_hop_s, probs.shape[1] * self.frame_hop_s, prompts, probs, [])


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path)
    parser.add_argument("real", type=Path, nargs="?", default=Path("data/val_real"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    real = RealSet.read_for_choosing(args.real)  # never the test set
    params = load_params(args.params)
    calibration = params.calibration
    flam = FlamDetector.from_dir(args.model)
    flam.model.score_norm = None  # FLAM's own scores, whatever its calibration fused into them
    flam.model.fusion = None
    classifier = FlamDetector(audioset_model(params), params, {}, source="AudioSet classifier")
    prompts = real.labels
    text_emb, alpha, beta = flam.prompt_embeddings(prompts)
    weights, _, _ = classifier.prompt_embeddings(prompts)
    train = FeatureCache(Path(params.train.features_dir), "train")
    model = flam.model
    cohort: CohortNorm = cohort_moments(model, train, params)  # FLAM alone (model.fusion is None)
    mu, sigma = (x.float().numpy()[:, None] for x in cohort.moments(text_emb))
    files = [real.recordings.files[i] for i in real.recordings.audio_ids]
    files += [real.clips.files[i] for i in real.clips.audio_ids]
    # every file embedded once, with the classifier's raw logits after FLAM's embeddings
    model.fusion = ClassifierFusion.of(
        model.audio_encoder.yamnet.classifier, classifier.model.head.class_features
    )
    vectors = {str(path): torch.from_numpy(_embed(flam, path)) for path in files}
    prompt = torch.cat([text_emb, model.fusion.prompt_weights(model.text_encoder(prompts))], dim=1)
    d = model.head.config.embed_dim
    variants: dict[str, dict[str, np.ndarray]] = {}
    for path, vec in vectors.items():
        emb = vec[:, :d]
        cos = (emb @ text_emb.T).numpy().T
        row = {
            "unbiased": model.head.detector_scores(emb[None], text_emb, alpha, beta)[0].numpy(),
            "logit": alpha.numpy()[:, None] * cos + beta.numpy()[:, None],
            "cosine": cos,
            "cohort": (cos - mu) / sigma,
            "audioset": (_embed(classifier, path) @ weights.numpy().T).T,
        }
        for name, value in row.items():
            variants.setdefault(name, {})[path] = value
    raw = model.fusion
    cohorts: dict[float, CohortNorm] = {}  # the fused cohort at each floor
    for floor in sorted({*FLOORS, calibration.classifier_logit_floor}):
        model.fusion = replace(raw, floor=floor)
        fused = cohorts[floor] = cohort_moments(model, train, params)  # weights set per variant below
        center = fused.class_center
        c = prompt[:, d:].double()
        # the classifier part's cohort moments: its block of the fused cohort, as a cohort of its own
        classes = CohortNorm(fused.mean[d:], fused.cov[d:, d:], fused.n_frames)
        c_mu, c_sigma = (x.numpy()[:, None] for x in classes.moments(c))
        head_scale = alpha.numpy()[:, None] * sigma  # the logit's units per cohort z of the cosine
        for path, vec in vectors.items():
            logits = vec[:, d:].clamp_min(floor) - center
            frames = torch.cat([vec[:, :d], logits], dim=1)[None]
            z_c = ((logits.double() @ c.T).numpy().T - c_mu) / c_sigma
            for w in sorted({*WEIGHTS, calibration.classifier_weight}):
                z = replace(fused, weight=w, prior_weight=0.0).logits(frames, prompt, beta)[0].numpy()
                variants.setdefault(f"fused floor {floor} w {w}", {})[path] = z
                if (floor, w) == (calibration.classifier_logit_floor, calibration.classifier_weight):
                    for prior in PRIOR_WEIGHTS:
                        name = f"fused floor {floor} w {w} prior {prior}"
                        norm = replace(fused, weight=w, prior_weight=prior)
                        variants.setdefault(name, {})[path] = norm.logits(frames, prompt, beta)[0].numpy()
                logit = variants["logit"][path] + w * head_scale * z_c
                variants.setdefault(f"logit fused floor {floor} w {w}", {})[path] = logit
    print(
        f"{args.real}: {len(real.recordings.audio_ids)} recordings, {len(real.clips.audio_ids)} clips, "
        f"{len(prompts)} prompts; cohort {cohort.n_frames} frames of "
        f"{len(cohort_rows(train, params))} training mixtures"
    )
    print("| scoring | macro AUROC | pooled AUROC | event found | zero-shot top-1 | top-5 |")
    print("|---|---|---|---|---|---|")
    systems = {name: _Cached(scores, flam.frame_hop_s) for name, scores in variants.items()}
    measured = evaluate_real_set(systems, args.real)
    for name in systems:
        found, shot = measured[name]["recordings"], measured[name]["zero_shot"]
        figures = (
            found["frame_auroc_macro"],
            found["frame_auroc_pooled"],
            found["event_found"],
            shot["top1"],
            shot["top5"],
        )
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in figures) + " |")
    default = cohorts[calibration.classifier_logit_floor]
    model.fusion = replace(raw, floor=calibration.classifier_logit_floor).centred(default.class_center)
    _synthetic_rows(model, replace(default, weight=calibration.classifier_weight), params)


def _synthetic_rows(model: FlamModel, fused: CohortNorm, params: Params) -> None:
    """Macro and pooled frame AUROC on `val` and `val_unseen` of the fused cohort logit at each
    prior weight (0 and `PRIOR_WEIGHTS`)."""
    mixer = Mixer.for_library(params, Path(params.sources.out_dir))
    features, recipes = Path(params.train.features_dir), Path(params.synth.out_dir)
    splits = [MixtureSplit(params, name, features, mixer, recipes) for name in ("val", "val_unseen")]
    print("\n| prior weight | val macro / pooled AUROC | val_unseen macro / pooled AUROC |")
    print("|---|---|---|")
    for prior in (0.0, *PRIOR_WEIGHTS):
        model.score_norm = replace(fused, prior_weight=prior)
        cells = []
        for split in splits:
            logits = vocabulary_scores(model, split.cache, split.vocabulary, kind="logit")
            auroc = frame_auroc(split.truth, logits)
            cells.append(f"{auroc['macro']:.3f} / {auroc['micro']:.3f}")
        print(f"| {prior} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
