"""The registered model: an MLflow pyfunc that answers detection requests.

Input: a DataFrame (or `dataframe_records` over HTTP), one row per request, typed by
`signature()`:

    path            str        optional: an audio file under the server's audio root
                               (`FLAM_SERVE_AUDIO_ROOT`; absolute, or relative to that root)
    audio_base64    str        optional: the bytes of an audio file (WAV, FLAC, OGG, MP3), base64
    prompts         list[str]  required: what to detect (1 to `MAX_PROMPTS` non-empty texts)
    threshold       float      optional: in [0, 1]; default: the model's calibrated threshold
    max_duration_s  float      optional: refuse audio longer than this (at most the server's limit)

Exactly one of `path` / `audio_base64` per row; a missing value, None, NaN or "" counts as
absent (MLflow fills optional columns that other rows of the request set with NaN or None).

Output: one detection per row, exactly the `flam detect --json` document (`model`,
`frame_hop_s`, `duration_s`, `prompts`, `probs`, `segments`).

Every bad request raises `MlflowException` with `INVALID_PARAMETER_VALUE`, which MLflow's
scoring server answers with HTTP 400 and the message (MLflow 3.17's error codes map to no
413, and its only "limit" codes give 429, which tells clients to retry). Messages name the
row. Serving is bounded by environment variables read when the model loads:

    FLAM_SERVE_AUDIO_ROOT       unset (default): `path` is refused; else a folder whose files
                                may be read (symlinks resolved, the real path must stay inside)
    FLAM_SERVE_MAX_DURATION_S   the longest audio decoded, in seconds (default 600)
    FLAM_SERVE_MAX_AUDIO_MB     the longest `audio_base64` text per row, in MB (default 50)

Audio is checked from its header (length, rate, channels) before anything is decoded, then
decoded by `flam_core.audio.io.read_audio` with the duration limit, which stops a file whose
header lies about its length. A refused, missing or unreadable `path` always gets the same
message (`PATH_REFUSED`), so answers do not tell which files exist on the server.

Imported by the registry and by `flam_core/serving.py`, the file MLflow runs to build the
model when it loads it ("models from code": no pickled object is stored).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import Array, ColSpec, Schema

from flam_core.errors import AudioError, AudioTooLongError, ConfigError, FlamError
from flam_core.inference import MODEL_ARTIFACT, YAMNET_ARTIFACT

ENV_AUDIO_ROOT = "FLAM_SERVE_AUDIO_ROOT"
ENV_MAX_DURATION_S = "FLAM_SERVE_MAX_DURATION_S"
ENV_MAX_AUDIO_MB = "FLAM_SERVE_MAX_AUDIO_MB"
DEFAULT_MAX_DURATION_S = 600.0
DEFAULT_MAX_AUDIO_MB = 50.0
MAX_PROMPTS = 256
MAX_PROMPT_CHARS = 1000
# Decoding memory grows with rate x channels x duration; these bound the first two so that the
# duration limit bounds memory (600 s at 96 kHz is 230 MB of float32 per channel).
MAX_SAMPLE_RATE = 96_000
MAX_CHANNELS = 8
PATH_REFUSED = "path is not an allowed, readable audio file under the serving audio root"
PATH_DISABLED = (
    f"path serving is disabled on this server: send the audio as audio_base64, or start the server with "
    f"{ENV_AUDIO_ROOT}=<folder> to serve the audio files under that folder"
)
_UNKNOWN_FRAMES = 1 << 62  # libsndfile reports SF_COUNT_MAX frames when a header gives no length


def input_schema() -> Schema:
    """The request columns (see the module docstring): only `prompts` is required."""
    return Schema(
        [
            ColSpec("string", "path", required=False),
            ColSpec("string", "audio_base64", required=False),
            ColSpec(Array("string"), "prompts"),
            ColSpec("double", "threshold", required=False),
            ColSpec("double", "max_duration_s", required=False),
        ]
    )


def signature() -> ModelSignature:
    """The pyfunc's signature: `input_schema()` in, detection documents out (no output schema)."""
    return ModelSignature(inputs=input_schema())


