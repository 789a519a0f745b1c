"""Detection: a recording of any length and any text prompts -> frame probabilities and segments.

    audio (any rate, any channels) -> mono at the model's rate -> windows of the training
    mixture length (10 s), overlapping by `overlap` -> audio encoder + context block per window
    -> frame embeddings stitched onto one timeline (each frame from the window where it is most
    central) -> unbiased scores `p / (p + sigmoid(beta))` per prompt -> median filter ->
    calibrated threshold -> segments merged per prompt

Frame embeddings of a recording do not depend on the prompts: `FlamDetector.embed` computes
them once, and `score` matches them against any number of prompts (prompt embeddings, scales
and biases are cached by text). `flam_core.search` stores the same embeddings for a corpus.

A model is a folder written by training (`model.pt`, `config.json`, optional
`calibration.json`), or an MLflow URI (`models:/flam-sed@champion`, `runs:/...`) of the
registered pyfunc, whose artifacts hold that folder.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flam_core.audio.io import read_audio, resample, to_mono
from flam_core.config import Params
from flam_core.errors import AudioError, ConfigError, DataError, SilentAudioError

MODEL_ARTIFACT = "flam_model"  # the model folder's artifact name in a registered pyfunc
YAMNET_ARTIFACT = "yamnet"  # the YAMNet weights it carries
SILENCE_PEAK = 1e-6  # digital silence: nothing to detect, most likely a broken recording


@dataclass
class Detection:
    """Frame probabilities `[K, T]` on a `frame_hop_s` grid and per-prompt segments."""

    model: str
    frame_hop_s: float
    duration_s: float
    prompts: list[str]
    probs: np.ndarray  # [K, T] unbiased frame scores in [0, 1]
    segments: list[dict[str, Any]]  # {"prompt", "onset", "offset", "score"}, by prompt then onset

    def to_json(self, decimals: int = 4) -> dict[str, Any]:
        return {
            "model": self.model,
            "frame_hop_s": self.frame_hop_s,
            "duration_s": round(self.duration_s, 3),
            "prompts": list(self.prompts),
            "probs": np.round(self.probs.astype(np.float64), decimals).tolist(),
            "segments": [
                {
                    "prompt": s["prompt"],
                    "onset": round(s["onset"], 3),
                    "offset": round(s["offset"], 3),
                    "score": round(s["score"], decimals),
                }
                for s in self.segments
            ],
        }


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


def load_model(model_dir: Path) -> tuple[Any, Params, dict[str, Any]]:
    """A trained model folder -> (FlamModel with its audio encoder, params, calibration)."""
    from flam_core.train import _load_trainable_state, build_model

    model_dir = Path(model_dir)
    for name in ("config.json", "model.pt"):
        if not (model_dir / name).is_file():
            raise ConfigError(f"{model_dir} is not a FLAM model folder: {name} is missing (run `flam train`)")
    config = json.loads((model_dir / "config.json").read_text())
    params = Params.model_validate(config["params"])
    # A model always carries its audio encoder at inference, frozen or not during training.
    model = build_model(params)
    _load_trainable_state(model, torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True))
    calibration_path = model_dir / "calibration.json"
    calibration = json.loads(calibration_path.read_text()) if calibration_path.is_file() else {}
    return model.eval(), params, calibration


def _pyfunc_artifacts(model_dir: Path) -> dict[str, Path]:
    """Artifact name -> local path, from a downloaded pyfunc's MLmodel file."""
    import yaml

    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        return {}
    flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
    return {name: model_dir / entry["path"] for name, entry in (flavor.get("artifacts") or {}).items()}


