"""The model folder: what training writes and detection, evaluation and serving read.

    model.pt          the trainable state (`trainable_state`): the head's tensors, and the
                      audio or text encoder's when they were trained, float32, tensors only
    config.json       the resolved params the model was trained with (rebuilds it), the head's
                      config, and references to the encoders
    calibration.json  optional: the calibrated threshold(s), written by `flam calibrate`
    cohort.npz        optional, written by `flam calibrate`: the moments of the model's frame
                      embeddings over training frames (`flam_core.model.score_norm`), which the
                      detector scores with when calibration.json's `score_norm` says so

Every file is read with `torch.load(weights_only=True)` or as JSON: loading a model never runs
code from it. A damaged folder raises `ConfigError` naming the file and what is wrong.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from flam_core.config import Params
from flam_core.errors import ConfigError
from flam_core.model.flam import FlamModel, build_model
from flam_core.model.fusion import ClassifierFusion
from flam_core.model.score_norm import CohortNorm
from flam_core.utils import atomic_path, atomic_write_text

MODEL_FILES = ("model.pt", "config.json")  # what makes a folder a model (calibration.json is optional)


def trainable_state(model: FlamModel) -> dict[str, torch.Tensor]:
    """What training changes (head; audio/text encoders when trained), as float32 CPU tensors."""
    state = {f"head.{k}": v for k, v in model.head.state_dict().items()}
    if model.audio_encoder is not None and any(p.requires_grad for p in model.audio_encoder.parameters()):
        state |= {f"audio_encoder.{k}": v for k, v in model.audio_encoder.state_dict().items()}
    if model.text_encoder.trainable:
        state |= {f"text_encoder.{k}": v for k, v in model.text_encoder.model.state_dict().items()}
    return {
        k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype) for k, v in state.items()
    }


def load_trainable_state(model: FlamModel, state: dict[str, torch.Tensor]) -> None:
    """Put a `trainable_state` back into a model built with the same params."""

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

    model.head.load_state_dict(part("head."))
    if model.audio_encoder is not None and part("audio_encoder."):
        model.audio_encoder.load_state_dict(part("audio_encoder."))
    if model.text_encoder.trainable and part("text_encoder."):
        model.text_encoder.model.load_state_dict(part("text_encoder."))


def save_model(out_dir: Path, model: FlamModel, params: Params) -> None:
    """Write `model.pt` and `config.json` into `out_dir`, each replaced atomically."""
    with atomic_path(out_dir / "model.pt") as tmp:
        torch.save(trainable_state(model), tmp)
    config = {
        "params": params.model_dump(mode="json"),
        "head": model.head.config.to_dict(),
        "audio": {
            "encoder": params.model.audio_encoder,
            "frozen": params.model.frozen_audio,
            "sample_rate": params.audio.sample_rate,
            "n_frames": params.frames.n_frames,
            "mixture_s": params.synth.mixture_s,
        },
        "text_encoder": {
            "source": params.model.text_encoder,
            "dim": model.text_encoder.dim,
            "max_length": model.text_encoder.max_length,
            "trained": model.text_encoder.trainable,
        },
    }
    atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2))


@contextlib.contextmanager
def yamnet_weights(path: Path | str | None) -> Iterator[None]:
    """Build models with these YAMNet weights (a registered model carries its own copy)."""
    if path is None or not Path(path).is_file():
        yield
        return
    previous = os.environ.get("FLAM_YAMNET_WEIGHTS")
    os.environ["FLAM_YAMNET_WEIGHTS"] = str(path)
    try:
        yield
    finally:
        if previous is None:
            del os.environ["FLAM_YAMNET_WEIGHTS"]
        else:
            os.environ["FLAM_YAMNET_WEIGHTS"] = previous


def load_model(model_dir: Path) -> tuple[FlamModel, Params, dict[str, Any]]:
    """A trained model folder -> (FlamModel with its audio encoder, params, calibration).

    A missing, empty, truncated or inconsistent file (`config.json` that is not JSON or has no
    valid `params`, `model.pt` that does not load or whose tensors do not fit the model
    `config.json` describes, `calibration.json` that is not JSON) raises `ConfigError` naming
    the file and what is wrong.
    """
    model_dir = Path(model_dir)
    for name in ("config.json", "model.pt"):
        if not (model_dir / name).is_file():
            raise ConfigError(f"{model_dir} is not a FLAM model folder: {name} is missing (run `flam train`)")
    params = _read_params(model_dir / "config.json")
    weights = model_dir / "model.pt"
    state = _read_weights(weights)
    # A model always carries its audio encoder at inference, frozen or not during training; a
    # frozen text encoder loads on first use (not at all when every prompt embedding is cached).
    model = build_model(params, lazy_text=True)
    _check_state(model, state, weights)
    try:
        load_trainable_state(model, state)
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(
            f"{weights} does not fit the model config.json describes ({exc}){_DAMAGED}"
        ) from exc
    calibration_path = model_dir / "calibration.json"
    calibration = _read_json(calibration_path) if calibration_path.is_file() else {}
    if calibration.get("score_norm"):
        model.score_norm = CohortNorm.load(model_dir, calibration["score_norm"])
        if model.score_norm.split:
            model.fusion = _classifier_fusion(model, model.score_norm, model_dir)
    return model.eval(), params, calibration


def _classifier_fusion(model: FlamModel, norm: CohortNorm, model_dir: Path) -> ClassifierFusion:
    """The backbone classifier of a model whose cohort is fused with it (`flam_core.model.fusion`)."""
    yamnet = getattr(model.audio_encoder, "yamnet", None)
    if yamnet is None or norm.split != model.head.config.embed_dim or norm.class_features is None:
        raise ConfigError(
            f"{model_dir}: calibration.json fuses the scores with the YAMNet classifier, which this "
            "model does not have (or its cohort does not fit); run `flam calibrate` again"
        )
    return ClassifierFusion.of(yamnet.classifier, norm.class_features, norm.class_center, norm.logit_floor)


_DAMAGED = "; the model folder is damaged or incomplete: copy it again or retrain it (`flam train`)"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}){_DAMAGED}") from exc
    if not isinstance(document, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(document).__name__}{_DAMAGED}")
    return document


def _read_params(path: Path) -> Params:
    config = _read_json(path)
    if not isinstance(config.get("params"), dict):
        raise ConfigError(
            f"{path} has no `params` object (the parameters the model was trained with){_DAMAGED}"
        )
    model = config["params"].get("model")
    if isinstance(model, dict) and "text_grounding" not in model:
        # written before texts were grounded: the model reads its texts as they are
        config["params"]["model"] = {**model, "text_grounding": False}
    try:
        return Params.model_validate(config["params"])
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        raise ConfigError(f"{path}: its params are invalid ({errors}){_DAMAGED}") from None


def _read_weights(path: Path) -> Any:
    if path.stat().st_size == 0:
        raise ConfigError(f"{path} is empty (0 bytes){_DAMAGED}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        reason = str(exc).split(". ")[0] or type(exc).__name__  # torch's first sentence says what broke
        raise ConfigError(f"{path} cannot be loaded as PyTorch weights ({reason}){_DAMAGED}") from exc


def _check_state(model: FlamModel, state: Any, path: Path) -> None:
    """Name the missing, unexpected and mis-shaped tensors of a flat `{name: tensor}` state."""
    if not isinstance(state, Mapping):
        raise ConfigError(f"{path} holds a {type(state).__name__}, not a mapping of tensors{_DAMAGED}")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        return  # another layout: `load_trainable_state` checks it
    text = model.text_encoder
    parts = {
        "head.": model.head,
        "audio_encoder.": model.audio_encoder,
        # A frozen encoder saves no tensors: it is loaded here only when the state holds some.
        "text_encoder.": text.model
        if text.trainable or any(k.startswith("text_encoder.") for k in state)
        else None,
    }
    expected = {
        prefix + key: tuple(value.shape)
        for prefix, module in parts.items()
        if module is not None
        for key, value in module.state_dict().items()
    }
    # The head is always saved; an encoder's tensors only when it was trained, and then all of them.
    saved = {prefix for prefix in parts if any(k.startswith(prefix) for k in state)} | {"head."}
    missing = sorted(k for k in expected if k not in state and k.startswith(tuple(saved)))
    unexpected = sorted(k for k in state if k not in expected)
    shapes = sorted(
        f"{k} {tuple(v.shape)} instead of {expected[k]}"
        for k, v in state.items()
        if k in expected and tuple(v.shape) != expected[k]
    )
    problems = [
        f"{label}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''} ({len(items)})"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes))
        if items
    ]
    if problems:
        raise ConfigError(
            f"{path} does not fit the model config.json describes: {'; '.join(problems)}{_DAMAGED}"
        )