@dataclass(frozen=True)
class ServingLimits:
    """What a server may read and decode; `from_env` reads them from the environment."""

    audio_root: Path | None  # resolved folder `path` may read from; None: `path` is refused
    max_duration_s: float  # longest audio decoded, seconds
    max_audio_mb: float  # longest `audio_base64` text per row, MB (10^6 characters)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServingLimits:
        """Limits from `FLAM_SERVE_*`; raises ConfigError naming the variable when one is invalid."""
        environ = os.environ if environ is None else environ
        root_text = environ.get(ENV_AUDIO_ROOT, "").strip()
        root = None
        if root_text:
            root = Path(root_text).expanduser().resolve()
            if not root.is_dir():
                raise ConfigError(f"{ENV_AUDIO_ROOT}={root_text!r} is not a folder: name the audio root")
        return cls(
            audio_root=root,
            max_duration_s=_positive_env(environ, ENV_MAX_DURATION_S, DEFAULT_MAX_DURATION_S),
            max_audio_mb=_positive_env(environ, ENV_MAX_AUDIO_MB, DEFAULT_MAX_AUDIO_MB),
        )


def _positive_env(environ: Mapping[str, str], name: str, default: float) -> float:
    text = environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}={text!r} must be a positive number")
    return value


class FlamPyfunc(mlflow.pyfunc.PythonModel):
    """`flam_core.inference.FlamDetector` behind MLflow's pyfunc interface, with serving limits."""

    def load_context(self, context: Any) -> None:
        from flam_core.inference import FlamDetector
        from flam_core.model.folder import load_model, yamnet_weights

        self.limits = ServingLimits.from_env()
        with yamnet_weights(context.artifacts.get(YAMNET_ARTIFACT)):
            model, params, calibration = load_model(context.artifacts[MODEL_ARTIFACT])
        source = os.environ.get("FLAM_MODEL_URI", "flam-sed (pyfunc)")
        self.detector = FlamDetector(model, params, calibration, source=source)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> list[dict]:
        """One detection document per row; raises MlflowException (HTTP 400) naming a bad row."""
        if isinstance(model_input, dict):
            model_input = pd.DataFrame([model_input])
        if not isinstance(model_input, pd.DataFrame) or model_input.empty:
            raise _bad_request("the request holds no rows: send prompts and one of path or audio_base64")
        return [self._detect_row(i, row) for i, row in enumerate(model_input.to_dict(orient="records"))]

    def _detect_row(self, i: int, row: dict[str, Any]) -> dict[str, Any]:
        prompts = _prompts(row.get("prompts"), i)
        threshold = _number(row.get("threshold"), i, "threshold")
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise _bad_request(f"row {i}: threshold must be a number in [0, 1], got {threshold!r}")
        limit = self.limits.max_duration_s
        requested = _number(row.get("max_duration_s"), i, "max_duration_s")
        if requested is not None:
            if not 0.0 < requested <= limit:
                raise _bad_request(
                    f"row {i}: max_duration_s must be a number in (0, {limit:g}] (this server's "
                    f"{ENV_MAX_DURATION_S}), got {requested!r}"
                )
            limit = requested
        path, encoded = _text(row.get("path"), i, "path"), _text(row.get("audio_base64"), i, "audio_base64")
        if path is not None and encoded is not None:
            raise _bad_request(f"row {i}: give exactly one of path or audio_base64, not both")
        if path is None and encoded is None:
            raise _bad_request(f"row {i}: give path (a file under the serving audio root) or audio_base64")
        rate = self.detector.sample_rate
        if encoded is not None:
            with io.BytesIO(self._decode_base64(encoded, i)) as stream:
                samples = _read(stream, rate, limit, i, "audio_base64", None)
        else:
            with self._open_path(path, i) as stream:
                samples = _read(stream, rate, limit, i, "path", PATH_REFUSED)
        try:
            detection = self.detector.detect(
                samples, prompts, sample_rate=rate, threshold=threshold, max_duration_s=limit
            )
        except FlamError as exc:
            raise _bad_request(f"row {i}: {exc}") from exc
        return detection.to_json()

    def _decode_base64(self, encoded: str, i: int) -> bytes:
        size_mb = len(encoded) / 1e6
        if size_mb > self.limits.max_audio_mb:
            raise _bad_request(
                f"row {i}: audio_base64 holds {size_mb:.1f} MB, more than this server's limit of "
                f"{self.limits.max_audio_mb:g} MB ({ENV_MAX_AUDIO_MB}): send shorter or compressed audio"
            )
        try:
            return base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _bad_request(f"row {i}: audio_base64 is not valid base64 ({exc})") from exc

    def _open_path(self, path: str, i: int) -> IO[bytes]:
        """The file `path` names, opened, if its real path is a file inside the audio root.

        The file is opened once, here, and read through that handle, so it cannot be swapped
        for another between the check and the read.
        """
        root = self.limits.audio_root
        if root is None:
            raise _bad_request(f"row {i}: {PATH_DISABLED}")
        try:
            real = (root / path).resolve(strict=True)  # an absolute `path` replaces the root
            if not real.is_relative_to(root) or not real.is_file():
                raise _bad_request(f"row {i}: {PATH_REFUSED}")
            return real.open("rb")
        except (OSError, ValueError, RuntimeError) as exc:  # missing, unreadable, NUL byte, loop
            raise _bad_request(f"row {i}: {PATH_REFUSED}") from exc


