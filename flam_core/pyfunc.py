"""The registered model: an MLflow pyfunc that answers detection requests.

Input: a DataFrame (or `dataframe_records` over HTTP), one row per request:

    path          str        an audio file readable where the model runs, or
    audio_base64  str        the bytes of an audio file (WAV, FLAC, OGG, MP3), base64-encoded
    prompts       list[str]  what to detect
    threshold     float      optional; default: the model's calibrated threshold

Output: one detection per row, exactly the `flam detect --json` document (`model`,
`frame_hop_s`, `prompts`, `probs`, `segments`). A bad row raises an error naming the row and
the problem; the server turns it into an HTTP 400 answer.

Imported only by the registry and by MLflow when it loads the model (it imports mlflow).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from flam_core.errors import FlamError
from flam_core.inference import MODEL_ARTIFACT, YAMNET_ARTIFACT


class FlamPyfunc(mlflow.pyfunc.PythonModel):
    """`flam_core.inference.FlamDetector` behind MLflow's pyfunc interface."""

    def load_context(self, context: Any) -> None:
        from flam_core.inference import FlamDetector, load_model, yamnet_weights

        with yamnet_weights(context.artifacts.get(YAMNET_ARTIFACT)):
            model, params, calibration = load_model(context.artifacts[MODEL_ARTIFACT])
        source = os.environ.get("FLAM_MODEL_URI", "flam-sed (pyfunc)")
        self.detector = FlamDetector(model, params, calibration, source=source)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> list[dict]:
        if isinstance(model_input, dict):
            model_input = pd.DataFrame([model_input])
        if not isinstance(model_input, pd.DataFrame) or model_input.empty:
            raise _bad_request("the request holds no rows: send path or audio_base64, and prompts")
        return [self._detect_row(i, row) for i, row in enumerate(model_input.to_dict(orient="records"))]

    def _detect_row(self, i: int, row: dict[str, Any]) -> dict[str, Any]:
        prompts = row.get("prompts")
        if isinstance(prompts, str):
            prompts = json.loads(prompts) if prompts.strip().startswith("[") else [prompts]
        if isinstance(prompts, np.ndarray):
            prompts = prompts.tolist()
        if not prompts:
            raise _bad_request(f"row {i}: no prompts")
        threshold = row.get("threshold")
        threshold = None if threshold is None or pd.isna(threshold) else float(threshold)
        try:
            audio: Any = _audio(row, i)
            if isinstance(audio, tuple):
                samples, rate = audio
                detection = self.detector.detect(
                    samples, list(prompts), sample_rate=rate, threshold=threshold
                )
            else:
                detection = self.detector.detect(audio, list(prompts), threshold=threshold)
        except FlamError as exc:
            raise _bad_request(f"row {i}: {exc}") from exc
        return detection.to_json()


def _audio(row: dict[str, Any], i: int) -> Any:
    import soundfile as sf

    encoded, path = row.get("audio_base64"), row.get("path")
    if isinstance(encoded, str) and encoded:
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _bad_request(f"row {i}: audio_base64 is not valid base64 ({exc})") from exc
        try:
            samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
            raise _bad_request(f"row {i}: audio_base64 does not decode as audio ({exc})") from exc
        if samples.shape[0] == 0:
            raise _bad_request(f"row {i}: audio_base64 holds no samples")
        return samples.T, int(rate)
    if isinstance(path, str) and path:
        return path
    raise _bad_request(f"row {i}: give path or audio_base64")


def _bad_request(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)
