"""The pyfunc's request rules, in process: signature, path confinement, size and duration limits, fuzz.

The model is saved from code (`flam_core/serving.py`) exactly as `flam register` logs it and
loaded with `mlflow.pyfunc.load_model`, so MLflow's own schema enforcement runs before
`FlamPyfunc.predict`, as on the server. Every refusal must be an `MlflowException` whose code
MLflow's scoring server answers with HTTP 400 (tests/test_serving.py checks over HTTP).
"""

from __future__ import annotations

import base64
import io
import math
import os
import struct
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow.exceptions import MlflowException
from mlflow.types import DataType
from mlflow.types.schema import Array

from flam_core.errors import ConfigError
from flam_core.pyfunc import (
    ENV_AUDIO_ROOT,
    ENV_MAX_AUDIO_MB,
    ENV_MAX_DURATION_S,
    PATH_DISABLED,
    PATH_REFUSED,
    ServingLimits,
    input_schema,
)
from flam_core.registry import pyfunc_arguments
from tests.conftest import smoke_params

PROMPTS = ["dog barking", "a bell rings"]
MAX_DURATION_S = 30.0  # the in-process server's FLAM_SERVE_MAX_DURATION_S
MAX_AUDIO_MB = 1.0  # and FLAM_SERVE_MAX_AUDIO_MB


# --- audio makers (also used by tests/test_serving.py) ---------------------------------------------
def noise(seconds: float, rate: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """`[n, channels]` float32 brown-ish noise at 0.3 peak: not silence, like a real recording."""
    walk = np.cumsum(np.random.default_rng(seed).standard_normal((int(seconds * rate), channels)), axis=0)
    walk -= walk.mean(axis=0)
    return (0.3 * walk / np.abs(walk).max()).astype(np.float32)


def encode(samples: np.ndarray, rate: int, fmt: str = "WAV") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype="PCM_16")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def silent_flac(hours: float, rate: int = 48000) -> bytes:
    """A FLAC of `hours` of digital silence, written in one-minute blocks: ~0.55 MB per hour at 48 kHz."""
    buffer = io.BytesIO()
    block = np.zeros(rate * 60, dtype=np.int16)
    with sf.SoundFile(buffer, "w", samplerate=rate, channels=1, format="FLAC", subtype="PCM_16") as out:
        for _ in range(int(round(hours * 60))):
            out.write(block)
    return buffer.getvalue()


def without_length(flac: bytes) -> bytes:
    """The same FLAC with the total sample count of its STREAMINFO set to 0 ("unknown").

    STREAMINFO follows `fLaC` and a 4-byte block header; bytes 18..25 of the file hold
    rate (20 bits), channels-1 (3), bits-1 (5) and the total samples (36).
    """
    assert flac[:4] == b"fLaC" and flac[4] & 0x7F == 0  # the first metadata block is STREAMINFO
    packed = int.from_bytes(flac[18:26], "big") & ~((1 << 36) - 1)
    return flac[:18] + packed.to_bytes(8, "big") + flac[26:]