def _read(
    stream: IO[bytes], rate: int, limit_s: float, i: int, field: str, refused: str | None
) -> np.ndarray:
    """Mono float32 samples `[n]` at `rate` Hz from an audio file object, within the limits.

    The header is checked first (rate, channels, stated length), then the file is decoded by
    `read_audio` with `limit_s`, which decodes block by block and stops when a header
    understates the length (it also refuses rates whose resampling would need a huge kernel).
    A file whose header does not read as audio is answered with `refused` when given (paths),
    else with the reason; later decoding errors always with the reason.
    """
    import soundfile as sf

    from flam_core.audio.io import read_audio

    try:
        info = sf.info(stream)
        stream.seek(0)
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError, OSError) as exc:
        reason = getattr(exc, "error_string", None) or str(exc)  # libsndfile's words, not the object's repr
        raise _bad_request(
            f"row {i}: {refused or f'{field} is not a readable audio file ({reason})'}"
        ) from exc
    if not 0 < info.samplerate <= MAX_SAMPLE_RATE or not 0 < info.channels <= MAX_CHANNELS:
        raise _bad_request(
            f"row {i}: {field} has {info.channels} channel(s) at {info.samplerate} Hz; this server "
            f"decodes up to {MAX_CHANNELS} channels at up to {MAX_SAMPLE_RATE} Hz"
        )
    if info.frames < _UNKNOWN_FRAMES and info.frames / info.samplerate > limit_s:
        raise _bad_request(_too_long(i, field, info.frames / info.samplerate, limit_s))
    try:
        samples, _ = read_audio(stream, sample_rate=rate, mono=True, max_duration_s=limit_s)
    except AudioTooLongError as exc:  # the header understated the length
        raise _bad_request(
            f"row {i}: {field}: {exc} (the limit: max_duration_s, at most this server's {ENV_MAX_DURATION_S})"
        ) from exc
    except AudioError as exc:
        raise _bad_request(f"row {i}: {field}: {exc}") from exc
    return samples


def _too_long(i: int, field: str, duration_s: float, limit_s: float) -> str:
    return (
        f"row {i}: {field} lasts {duration_s:.1f} s, longer than the limit of {limit_s:g} s "
        f"(max_duration_s, at most this server's {ENV_MAX_DURATION_S}): send a shorter excerpt"
    )


def _absent(value: Any) -> bool:
    """None, NaN and "" mean "not given": MLflow fills optional columns other rows set with them."""
    if value is None or (isinstance(value, str) and not value):
        return True
    return isinstance(value, float | np.floating) and math.isnan(value)


def _text(value: Any, i: int, name: str) -> str | None:
    if _absent(value):
        return None
    if not isinstance(value, str):
        raise _bad_request(f"row {i}: {name} must be a string, got {type(value).__name__}")
    return value


def _number(value: Any, i: int, name: str) -> float | None:
    if _absent(value):
        return None
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise _bad_request(f"row {i}: {name} must be a number, got {value!r}")
    return float(value)


def _prompts(value: Any, i: int) -> list[str]:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if (
        not isinstance(value, list | tuple)
        or not 0 < len(value) <= MAX_PROMPTS
        or not all(isinstance(p, str) and p.strip() and len(p) <= MAX_PROMPT_CHARS for p in value)
    ):
        raise _bad_request(
            f"row {i}: prompts must be a list of 1 to {MAX_PROMPTS} non-empty texts of at most "
            f"{MAX_PROMPT_CHARS} characters, got {str(value)[:200]}"
        )
    return list(value)


def _bad_request(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)
