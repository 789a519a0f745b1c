"""Training: one loop, read top to bottom.

    batch -> frame features (cached, or the audio encoder) -> temporal context
          -> frame + global embeddings; texts -> text features -> embeddings, alpha, beta
          -> FlamLoss (CLIP + 200 * frame SED + prior) -> Adam step (warm-up, linear decay)

The CPU profile trains the head on cached frozen-backbone features; with `model.frozen_audio`
false (or the `cnn` encoder) the audio encoder trains too, on mixtures mixed on the fly.
Checkpoints (model, optimiser, schedule, RNG states, data position) are written atomically
every `train.checkpoint_every` steps; `resume=True` continues from the last one and gives the
same losses as an uninterrupted run. A non-finite loss stops training with the step and the
batch's mixture ids, leaving the last good checkpoint in place. A folder that already holds a
run (`checkpoints/` or `model.pt`) is never trained over silently: pass `resume=True` to
continue it or `overwrite=True` to start it again.

Checkpoints hold only tensors and plain containers (RNG states as tensors and numbers), and
every file is read back with `torch.load(weights_only=True)`: loading a checkpoint, or a
`train.init_from` model, never runs code from the file.

Outputs in `train.out_dir`: `model.pt` (head, and the audio encoder when trained),
`config.json` (resolved parameters, head config, encoder and text-encoder references),
`metrics.json`, and `checkpoints/`. The loss curve goes to `reports/train/loss.csv` (a DVC
plot), appended as training goes so that it survives a crash (`LossLog`), and, with the
parameters and system facts, to MLflow.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import pickle
import platform
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from flam_core.config import Params
from flam_core.data.loader import Collate, IndexedDataset, make_loader, text_vocabulary
from flam_core.errors import ConfigError, DataError, FlamError
from flam_core.features import FeatureCache
from flam_core.losses import (
    FlamLoss,
    all_gather_with_grad,
    gather_texts,
    remote_labels,
    soft_frame_loss,
    soft_prior_loss,
)
from flam_core.model.flam import FlamModel, build_model
from flam_core.model.folder import load_trainable_state, save_model, trainable_state
from flam_core.teacher import AudioSetTeacher
from flam_core.utils import atomic_dir, atomic_write_text, interactive

MAX_LOGIT_SCALE = 100.0
RUN_OUTPUTS = ("checkpoints", "model.pt", "config.json", "metrics.json")  # what a run writes in out_dir

log = logging.getLogger("flam.train")


class TrainingDiverged(FlamError):
    """The loss became NaN or infinite."""


@dataclass(frozen=True)
class TrainResult:
    """The final metrics of a training run; `to_json()` is its `metrics.json`.

    `validation` holds `quick_validation`'s figures (`val_frame_auroc_micro`, ...), present only
    when the run completed `train.steps` on cached features; `to_json()` puts them beside the
    fixed keys, as metrics.json and MLflow have them.
    """

    steps: int
    train_seconds: float
    final_loss: float  # mean loss of the last `train.log_every` steps
    first_loss: float  # mean loss of the first `train.log_every` steps
    validation: dict[str, float | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "train_seconds": self.train_seconds,
            "final_loss": self.final_loss,
            "first_loss": self.first_loss,
        } | self.validation

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> TrainResult:
        """The result of a `metrics.json` (`to_json()`'s output)."""
        fixed = ("steps", "train_seconds", "final_loss", "first_loss")
        missing = [key for key in fixed if key not in record]
        if missing:
            raise DataError(f"training metrics without {missing}: not a metrics.json of `flam train`")
        return cls(
            steps=int(record["steps"]),
            train_seconds=float(record["train_seconds"]),
            final_loss=float(record["final_loss"]),
            first_loss=float(record["first_loss"]),
            validation={k: v for k, v in record.items() if k not in fixed},
        )


@dataclass
class Position:
    """Where training is: optimiser steps done, epoch, and batches consumed in that epoch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


def build_loss(params: Params) -> FlamLoss:
    train = params.train
    return FlamLoss(
        # FLAM-Global and MGA-CLAP train with their clip-level term only; the ablations are FLAM's
        mode=train.mode if train.mode in ("global", "mga_clap") else "flam",
        w_clip=train.w_clip,
        w_sed=train.w_sed,
        w_prior=0.0 if train.mode == "no_prior_loss" else train.w_prior,
        chunk_size=train.loss_chunk or None,
        hard_negative_strength=train.mga_hard_negative_beta,
    )


@dataclass(frozen=True)
class TeacherTerms:
    """The teacher's place in the objective: its classifier and the weights of its two terms."""

    teacher: AudioSetTeacher
    w_frames: float
    w_prior: float


def build_teacher(params: Params, items: Any) -> TeacherTerms | None:
    """The AudioSet teacher when `train.w_teacher` > 0 and the model trains on cached YAMNet
    features (the classifier reads those); None otherwise, and for FLAM-Global and MGA-CLAP,
    which have no frame term to teach."""
    cfg = params.train
    cached_yamnet = isinstance(items, FeatureCache) and params.model.audio_encoder == "yamnet"
    if cfg.w_teacher == 0 or cfg.mode in ("global", "mga_clap") or not cached_yamnet:
        return None
    return TeacherTerms(AudioSetTeacher.load(cfg.teacher_texts), cfg.w_teacher, cfg.w_teacher_prior)


def compute_loss(
    model: FlamModel,
    loss_fn: FlamLoss,
    batch: dict[str, Any],
    distributed: bool = False,
    teacher: TeacherTerms | None = None,
) -> dict[str, torch.Tensor]:
    """The objective on one batch. `distributed`: score local audios against every rank's texts.

    Data-parallel ranks exchange text embeddings with alpha and beta (never logits), label the
    gathered texts against the local mixtures by label identity, and gather the global audio
    embeddings for the CLIP term (see `flam_core.losses`). With a `teacher`, its class names are
    scored in the same forward pass as the batch's texts and trained on the classifier's frame
    posteriors (`flam_core.teacher`); they take no part in the CLIP term.
    """
    logit_scale = model.head.logit_scale[0].exp().clamp(max=MAX_LOGIT_SCALE)
    if distributed:
        texts = list(batch["texts"])  # the padded buffer: every rank has the same K
    else:
        n_texts = int(batch["text_mask"].sum())
        if n_texts == 0:
            raise DataError(f"batch of mixtures {batch['mixture_id'].tolist()} has no text: no event labels")
        texts = batch["texts"][:n_texts]
    n = len(texts)
    if teacher is not None:  # the same number of class names on every rank, scored locally
        class_names, targets = teacher.teacher.targets(batch["frame_features"])
        texts = texts + class_names
    out = model(batch, texts)
    if not distributed:
        losses = loss_fn(
            audio_emb=out.global_emb,
            text_emb=out.text_emb[:n],
            labels=batch["labels"][:, :n],
            text_mask=torch.ones(n, dtype=torch.bool, device=out.text_emb.device),
            logit_scale=logit_scale,
            frame_emb=out.frame_emb,
            alpha=out.alpha[:n],
            beta=out.beta[:n],
        )
    else:
        gathered = gather_texts(
            out.text_emb[:n], out.alpha[:n], out.beta[:n], batch["text_labels"], batch["text_mask"]
        )
        device = out.frame_emb.device
        labels = remote_labels(batch["frame_labels"], gathered.text_labels).to(device)
        positives = all_gather_with_grad(labels.any(-1).to(torch.uint8)).bool()
        losses = loss_fn(
            audio_emb=all_gather_with_grad(out.global_emb),
            positives=positives,
            text_emb=gathered.text_emb,
            labels=labels,
            text_mask=gathered.text_mask.to(device),
            logit_scale=logit_scale,
            frame_emb=out.frame_emb,
            alpha=gathered.alpha,
            beta=gathered.beta,
        )
    if teacher is None:
        return losses
    # Local to each rank, like the rest of a rank's loss: data-parallel training averages them.
    frames = soft_frame_loss(out.frame_emb, out.text_emb[n:], out.alpha[n:], out.beta[n:], targets)
    prior = soft_prior_loss(out.beta[n:], targets)
    loss = losses.pop("loss") + teacher.w_frames * frames + teacher.w_prior * prior
    return {"loss": loss, **losses, "teacher": frames.detach(), "teacher_prior": prior.detach()}


def param_groups(model: FlamModel, lr: float, text_lr: float | None) -> list[dict[str, Any]]:
    """Adam's parameter groups: the text encoder at `text_lr` (when trained and set), the rest at `lr`.

    A pretrained transformer fine-tuned at the head's learning rate forgets what it knew; the
    usual remedy is a rate 10-100x lower for the encoder than for the freshly initialised head.
    """
    text = [p for p in model.text_encoder.parameters() if p.requires_grad]
    ids = {id(p) for p in text}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    if not text or text_lr is None:
        return [{"params": rest + text, "lr": lr}]
    return [{"params": rest, "lr": lr}, {"params": text, "lr": text_lr}]


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1 over `warmup` steps, then linear decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _train_loader(
    params: Params, features_dir: Path | None, library_dir: Path, recipes_dir: Path, rank: int, world: int
) -> DataLoader:
    loader = params.loader
    if features_dir is not None:
        cache = FeatureCache(features_dir, "train")
        dataset = IndexedDataset(cache, shuffle=loader.shuffle, seed=loader.seed, rank=rank, world_size=world)
        collate = Collate(
            loader.texts_per_audio,
            loader.batch_size,
            background_texts=loader.background_texts,
            negative_texts=loader.negative_texts,
            vocabulary=(
                text_vocabulary((labels for _, labels in cache.labels), loader.background_texts)
                if loader.negative_texts
                else None
            ),
            seed=loader.seed,
        )
        # Its own generator: creating an iterator must not draw from the global RNG, or the
        # batches skipped on resume would shift the dropout masks of a resumed run.
        generator = torch.Generator().manual_seed(loader.seed)
        return DataLoader(
            dataset, batch_size=loader.batch_size, collate_fn=collate, num_workers=0, generator=generator
        )
    on_the_fly = params.model_copy(update={"loader": loader.model_copy(update={"features": False})})
    return make_loader(on_the_fly, "train", library_dir, recipes_dir, rank=rank, world_size=world)


def _captions(cache: FeatureCache, backgrounds: bool = False) -> list[str]:
    """Every caption the loader can put in a text buffer of this split (`backgrounds`: with
    `loader.background_texts`)."""
    return sorted(
        {
            c
            for _, labels in cache.labels
            for c, event in zip(labels.captions, labels.is_event, strict=True)
            if event or backgrounds
        }
    )


def _check_trainable(loader: DataLoader) -> None:
    """Fail before any step when the train split is empty or names no event label."""
    items = loader.dataset.items  # type: ignore[attr-defined]
    if len(items) == 0:
        raise DataError("the train split is empty: no mixture to train on")
    if isinstance(items, FeatureCache):
        has_events = any(labels.is_event.any() for _, labels in items.labels)
    else:
        has_events = bool(items.plan.is_event.any())
    if not has_events:
        raise DataError("the train split has no event label: every text buffer would be empty")


def _batches(loader: DataLoader, position: Position) -> Iterator[dict[str, Any]]:
    """Endless batches from `position` on; skips the batches of the current epoch already used."""
    while True:
        loader.dataset.set_epoch(position.epoch)  # type: ignore[attr-defined]
        for index, batch in enumerate(loader):
            if index < position.batch_in_epoch:
                continue
            position.batch_in_epoch = index + 1
            yield batch
        position.epoch += 1
        position.batch_in_epoch = 0


def _save_checkpoint(
    folder: Path,
    model: FlamModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    position: Position,
    runtime: Runtime,
    keep: int = 2,
) -> None:
    """`folder/step-NNNNNNN/`, complete or absent: written under a staging name, then renamed."""
    name = f"step-{position.step:07d}"
    rng = {"rng": rng_state(runtime.device)}
    if runtime.engine is None:
        with atomic_dir(folder / name) as staging:
            state = {
                "model": trainable_state(model),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "position": vars(position).copy(),
            }
            torch.save(state | rng, staging / "state.pt")
    else:
        # DeepSpeed: every rank writes its shard of the (ZeRO-partitioned) optimizer state.
        staging = f".staging-{name}"
        runtime.engine.save_checkpoint(
            str(folder), tag=staging, client_state={"position": vars(position).copy()}, save_latest=False
        )
        torch.save(rng, folder / staging / f"rng-rank{runtime.rank}.pt")
        runtime.barrier()
        if runtime.main:
            if (folder / name).exists():
                shutil.rmtree(folder / name)
            (folder / staging).rename(folder / name)
        runtime.barrier()
    if runtime.main:
        for old in sorted(folder.glob("step-*"))[:-keep]:
            shutil.rmtree(old)


def _load_checkpoint(
    checkpoint: Path,
    model: FlamModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    runtime: Runtime,
) -> Position:
    """Restore model, optimiser, schedule and RNG states from `checkpoint`; its data position."""
    if runtime.engine is None:
        state = _safe_load(checkpoint / "state.pt")
        load_trainable_state(model, state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    else:
        _, state = runtime.engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
        state |= _safe_load(checkpoint / f"rng-rank{runtime.rank}.pt")
    if "rng" not in state:
        raise DataError(
            f"{checkpoint} was written by an older version of flam (pickled RNG states): "
            "train again with --overwrite"
        )
    set_rng_state(state["rng"], runtime.device)
    return Position(**{k: int(v) for k, v in state["position"].items()})


def _safe_load(path: Path) -> Any:
    """`torch.load` of a file this module wrote: tensors and plain containers only, never code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise DataError(
            f"{path} holds objects other than tensors and plain containers ({_refused(exc)}), which are "
            "not loaded: a checkpoint of an older version of flam, or not one of ours"
        ) from exc


def _refused(exc: pickle.UnpicklingError) -> str:
    """What a weights-only load refused, from torch's message (whose advice to turn the
    weights-only check off is no option here)."""
    found = re.search(r"unsupported (?:global: )?GLOBAL (\S+)", str(exc), re.IGNORECASE)
    return f"GLOBAL {found.group(1)}" if found else str(exc).splitlines()[0]


def _safe_deepspeed_checkpoints(engine: Any) -> None:
    """Make `engine` read its checkpoints with `torch.load(weights_only=True)`.

    DeepSpeed's default checkpoint engine unpickles them whole, any Python object included. Every
    checkpoint engine's `load` is one `torch.load` of a file, so the engine's `load` is replaced
    by one that admits tensors, plain containers and the few DeepSpeed types that its ZeRO
    optimizer states hold (`deepspeed_checkpoint_types`), all plain data.
    """
    engine.checkpoint_engine.load = load_deepspeed_file


def load_deepspeed_file(path: str, map_location: Any = None) -> Any:
    with torch.serialization.safe_globals(deepspeed_checkpoint_types()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise DataError(
                f"{path} holds objects other than tensors and DeepSpeed's own types ({_refused(exc)}), "
                "which are not loaded"
            ) from exc


def deepspeed_checkpoint_types() -> list[Any]:
    """The types other than tensors and containers in the ZeRO checkpoints of DeepSpeed: loss
    scalers (numbers and a dtype), fragment addresses (two ints) and the ZeRO stage (an enum)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def rng_state(device: torch.device) -> dict[str, Any]:
    """The RNG states a resumed run needs, as tensors and numbers (loadable with weights_only).

    torch's CPU (and the training device's CUDA) generator drive dropout; numpy's global
    MT19937 is kept too, as its key (a tensor) and scalars.
    """
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    key = numpy["key"].numpy().astype(np.uint32)
    np.random.set_state((numpy["kind"], key, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint folder (`step-*`) in `folder`, if any."""
    found = sorted(Path(folder).glob("step-*"))
    return found[-1] if found else None


@dataclass
class Runtime:
    """Where training runs: the device, the data-parallel rank and world, the DeepSpeed engine."""

    device: torch.device
    rank: int = 0
    world: int = 1
    engine: Any = None  # deepspeed.DeepSpeedEngine with train.backend=deepspeed
    zero_stage: int = 0
    dtype: torch.dtype = torch.float32

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean over ranks of a small tensor (the logged loss terms)."""
        if self.world == 1:
            return values
        values = values.clone()
        torch.distributed.all_reduce(values)
        return values / self.world


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise FlamError("train.device=cuda but no CUDA device is visible")
    return torch.device(name)


def deepspeed_config(params: Params, path: Path | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON of `train.deepspeed_config`, completed from params.

    The training loop owns the optimiser (torch Adam) and the schedule, so the JSON must not
    declare them; the micro batch is `loader.batch_size` and gradient clipping `train.grad_clip`.
    bf16 is switched off on CPU devices (5x slower than fp32 there, ENVIRONMENT.md).
    """
    path = Path(path or params.train.deepspeed_config)
    if not path.is_file():
        raise FlamError(f"train.deepspeed_config: no such file {path}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FlamError(f"train.deepspeed_config {path}: not valid JSON ({exc})") from exc
    for owned in ("optimizer", "scheduler"):
        if owned in config:
            raise FlamError(
                f"{path}: remove the {owned!r} section; training creates its own (train.lr, warm-up)"
            )
    config.pop("train_batch_size", None)
    config["train_micro_batch_size_per_gpu"] = params.loader.batch_size
    config["gradient_clipping"] = params.train.grad_clip
    config["zero_allow_untested_optimizer"] = True  # torch Adam under ZeRO
    if resolve_device(params.train.device).type == "cpu":
        config["bf16"] = {"enabled": False}
        config.pop("fp16", None)
    return config


def start_runtime(params: Params) -> Runtime:
    device = resolve_device(params.train.device)
    if params.train.backend == "torch":
        return Runtime(device)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(params.cache_path / "torch_extensions"))
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return Runtime(device, rank, world)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def train(
    params: Params,
    library_dir: Path | None = None,
    recipes_dir: Path | None = None,
    features_dir: Path | None = None,
    out_dir: Path | None = None,
    resume: bool = False,
    report_dir: Path = Path("reports/train"),
    max_steps: int | None = None,
    track: bool = True,
    overwrite: bool = False,
) -> TrainResult | None:
    """Train with `params.train` on the train split; returns the final metrics (None on the
    ranks other than 0 of a data-parallel run, which write nothing).

    `features_dir` (default `train.features_dir` when `model.frozen_audio`) holds the cached
    frame features; `max_steps` stops early (the schedule still spans `train.steps`), which is
    how tests interrupt a run; `track=False` logs no MLflow run (benchmarks). With
    `train.backend=deepspeed` every process of a launcher (`torchrun`, `deepspeed`) calls this;
    rank 0 writes the model, reports and MLflow run.

    An `out_dir` that already holds a run (`checkpoints/` or `model.pt`) is a ConfigError unless
    `resume` (continue from its last checkpoint, `report_dir/loss.csv` cut back to that step) or
    `overwrite` (delete the run's outputs and train from scratch).
    """
    cfg = params.train
    library_dir = Path(library_dir or params.sources.out_dir)
    recipes_dir = Path(recipes_dir or params.synth.out_dir)
    out_dir = Path(out_dir or cfg.out_dir)
    if params.model.frozen_audio:
        features_dir = Path(features_dir or cfg.features_dir)
    checkpoints = out_dir / "checkpoints"
    # Before the launcher's rendezvous: every rank decides on the same folder state.
    _check_out_dir(out_dir, resume, overwrite)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    runtime = start_runtime(params)
    loader = _train_loader(params, features_dir, library_dir, recipes_dir, runtime.rank, runtime.world)
    _check_trainable(loader)
    items = loader.dataset.items  # type: ignore[attr-defined]
    audio_dim = items.summary["dim"] if isinstance(items, FeatureCache) else None
    model = build_model(params, audio_dim)
    teacher = build_teacher(params, items)
    if isinstance(items, FeatureCache):
        model.text_encoder.precompute(
            _captions(items, params.loader.background_texts)
            + (list(teacher.teacher.names) if teacher else [])
        )
    loss_fn = build_loss(params)
    if cfg.init_from:
        load_trainable_state(model, _safe_load(Path(cfg.init_from) / "model.pt"))
    model.to(runtime.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(param_groups(model, cfg.lr, cfg.text_lr), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps)
    )
    forward: Any = model
    accumulation = 1
    if cfg.backend == "deepspeed":
        import deepspeed

        forward, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(params)
        )
        runtime.engine, runtime.zero_stage = forward, forward.zero_optimization_stage()
        _safe_deepspeed_checkpoints(forward)
        runtime.dtype = torch.bfloat16 if forward.bfloat16_enabled() else torch.float32
        accumulation = forward.gradient_accumulation_steps()
        model = forward.module
    position = Position()
    if resume and (last := latest_checkpoint(checkpoints)) is not None:
        position = _load_checkpoint(last, model, optimizer, scheduler, runtime)
    elif overwrite and runtime.main:
        _remove_run(out_dir)
    runtime.barrier()
    history = LossLog(report_dir / "loss.csv", position.step if resume else None, write=runtime.main)
    model.train()
    stop = min(cfg.steps, max_steps or cfg.steps)
    with _tracking(params, resume, enabled=runtime.main and track) as tracker:
        started = time.perf_counter()
        batches = _batches(loader, position)
        from rich.progress import Progress

        with Progress(disable=not (interactive() and runtime.main)) as progress:
            task = progress.add_task("training", total=stop, completed=position.step)
            while position.step < stop:
                for _ in range(accumulation):
                    batch = to_device(next(batches), runtime.device)
                    losses = compute_loss(
                        forward, loss_fn, batch, distributed=runtime.world > 1, teacher=teacher
                    )
                    terms = runtime.mean(torch.stack([v.detach().float() for v in losses.values()]))
                    if not torch.isfinite(terms).all():
                        raise TrainingDiverged(
                            f"non-finite loss ({terms[0].item()}) at step {position.step + 1}, batch of "
                            f"mixtures {batch['mixture_id'].tolist()}; the last good checkpoint stays in "
                            f"{checkpoints}"
                        )
                    if runtime.engine is not None:
                        runtime.engine.backward(losses["loss"])
                        runtime.engine.step()  # clips, steps and zeroes at the accumulation boundary
                    else:
                        optimizer.zero_grad(set_to_none=True)
                        losses["loss"].backward()
                        if cfg.grad_clip:
                            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
                        optimizer.step()
                        scheduler.step()
                position.step += 1
                row = {"step": position.step, "lr": scheduler.get_last_lr()[0]}
                row |= {k: float(v) for k, v in zip(losses, terms, strict=True)}
                history.append(row)
                logged = position.step % cfg.log_every == 0 or position.step == stop
                if tracker is not None and logged:
                    tracker.log(row)
                checkpointed = position.step % cfg.checkpoint_every == 0
                if logged or checkpointed:
                    # Rows first: a checkpoint on disk always has every row up to its step on disk.
                    history.flush()
                if checkpointed:
                    _save_checkpoint(checkpoints, model, optimizer, scheduler, position, runtime)
                progress.advance(task)
        history.flush()
        final = _final_model(params, model, audio_dim, runtime)
        result: TrainResult | None = None
        if runtime.main:
            rows = history.rows
            if [int(r["step"]) for r in rows] != list(range(1, position.step + 1)):
                log.warning(
                    "%s does not hold one row for each of steps 1..%d (it was moved or written by another "
                    "run): first_loss and the curve miss the steps before the resumed checkpoint",
                    history.path,
                    position.step,
                )
            complete = position.step >= cfg.steps
            validation: dict[str, float | None] = {}
            if features_dir is not None and complete:
                validation = quick_validation(final, features_dir)
            result = TrainResult(
                steps=position.step,
                train_seconds=round(time.perf_counter() - started, 1),
                final_loss=float(np.mean([r["loss"] for r in rows[-cfg.log_every :]])),
                first_loss=float(np.mean([r["loss"] for r in rows[: cfg.log_every]])),
                validation=validation,
            )
            if complete:
                save_model(out_dir, final, params)
                text = json.dumps(result.to_json(), indent=2)
                atomic_write_text(out_dir / "metrics.json", text)
                atomic_write_text(report_dir / "metrics.json", text)
            if tracker is not None:
                tracker.finish(result.to_json(), report_dir / "loss.csv")
    runtime.barrier()
    return result


def _final_model(params: Params, model: FlamModel, audio_dim: int | None, runtime: Runtime) -> FlamModel:
    """The trained model as float32 on the CPU (a copy when training ran elsewhere or sharded)."""
    if runtime.engine is None and runtime.device.type == "cpu":
        return model
    if runtime.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            state = trainable_state(model)
    else:
        state = trainable_state(model)
    final = build_model(params, audio_dim)
    load_trainable_state(final, state)
    return final


def quick_validation(model: FlamModel, features_dir: Path) -> dict[str, float | None]:
    """Frame AUROC on the val split (seen labels, label as prompt) and on val_unseen (held-out
    labels, never trained on: the figure for model selection on novel prompts), and how well
    sigmoid(beta) of each training label tracks its frame prior (Spearman correlation)."""
    from flam_core.evaluation.frames import (
        event_vocabulary,
        frame_auroc,
        learned_priors,
        rank_correlation,
        truth_matrix,
        vocabulary_scores,
    )

    metrics: dict[str, float | None] = {}
    for split in ("val", "val_unseen"):
        cache = FeatureCache(features_dir, split)
        vocabulary = event_vocabulary(cache)
        auroc = frame_auroc(truth_matrix(cache, vocabulary), vocabulary_scores(model, cache, vocabulary))
        metrics[f"{split}_frame_auroc_micro"] = round(auroc["micro"], 4)
        metrics[f"{split}_frame_auroc_macro"] = round(auroc["macro"], 4)
        metrics[f"{split}_labels"] = auroc["n_labels"]
    _, prior, learned = learned_priors(model, FeatureCache(features_dir, "train"))
    return metrics | {"beta_prior_spearman": rank_correlation(learned, prior)}


def _check_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to train over an existing run in `out_dir` unless `resume` or `overwrite` says how."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: continue the run or start it again")
    found = [name for name in ("checkpoints", "model.pt") if (out_dir / name).exists()]
    if found and not (resume or overwrite):
        raise ConfigError(
            f"{out_dir} already holds a training run ({' and '.join(found)}): pass --resume to continue "
            "it or --overwrite to delete it and train from scratch (or choose another --out folder)"
        )
    if resume and (out_dir / "model.pt").exists() and latest_checkpoint(out_dir / "checkpoints") is None:
        raise ConfigError(
            f"{out_dir} holds model.pt but no checkpoint to resume from: pass --overwrite to train it "
            "again from scratch"
        )


def _remove_run(out_dir: Path) -> None:
    """Delete what a run wrote in `out_dir` (`RUN_OUTPUTS`), so no file of it outlives the new one."""
    for name in RUN_OUTPUTS:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


class LossLog:
    """`loss.csv`: one row per optimiser step (step, lr, loss terms), kept on disk as training goes.

    `append` buffers a row; `flush` appends the buffered rows in one write and fsyncs (the header
    is written with the first rows). Training flushes every `train.log_every` steps and before
    each checkpoint, so every checkpoint on disk has all of its rows on disk. A crash can at worst
    cut the last write short; reading drops a last line without its newline. `resume_step`
    (None: a new run, the file starts empty) keeps the rows up to that step, the resumed
    checkpoint's, and drops the later ones a crashed run flushed after it, so a resumed run's
    file ends equal to an uninterrupted run's. `rows` holds every row, kept and new. Only the
    process with `write` touches the file (rank 0).
    """

    def __init__(self, path: Path, resume_step: int | None, write: bool = True) -> None:
        self.path, self.write = Path(path), write
        self.rows: list[dict[str, float]] = []
        self.pending: list[dict[str, float]] = []
        self.fields: list[str] | None = None
        if resume_step is not None:
            self.rows = [row for row in read_loss_csv(self.path) if row["step"] <= resume_step]
            self.fields = list(self.rows[0]) if self.rows else None
        if not write:
            return
        if self.rows:
            atomic_write_text(self.path, self._lines(self.rows, header=True))
        else:
            self.path.unlink(missing_ok=True)

    def append(self, row: dict[str, float]) -> None:
        if self.fields is None:
            self.fields = list(row)
        elif list(row) != self.fields:
            raise DataError(
                f"{self.path} has columns {self.fields}, this run logs {list(row)}: resume with the "
                "parameters of the interrupted run, or train with another --reports folder"
            )
        self.rows.append(row)
        self.pending.append(row)

    def flush(self) -> None:
        """Append the buffered rows to the file (one write, then fsync)."""
        if not self.pending:
            return
        if self.write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                data = self._lines(self.pending, header=os.fstat(fd).st_size == 0).encode()
                while data:
                    data = data[os.write(fd, data) :]
                os.fsync(fd)
            finally:
                os.close(fd)
        self.pending = []

    def _lines(self, rows: list[dict[str, float]], header: bool) -> str:
        assert self.fields is not None
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        if header:
            writer.writerow(self.fields)
        # csv writes a float as its repr, which round-trips exactly: a resumed file is
        # byte-equal to an uninterrupted one
        writer.writerows([row[f] for f in self.fields] for row in rows)
        return text.getvalue()


def read_loss_csv(path: Path) -> list[dict[str, float]]:
    """The complete rows of a `loss.csv` (`step` as int, the rest float); [] when it is absent.

    A last line without its newline is a write cut short by a crash and is left out.
    """
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text()
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    rows = []
    try:
        for row in csv.DictReader(io.StringIO(text)):
            rows.append({k: int(float(v)) if k == "step" else float(v) for k, v in row.items()})
    except (TypeError, ValueError) as exc:
        raise DataError(
            f"{path} is not a loss curve of `flam train` ({exc}): move it away, then resume"
        ) from exc
    return rows


@contextmanager
def _tracking(params: Params, resume: bool, enabled: bool) -> Iterator[_Tracker | None]:
    """The MLflow run of a training on the main process (None elsewhere); a run that raises is
    ended FAILED (KILLED on Ctrl-C), so no run is left open in the process."""
    if not enabled:
        yield None
        return
    tracker = _Tracker(params, resume)
    try:
        yield tracker
    except BaseException as error:
        tracker.mlflow.end_run(status="KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise


class _Tracker:
    """MLflow run of this training (SQLite store by default); imported lazily."""

    def __init__(self, params: Params, resume: bool) -> None:
        import mlflow

        self.mlflow = mlflow
        from flam_core.tracking import use_experiment

        use_experiment(os.environ.get("FLAM_EXPERIMENT", "flam"))
        self.run = mlflow.start_run(run_name=f"train-{params.train.mode}")
        flat = _flatten(params.model_dump(mode="json"))
        mlflow.log_params(
            {k: v for k, v in flat.items() if k.split(".")[0] in ("model", "train", "loader", "synth")}
        )
        mlflow.set_tags(
            {
                "resumed": str(resume),
                "torch": torch.__version__,
                "threads": str(torch.get_num_threads()),
                "python": platform.python_version(),
                "machine": platform.machine(),
                "cpus": str(os.cpu_count()),
                "cuda": str(torch.cuda.is_available()),
            }
        )

    def log(self, row: dict[str, float]) -> None:
        self.mlflow.log_metrics({k: v for k, v in row.items() if k != "step"}, step=int(row["step"]))

    def finish(self, metrics: dict[str, Any], loss_csv: Path) -> None:
        self.mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})
        if loss_csv.is_file():
            self.mlflow.log_artifact(str(loss_csv), artifact_path="train")
        self.mlflow.end_run()


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= _flatten(value, name + ".")
        else:
            flat[name] = value
    return flat