class FlamDetector:
    """Open-vocabulary sound event detection with a trained FLAM model."""

    def __init__(
        self,
        model: Any,
        params: Params,
        calibration: dict[str, Any] | None = None,
        source: str = "",
        overlap: float = 0.25,
        median_frames: int = 3,
        batch_windows: int = 8,
        text_cache_size: int = 4096,
    ) -> None:
        if model.audio_encoder is None:
            raise ConfigError("the detector needs a model with its audio encoder")
        if not 0.0 <= overlap < 1.0:
            raise ConfigError(f"overlap must be in [0, 1), got {overlap}")
        self.model, self.params, self.source = model.eval(), params, source
        self.calibration = calibration or {}
        self.threshold = float(self.calibration.get("threshold", 0.5))
        self.prompt_thresholds: dict[str, float] = dict(self.calibration.get("per_prompt", {}))
        self.sample_rate = params.audio.sample_rate
        self.window_frames = params.frames.n_frames
        self.frame_hop_s = params.synth.mixture_s / self.window_frames
        self.frame_samples = self.frame_hop_s * self.sample_rate
        if abs(self.frame_samples - round(self.frame_samples)) > 1e-9:
            raise ConfigError(f"a frame ({self.frame_hop_s} s) is not a whole number of samples")
        self.frame_samples = int(round(self.frame_samples))
        margin = int(round(overlap * self.window_frames / 2))
        self.keep = (margin, self.window_frames - margin)  # the central frames each window gives
        self.step = self.window_frames - 2 * margin
        self.median_frames, self.batch_windows = median_frames, batch_windows
        self._texts: OrderedDict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()
        self._text_cache_size = text_cache_size

    @classmethod
    def from_dir(cls, model_dir: Path | str, **kwargs: Any) -> FlamDetector:
        model, params, calibration = load_model(Path(model_dir))
        return cls(model, params, calibration, source=str(model_dir), **kwargs)

    @classmethod
    def from_uri(cls, uri: str, **kwargs: Any) -> FlamDetector:
        """A model folder, or an MLflow model URI (`models:/name@alias`, `runs:/id/path`)."""
        if Path(uri).is_dir():
            return cls.from_dir(uri, **kwargs)
        if "://" not in uri and ":/" not in uri:
            raise ConfigError(f"model {uri!r}: no such folder, and not an MLflow model URI")
        import mlflow

        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
        except Exception as exc:  # MLflow raises its own exception types for missing models
            raise ConfigError(f"model {uri!r}: cannot fetch it from MLflow ({exc})") from exc
        artifacts = _pyfunc_artifacts(local)
        if MODEL_ARTIFACT not in artifacts:
            raise ConfigError(f"model {uri!r} is not a FLAM pyfunc: it has no {MODEL_ARTIFACT!r} artifact")
        with yamnet_weights(artifacts.get(YAMNET_ARTIFACT)):
            model, params, calibration = load_model(artifacts[MODEL_ARTIFACT])
        return cls(model, params, calibration, source=uri, **kwargs)

    # --- audio -------------------------------------------------------------------------------
    def load_audio(self, audio: str | Path | np.ndarray, sample_rate: int | None = None) -> np.ndarray:
        """A path, or an array `[n]` / `[channels, n]` with its `sample_rate` -> mono at the model rate."""
        if isinstance(audio, str | Path):
            samples, _ = read_audio(audio, self.sample_rate)
            name = str(audio)
        else:
            if sample_rate is None:
                raise AudioError("an audio array needs its sample_rate")
            array = np.asarray(audio, dtype=np.float32)
            if array.ndim not in (1, 2) or array.size == 0:
                raise AudioError(f"audio array must be [n] or [channels, n] and not empty, got {array.shape}")
            if not np.isfinite(array).all():
                raise AudioError("audio array holds NaN or infinite samples")
            samples = resample(to_mono(array), int(sample_rate), self.sample_rate)
            name = "audio array"
        if np.abs(samples).max() < SILENCE_PEAK:
            raise SilentAudioError(f"{name} is digital silence: there is nothing to detect")
        return samples

    @torch.inference_mode()
    def embed(self, samples: np.ndarray) -> np.ndarray:
        """Mono samples at the model rate -> `[T, D]` float32 unit-norm frame embeddings."""
        total = max(1, int(np.ceil(len(samples) / self.frame_samples)))
        n_windows = max(1, int(np.ceil(max(total - self.keep[1], 0) / self.step)) + 1)
        window = self.window_frames * self.frame_samples
        padded = np.zeros((n_windows - 1) * self.step * self.frame_samples + window, dtype=np.float32)
        padded[: len(samples)] = samples
        starts = np.arange(n_windows) * self.step * self.frame_samples
        head = self.model.head
        out = np.zeros((total, head.config.embed_dim), dtype=np.float32)
        for first in range(0, n_windows, self.batch_windows):
            chunk = starts[first : first + self.batch_windows]
            batch = torch.from_numpy(np.stack([padded[s : s + window] for s in chunk]))
            frames = self.model.audio_encoder(batch)
            emb = head.frame_embeddings(head.contextualise(frames.to(head.logit_scale.dtype))).float().numpy()
            for j, w in enumerate(range(first, first + len(chunk))):
                lo = 0 if w == 0 else self.keep[0]
                hi = self.window_frames if w == n_windows - 1 else self.keep[1]
                t0 = w * self.step
                hi = min(hi, total - t0)
                if hi > lo:
                    out[t0 + lo : t0 + hi] = emb[j, lo:hi]
        return out

    # --- text ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def prompt_embeddings(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(text_emb `[K, D]`, alpha `[K]`, beta `[K]`), each prompt computed once and cached."""
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise DataError(f"prompts must be non-empty texts, got {prompts!r}")
        missing = [p for p in dict.fromkeys(prompts) if p not in self._texts]
        if missing:
            head = self.model.head
            features = self.model.text_encoder(missing).to(head.logit_scale.dtype)
            emb = head.text_embeddings(features)
            alpha, beta = head.text_scale_bias(features)
            for k, prompt in enumerate(missing):
                self._texts[prompt] = (emb[k].float(), alpha[k].float(), beta[k].float())
        for prompt in prompts:
            self._texts.move_to_end(prompt)
        while len(self._texts) > self._text_cache_size:
            self._texts.popitem(last=False)
        rows = [self._texts[p] for p in prompts]
        return tuple(torch.stack(parts) for parts in zip(*rows, strict=True))  # type: ignore[return-value]

    @torch.inference_mode()
    def score(self, frame_emb: np.ndarray, prompts: list[str], unbiased: bool = True) -> np.ndarray:
        """`[T, D]` frame embeddings x prompts -> `[K, T]` frame probabilities."""
        text_emb, alpha, beta = self.prompt_embeddings(prompts)
        cos = torch.from_numpy(frame_emb) @ text_emb.T  # [T, K]
        logits = alpha * cos + beta
        if not unbiased:
            return torch.sigmoid(alpha * cos).T.numpy()
        log_p = torch.nn.functional.logsigmoid(logits)
        return torch.exp(log_p - torch.logaddexp(log_p, torch.nn.functional.logsigmoid(beta))).T.numpy()

    def threshold_for(self, prompt: str) -> float:
        return self.prompt_thresholds.get(prompt, self.threshold)

    # --- the whole thing -------------------------------------------------------------------------
    def detect(
        self,
        audio: str | Path | np.ndarray,
        prompts: list[str],
        sample_rate: int | None = None,
        threshold: float | None = None,
    ) -> Detection:
        from flam_core.evaluation.sed import segments_from_frames

        samples = self.load_audio(audio, sample_rate)
        probs = self.score(self.embed(samples), list(prompts))
        duration = len(samples) / self.sample_rate
        segments = []
        for k, prompt in enumerate(prompts):
            cut = threshold if threshold is not None else self.threshold_for(prompt)
            for onset, offset, score in segments_from_frames(
                probs[k], self.frame_hop_s, cut, median_frames=self.median_frames
            ):
                segments.append(
                    {"prompt": prompt, "onset": onset, "offset": min(offset, duration), "score": float(score)}
                )
        return Detection(self.source, self.frame_hop_s, duration, list(prompts), probs, segments)


def plot_detection(detection: Detection, path: Path | str) -> Path:
    """The prompt x time score heatmap with the detected segments drawn over it (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    k, t = detection.probs.shape
    fig, ax = plt.subplots(figsize=(min(18, 3 + t * detection.frame_hop_s / 4), 1 + 0.5 * k))
    image = ax.imshow(
        detection.probs,
        aspect="auto",
        vmin=0,
        vmax=1,
        cmap="magma",
        extent=(0, t * detection.frame_hop_s, k, 0),
        interpolation="nearest",
    )
    row = {p: i for i, p in enumerate(detection.prompts)}
    for seg in detection.segments:
        y = row[seg["prompt"]]
        ax.plot([seg["onset"], seg["offset"]], [y + 0.85, y + 0.85], color="cyan", linewidth=3)
    ax.set_yticks(np.arange(k) + 0.5, detection.prompts)
    ax.set_xlabel("time (s); cyan: detected segments")
    fig.colorbar(image, ax=ax, label="unbiased frame score")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
