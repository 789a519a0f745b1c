"""Detection: a recording of any length and any text prompts -> frame probabilities and segments.

    audio (any rate, any channels) -> mono at the model's rate -> windows of the training
    mixture length (10 s), overlapping by `overlap` -> audio encoder + context block per window
    -> frame embeddings stitched onto one timeline (each frame from the window where it is most
    central) -> scores per prompt (normalised over the calibration's cohort of training frames,
    `flam_core.model.score_norm`; the unbiased `p / (p + sigmoid(beta))` without one) -> median filter ->
    calibrated threshold -> segments merged per prompt

Frame embeddings of a recording do not depend on the prompts: `FlamDetector.embed` computes
them once, and `score` matches them against any number of prompts (prompt embeddings, scales
and biases are cached by text, and with `cache_prompts` kept on disk across processes, so that a
detection whose prompts were all seen before never loads the text encoder:
`flam_core.model.prompt_cache`). `flam_core.search` stores the same embeddings for a corpus.

A model is a folder written by training (`model.pt`, `config.json`, optional
`calibration.json`), or an MLflow URI (`models:/flam-sed@champion`, `runs:/...`) of the
registered pyfunc, whose artifacts hold that folder.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from flam_core.audio.io import DEFAULT_BLOCK_S, StreamingResampler, iter_audio_blocks, source_name, to_mono
from flam_core.config import Params
from flam_core.detection import Detection, check_not_silent
from flam_core.errors import AudioError, AudioTooLongError, ConfigError, DataError
from flam_core.model.folder import load_model, yamnet_weights
from flam_core.model.prompt_cache import PromptCache
from flam_core.postprocess import segments_from_frames

MODEL_ARTIFACT = "flam_model"  # the model folder's artifact name in a registered pyfunc
YAMNET_ARTIFACT = "yamnet"  # the YAMNet weights it carries
# A path, a binary file-like object (io.BytesIO of an upload), or samples `[n]` / `[channels, n]`.
AudioInput = str | Path | BinaryIO | np.ndarray


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
        prompt_cache: PromptCache | None = None,
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
        self.frame_hop_s = params.frame_hop_s
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
        self.prompt_cache = prompt_cache

    @classmethod
    def from_dir(cls, model_dir: Path | str, cache_prompts: bool = False, **kwargs: Any) -> FlamDetector:
        """The detector of a model folder. `cache_prompts`: keep prompt embeddings on disk
        (`PromptCache`, unless `FLAM_PROMPT_CACHE=off`)."""
        model, params, calibration = load_model(Path(model_dir))
        cache = PromptCache.open(model_dir, model) if cache_prompts else None
        return cls(model, params, calibration, source=str(model_dir), prompt_cache=cache, **kwargs)

    @classmethod
    def from_uri(cls, uri: str, cache_prompts: bool = False, **kwargs: Any) -> FlamDetector:
        """A model folder, or an MLflow model URI (`models:/name@alias`, `runs:/id/path`)."""
        if Path(uri).is_dir():
            return cls.from_dir(uri, cache_prompts=cache_prompts, **kwargs)
        if "://" not in uri and ":/" not in uri:
            raise ConfigError(f"model {uri!r}: no such folder, and not an MLflow model URI")
        import tempfile

        import mlflow

        from flam_core.tracking import tracking_uri

        # Into a folder of its own, removed once loaded: downloading into the store's artifact
        # tree would add files there. Everything the model needs is in memory after load_model.
        with tempfile.TemporaryDirectory(prefix="flam-model-") as destination:
            try:
                local = Path(
                    mlflow.artifacts.download_artifacts(
                        artifact_uri=uri, dst_path=destination, tracking_uri=tracking_uri()
                    )
                )
            except Exception as exc:  # MLflow raises its own exception types for missing models
                raise ConfigError(f"model {uri!r}: cannot fetch it from MLflow ({exc})") from exc
            artifacts = _pyfunc_artifacts(local)
            if MODEL_ARTIFACT not in artifacts:
                raise ConfigError(
                    f"model {uri!r} is not a FLAM pyfunc: it has no {MODEL_ARTIFACT!r} artifact"
                )
            with yamnet_weights(artifacts.get(YAMNET_ARTIFACT)):
                model, params, calibration = load_model(artifacts[MODEL_ARTIFACT])
            cache = PromptCache.open(artifacts[MODEL_ARTIFACT], model) if cache_prompts else None
        return cls(model, params, calibration, source=uri, prompt_cache=cache, **kwargs)

    # --- audio -------------------------------------------------------------------------------
    def audio_blocks(
        self,
        audio: AudioInput,
        sample_rate: int | None = None,
        max_duration_s: float | None = None,
        block_s: float = DEFAULT_BLOCK_S,
    ) -> tuple[str, Iterator[np.ndarray]]:
        """(name for errors, mono float32 blocks at the model rate) of a file, file object or array.

        Files are decoded block by block (`iter_audio_blocks`); an array `[n]` / `[channels, n]`
        needs its `sample_rate` and is downmixed and resampled in blocks the same way. Errors
        (`AudioError`, `AudioTooLongError` past `max_duration_s`) name the input; those found while
        decoding surface as the blocks are consumed.
        """
        if isinstance(audio, str | Path) or hasattr(audio, "read"):
            blocks = iter_audio_blocks(
                audio, self.sample_rate, block_s=block_s, max_duration_s=max_duration_s
            )
            return source_name(audio), blocks
        if sample_rate is None:
            raise AudioError("an audio array needs its sample_rate")
        array = np.asarray(audio)
        if array.ndim not in (1, 2) or array.size == 0:
            raise AudioError(f"audio array must be [n] or [channels, n] and not empty, got {array.shape}")
        if max_duration_s is not None and array.shape[-1] > max_duration_s * sample_rate:
            raise AudioTooLongError(
                f"audio array lasts {array.shape[-1] / sample_rate:.1f} s, "
                f"over the limit of {max_duration_s:g} s"
            )
        return "audio array", self._array_blocks(array, int(sample_rate), block_s)

    def _array_blocks(self, array: np.ndarray, rate: int, block_s: float) -> Iterator[np.ndarray]:
        resampler = StreamingResampler(rate, self.sample_rate)
        step = max(1, int(block_s * rate))
        for start in range(0, array.shape[-1], step):
            block = to_mono(np.asarray(array[..., start : start + step], dtype=np.float32))
            if not np.isfinite(block).all():
                raise AudioError("audio array holds NaN or infinite samples")
            yield resampler.push(block)
        yield resampler.flush()

    def load_audio(
        self, audio: AudioInput, sample_rate: int | None = None, max_duration_s: float | None = None
    ) -> np.ndarray:
        """A path, file object, or array `[n]` / `[channels, n]` with its `sample_rate` -> mono samples `[n]`.

        The samples are float32 at the model rate.

        Raises `AudioError` (bad input), `AudioTooLongError` (over `max_duration_s`) or
        `SilentAudioError` (digital silence). For long audio prefer `detect`, which never holds
        the samples.
        """
        name, blocks = self.audio_blocks(audio, sample_rate, max_duration_s)
        tally = _Tally()
        samples = np.concatenate(list(tally.watch(blocks)))
        tally.check_not_silent(name)
        return samples

    def embed(self, samples: np.ndarray) -> np.ndarray:
        """Mono samples at the model rate -> `[T, D]` float32 unit-norm frame embeddings.

        `T = max(1, ceil(n / frame_samples))`. The same windows and stitching as `embed_blocks`.
        """
        samples = np.asarray(samples, dtype=np.float32)
        chunk = self.batch_windows * self.step * self.frame_samples
        pieces = (samples[i : i + chunk] for i in range(0, len(samples), chunk))
        return np.concatenate(list(self.embed_blocks(pieces)))

    def embed_blocks(self, blocks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Mono sample blocks at the model rate -> consecutive `[t_i, D]` frame embeddings.

        Windows of `window_frames` frames start every `step` frames (the last ones zero-padded
        past the end); each frame comes from the window where it is most central (the first and
        last windows also give their outer frames). A window is embedded, in batches of
        `batch_windows`, as soon as its samples have arrived, so memory holds one block, a batch
        of windows and their embeddings, whatever the length. Concatenated: `[T, D]` with
        `T = max(1, ceil(n / frame_samples))` for `n` samples in all.
        """
        fs, size, hop = (
            self.frame_samples,
            self.window_frames * self.frame_samples,
            self.step * self.frame_samples,
        )
        buffer, buffer_start, received, next_window = np.zeros(0, np.float32), 0, 0, 0
        batch: list[np.ndarray] = []  # windows [next_window - len(batch), next_window)
        for block in blocks:
            buffer = np.concatenate([buffer, np.asarray(block, dtype=np.float32)])
            received += len(block)
            # A window whose samples have all arrived is never the last one (the last window
            # reaches past the end), so its central frames are final.
            while next_window * hop + size <= received:
                start = next_window * hop - buffer_start
                batch.append(buffer[start : start + size].copy())
                next_window += 1
                if len(batch) == self.batch_windows:
                    yield self._embed_windows(batch, next_window - len(batch))
                    batch = []
            consumed = next_window * hop - buffer_start
            if consumed > 0:
                buffer, buffer_start = buffer[consumed:].copy(), buffer_start + consumed
        total = max(1, math.ceil(received / fs))
        n_windows = max(1, math.ceil(max(total - self.keep[1], 0) / self.step) + 1)
        while next_window < n_windows:
            start = next_window * hop - buffer_start
            window = np.zeros(size, dtype=np.float32)
            piece = buffer[start : start + size]
            window[: len(piece)] = piece
            batch.append(window)
            next_window += 1
            if len(batch) == self.batch_windows:
                yield self._embed_windows(batch, next_window - len(batch), n_windows, total)
                batch = []
        if batch:
            yield self._embed_windows(batch, next_window - len(batch), n_windows, total)

    @torch.inference_mode()
    def window_embeddings(self, windows: Sequence[np.ndarray]) -> np.ndarray:
        """Windows of `window_frames` frames of samples -> `[N, window_frames, D]` frame
        embeddings, each window on its own (the model's context spans one window)."""
        frames = self.model.audio_encoder(torch.from_numpy(np.stack(windows)))
        return self.model.frame_vectors(frames).float().numpy()

    @torch.inference_mode()
    def _embed_windows(
        self, windows: list[np.ndarray], first: int, n_windows: int | None = None, total: int | None = None
    ) -> np.ndarray:
        """Windows `first, first + 1, ...` -> the frames they give, `[t, D]` (`None`: not the end yet)."""
        emb = self.window_embeddings(windows)
        parts = []
        for j in range(len(windows)):
            w = first + j
            lo = 0 if w == 0 else self.keep[0]
            hi = self.window_frames if n_windows is not None and w == n_windows - 1 else self.keep[1]
            if total is not None:
                hi = min(hi, total - w * self.step)
            if hi > lo:
                parts.append(emb[j, lo:hi])
        return np.concatenate(parts) if parts else np.zeros((0, emb.shape[-1]), dtype=np.float32)

    # --- text ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def prompt_embeddings(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(text_emb `[K, D]`, alpha `[K]`, beta `[K]`), each prompt computed once and cached
        (in memory, and on disk with a `prompt_cache`: then the text encoder loads only for
        prompts it does not hold)."""
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise DataError(f"prompts must be non-empty texts, got {prompts!r}")
        missing = [p for p in dict.fromkeys(prompts) if p not in self._texts]
        if missing and self.prompt_cache is not None:
            self._texts.update(self.prompt_cache.get(missing))
            missing = [p for p in missing if p not in self._texts]
        if missing:
            emb, alpha, beta = self.model.prompt_vectors(self.model.text_encoder(missing))
            computed = {p: (emb[k].float(), alpha[k].float(), beta[k].float()) for k, p in enumerate(missing)}
            self._texts.update(computed)
            if self.prompt_cache is not None:
                self.prompt_cache.put(computed)
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
        frames = torch.from_numpy(frame_emb)[None]  # [1, T, D]
        if not unbiased:
            d = self.model.head.config.embed_dim
            return self.model.head.approximate_scores(frames[..., :d], text_emb[:, :d], alpha)[0].numpy()
        return self.model.scores(frames, text_emb, alpha, beta)[0].numpy()

    def ranking_vector(self, prompt: str) -> np.ndarray:
        """`[D]`: the direction whose dot product with frame vectors orders them as `score` does
        (what a search index retrieves candidates by)."""
        text_emb, _, _ = self.prompt_embeddings([prompt])
        return self.model.ranking_vectors(text_emb)[0].numpy()

    def threshold_for(self, prompt: str) -> float:
        return self.prompt_thresholds.get(prompt, self.threshold)

    # --- the whole thing -------------------------------------------------------------------------
    def detect(
        self,
        audio: AudioInput,
        prompts: list[str],
        sample_rate: int | None = None,
        threshold: float | None = None,
        max_duration_s: float | None = None,
    ) -> Detection:
        """Frame probabilities `[K, T]` and segments of `prompts` in a file, file object or array.

        The audio is streamed: windows are cut from the decoded blocks as they arrive and scored
        batch by batch, so memory holds the model, a few windows and the `[K, T]` scores, not the
        samples. Raises `AudioError` (unreadable or empty input, NaN/inf), `AudioTooLongError`
        (over `max_duration_s`), `SilentAudioError` (digital silence), `DataError` (bad prompts).
        """
        prompts = list(prompts)
        self.prompt_embeddings(prompts)  # bad prompts fail before any decoding
        name, blocks = self.audio_blocks(audio, sample_rate, max_duration_s)
        tally = _Tally()
        probs = np.concatenate(
            [self.score(emb, prompts) for emb in self.embed_blocks(tally.watch(blocks))], axis=1
        )
        tally.check_not_silent(name)
        duration = tally.samples / self.sample_rate
        segments = []
        for k, prompt in enumerate(prompts):
            cut = threshold if threshold is not None else self.threshold_for(prompt)
            for onset, offset, score in segments_from_frames(
                probs[k], self.frame_hop_s, cut, median_frames=self.median_frames
            ):
                segments.append(
                    {"prompt": prompt, "onset": onset, "offset": min(offset, duration), "score": float(score)}
                )
        return Detection(self.source, self.frame_hop_s, duration, prompts, probs, segments)

    def detect_many(
        self,
        paths: Iterable[str | Path],
        prompts: list[str],
        threshold: float | None = None,
        workers: int = 1,
    ) -> Iterator[tuple[Path, Detection | AudioError]]:
        """(path, `Detection` or the `AudioError` that stopped it) of each file, in order.

        The detections equal `detect(path, prompts, threshold=threshold)` of each file; `workers`
        processes decode files ahead (at most two each waiting) while this one embeds and scores,
        `workers=0` decodes here. A bad file (undecodable, empty, silent) does not stop the run.
        See `flam_core.batch`.
        """
        from flam_core.batch import detect_many

        return detect_many(self, paths, prompts, threshold=threshold, workers=workers)


class _Tally:
    """Counts the samples of a block stream and keeps its peak, for the duration and silence check."""

    def __init__(self) -> None:
        self.samples = 0
        self.peak = 0.0

    def watch(self, blocks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        for block in blocks:
            self.samples += len(block)
            if len(block):
                self.peak = max(self.peak, float(np.abs(block).max()))
            yield block

    def check_not_silent(self, name: str) -> None:
        check_not_silent(name, self.peak)