def wav_header(rate: int, channels: int, bits: int, data_bytes: int, fmt_tag: int = 1) -> bytes:
    """A RIFF/WAVE header declaring `data_bytes` of sample data, whatever follows it."""
    block_align = max(1, channels * bits // 8) & 0xFFFF  # the fields are as wide as the format says
    fmt = struct.pack(
        "<HHIIHH", fmt_tag, channels, rate, (rate * block_align) & 0xFFFFFFFF, block_align, bits
    )
    riff_size = min(4 + 8 + len(fmt) + 8 + data_bytes, 0xFFFFFFFF)
    return (
        b"RIFF"
        + struct.pack("<I", riff_size)
        + b"WAVEfmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + b"data"
        + struct.pack("<I", min(data_bytes, 0xFFFFFFFF))
    )


# --- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_model(smoke_models, tmp_path_factory) -> Path:
    """The smoke FLAM model saved as `flam register` logs it (from code, same arguments)."""
    folder = tmp_path_factory.mktemp("pyfunc") / "model"
    mlflow.pyfunc.save_model(str(folder), **pyfunc_arguments(smoke_params(), smoke_models / "flam"))
    return folder


def load(model: Path, environ: dict[str, str]):
    with pytest.MonkeyPatch.context() as patch:
        for name in (ENV_AUDIO_ROOT, ENV_MAX_DURATION_S, ENV_MAX_AUDIO_MB):
            patch.delenv(name, raising=False)
        for name, value in environ.items():
            patch.setenv(name, value)
        return mlflow.pyfunc.load_model(str(model))


@pytest.fixture(scope="module")
def audio_root(tmp_path_factory) -> Path:
    """The serving audio root: one real recording, a nested one and a symlink that stays inside."""
    root = tmp_path_factory.mktemp("audio-root")
    (root / "sub").mkdir()
    sf.write(root / "clip.wav", noise(3.0, 16000), 16000)
    sf.write(root / "sub" / "clip.flac", noise(3.0, 44100, seed=1), 44100)
    (root / "alias.wav").symlink_to(root / "clip.wav")
    return root


@pytest.fixture(scope="module")
def served(saved_model, audio_root):
    """The model loaded as the server loads it, with an audio root and small limits."""
    return load(
        saved_model,
        {
            ENV_AUDIO_ROOT: str(audio_root),
            ENV_MAX_DURATION_S: str(MAX_DURATION_S),
            ENV_MAX_AUDIO_MB: str(MAX_AUDIO_MB),
        },
    )


def refused(model, row: dict, *fragments: str) -> str:
    """Predict one row, expect a 400 refusal naming row 0 and holding `fragments`; the message."""
    with pytest.raises(MlflowException) as info:
        model.predict(pd.DataFrame([row]))
    message = info.value.message
    assert info.value.get_http_status_code() == 400, message
    assert message.startswith("row 0: ") or "row 0" in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- tests ----------------------------------------------------------------------------------------
def test_signature_types_every_request_column():
    columns = {c.name: c for c in input_schema().inputs}
    assert list(columns) == ["path", "audio_base64", "prompts", "threshold", "max_duration_s"]
    assert [n for n, c in columns.items() if c.required] == ["prompts"]
    assert columns["prompts"].type == Array("string")
    assert columns["threshold"].type == columns["max_duration_s"].type == DataType.double
    assert columns["path"].type == columns["audio_base64"].type == DataType.string


def test_limits_come_from_the_environment(tmp_path):
    assert ServingLimits.from_env({}) == ServingLimits(None, 600.0, 50.0)
    limits = ServingLimits.from_env(
        {ENV_AUDIO_ROOT: str(tmp_path / "." / ""), ENV_MAX_DURATION_S: "12.5", ENV_MAX_AUDIO_MB: "3"}
    )
    assert limits == ServingLimits(tmp_path.resolve(), 12.5, 3.0)
    with pytest.raises(ConfigError, match=ENV_AUDIO_ROOT):
        ServingLimits.from_env({ENV_AUDIO_ROOT: str(tmp_path / "missing")})
    for bad in ("0", "-3", "nan", "inf", "ten"):
        with pytest.raises(ConfigError, match=ENV_MAX_DURATION_S):
            ServingLimits.from_env({ENV_MAX_DURATION_S: bad})
        with pytest.raises(ConfigError, match=ENV_MAX_AUDIO_MB):
            ServingLimits.from_env({ENV_MAX_AUDIO_MB: bad})


def test_the_model_is_logged_from_code_without_pickles(saved_model):
    import yaml

    flavor = yaml.safe_load((saved_model / "MLmodel").read_text())["flavors"]["python_function"]
    assert Path(flavor["model_code_path"]).name == "serving.py"
    assert "python_model" not in flavor  # the key of a CloudPickle'd PythonModel
    assert not [p for p in saved_model.rglob("*") if p.suffix in (".pkl", ".pickle", ".cloudpickle")]
    assert (saved_model / "artifacts").is_dir()


def test_paths_are_confined_to_the_audio_root(served, saved_model, audio_root, tmp_path):
    # Inside the root: absolute, relative, nested and through a symlink that stays inside.
    for path in (str(audio_root / "clip.wav"), "clip.wav", "sub/clip.flac", "alias.wav"):
        (out,) = served.predict(pd.DataFrame([{"path": path, "prompts": PROMPTS}]))
        assert np.asarray(out["probs"]).shape == (2, 10)

    secret = tmp_path / "secret.wav"  # a real audio file, but outside the root
    sf.write(secret, noise(1.0, 16000), 16000)
    (audio_root / "escape.wav").symlink_to(secret)
    (audio_root / "escape-dir").symlink_to(tmp_path)
    os.mkfifo(audio_root / "pipe.wav")  # would block a reader forever
    (audio_root / "text.wav").write_text("not audio")
    messages = {
        refused(served, {"path": path, "prompts": PROMPTS})
        for path in (
            "/etc/passwd",
            "/etc/shadow",
            "/proc/self/environ",
            str(secret),
            "../" * 12 + "etc/passwd",
            "escape.wav",
            "escape-dir/secret.wav",
            "missing.wav",
            str(audio_root / "missing.wav"),
            "sub",
            "pipe.wav",
            "text.wav",
            "clip.wav\x00.txt",
            "x" * 5000,
        )
    }
    assert messages == {f"row 0: {PATH_REFUSED}"}  # one message: no existence oracle

    unrooted = load(saved_model, {})
    message = refused(unrooted, {"path": str(audio_root / "clip.wav"), "prompts": PROMPTS})
    assert message == f"row 0: {PATH_DISABLED}" and ENV_AUDIO_ROOT in message
    (out,) = unrooted.predict(
        pd.DataFrame([{"audio_base64": b64(encode(noise(2.0, 16000), 16000))}]).assign(prompts=[PROMPTS])
    )
    assert out["prompts"] == PROMPTS


def test_rows_need_exactly_one_audio_source_and_valid_numbers(served, audio_root):
    audio = b64(encode(noise(2.0, 16000), 16000))
    good = {"audio_base64": audio, "prompts": PROMPTS}
    # Missing optional columns, None and NaN fillers all count as absent.
    out = served.predict(
        pd.DataFrame([good, {"path": "clip.wav", "prompts": PROMPTS, "threshold": 0.5, "audio_base64": None}])
    )
    assert len(out) == 2
    with pytest.raises(MlflowException, match="row 1: give exactly one of path or audio_base64"):
        served.predict(pd.DataFrame([good, good | {"path": "clip.wav"}]))
    refused(served, {"path": "", "audio_base64": "", "prompts": PROMPTS}, "give path")
    refused(served, {"prompts": PROMPTS}, "give path")
    for threshold in (-1.0, 1.5, float("inf"), -float("inf")):
        refused(served, good | {"threshold": threshold}, "threshold must be a number in [0, 1]")
    with pytest.raises(MlflowException) as info:  # MLflow's schema refuses what is not a number
        served.predict(pd.DataFrame([good | {"threshold": "abc"}]))
    assert info.value.get_http_status_code() == 400
    for prompts in ([], [""], ["  "], ["x" * 1001], ["p"] * 257):
        refused(served, good | {"prompts": prompts}, "prompts must be a list")
    refused(served, {"audio_base64": "not base64!", "prompts": PROMPTS}, "not valid base64")
    refused(served, {"audio_base64": b64(b"RIFF" + bytes(64)), "prompts": PROMPTS}, "not a readable audio")
    silent = b64(encode(np.zeros((16000, 1), np.float32), 16000))
    refused(served, {"audio_base64": silent, "prompts": PROMPTS}, "digital silence")


def test_duration_rate_and_size_limits(served):
    start = time.monotonic()
    bomb = silent_flac(2.0)  # 2 h at 48 kHz: 1.1 MB, 1.4 GB of float32 once decoded
    message = refused(served, {"audio_base64": b64(bomb), "prompts": PROMPTS}, "audio_base64 holds")
    assert ENV_MAX_AUDIO_MB in message  # 1.5 MB of base64 is over this server's 1 MB
    short = silent_flac(0.5)  # 30 min: 0.28 MB
    refused(served, {"audio_base64": b64(short), "prompts": PROMPTS}, "lasts 1800.0 s", ENV_MAX_DURATION_S)
    # A header that does not state the length: the decoder stops at the limit.
    refused(
        served, {"audio_base64": b64(without_length(short)), "prompts": PROMPTS}, str(int(MAX_DURATION_S))
    )
    audio = b64(encode(noise(2.0, 16000), 16000))
    refused(served, {"audio_base64": audio, "prompts": PROMPTS, "max_duration_s": 1.0}, "lasts 2.0 s")
    refused(served, {"audio_base64": audio, "prompts": PROMPTS, "max_duration_s": 31.0}, "max_duration_s")
    refused(served, {"audio_base64": audio, "prompts": PROMPTS, "max_duration_s": 0.0}, "max_duration_s")
    (out,) = served.predict(
        pd.DataFrame([{"audio_base64": audio, "prompts": PROMPTS, "max_duration_s": 2.5}])
    )
    assert out["duration_s"] == 2.0
    for rate, channels, fragment in (
        (44101, 1, "44101 Hz"),
        (192000, 1, "192000 Hz"),
        (16000, 9, "9 channel"),
    ):
        data = b64(encode(noise(0.5, rate, channels), rate))
        refused(served, {"audio_base64": data, "prompts": PROMPTS}, fragment)
    for rate in (8000, 22050, 44100, 48000, 96000):  # standard rates and stereo are served
        data = b64(encode(noise(1.0, rate, 2), rate))
        (out,) = served.predict(pd.DataFrame([{"audio_base64": data, "prompts": PROMPTS}]))
        assert out["duration_s"] == 1.0
    assert time.monotonic() - start < 60  # nothing above decodes or resamples the expensive way


# --- fuzz -------------------------------------------------------------------------------------------
def _truncated(fmt: str, rate: int, fraction: float) -> bytes:
    data = encode(noise(0.5, rate), rate, fmt)
    return data[: int(len(data) * fraction)]


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
audio_bytes = st.one_of(
    st.binary(max_size=512),
    st.builds(
        _truncated, st.sampled_from(["WAV", "FLAC"]), st.sampled_from([8000, 16000, 44100]), st.floats(0, 1)
    ),
    st.builds(
        lambda header, tail: header + tail,
        st.builds(
            wav_header,
            rate=st.one_of(
                st.sampled_from([0, 1, 7, 8000, 44101, 96001, 2**31 - 1, 2**32 - 1]),
                st.integers(0, 2**32 - 1),
            ),
            channels=st.one_of(st.sampled_from([0, 1, 2, 9, 1024, 65535]), st.integers(0, 65535)),
            bits=st.sampled_from([0, 1, 8, 12, 16, 24, 32, 64]),
            data_bytes=st.one_of(st.just(2**32 - 1), st.integers(0, 2**32 - 1)),
            fmt_tag=st.sampled_from([1, 3, 0xFFFE, 2, 0]),
        ),
        st.binary(max_size=256),
    ),
    st.builds(lambda rate: encode(noise(0.5, rate), rate), st.sampled_from([8000, 16000, 44100, 44101])),
)
rows = st.fixed_dictionaries(
    {},
    optional={
        "prompts": st.one_of(
            st.lists(st.text(max_size=12), max_size=3), st.lists(json_scalars, max_size=3), json_scalars
        ),
        "threshold": json_scalars,
        "max_duration_s": json_scalars,
        "audio_base64": st.one_of(st.builds(b64, audio_bytes), st.text(max_size=40)),
        "path": st.one_of(st.sampled_from(["clip.wav", "/etc/passwd", "..", "/", ""]), st.text(max_size=30)),
    },
)
# Rows MLflow's schema lets through, so that the audio and the numbers reach the model's checks.
audio_rows = st.fixed_dictionaries(
    {
        "prompts": st.lists(
            st.sampled_from(["dog barking", "a bell rings", "speech"]), min_size=1, max_size=3
        ),
        "audio_base64": st.builds(b64, audio_bytes),
    },
    optional={
        "threshold": st.one_of(st.floats(-0.5, 1.5), st.just(math.nan)),
        "max_duration_s": st.one_of(st.floats(-1, 40), st.just(0.1), st.just(math.nan)),
    },
)


def answered_or_refused(model, row: dict) -> None:
    """One request row gets a detection or a 4xx MlflowException, nothing else."""
    try:
        out = model.predict(pd.DataFrame([row]))
    except MlflowException as exc:
        assert 400 <= exc.get_http_status_code() < 500, exc.message
        return
    (detection,) = out
    assert np.asarray(detection["probs"]).shape[0] == len(detection["prompts"])


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(row=rows)
def test_any_request_row_is_answered_or_refused_with_a_400(served, row):
    answered_or_refused(served, row)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(row=audio_rows)
def test_any_audio_bytes_are_answered_or_refused_with_a_400(served, row):
    answered_or_refused(served, row)
