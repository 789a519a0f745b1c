"""`mlflow models serve -m models:/flam-sed@champion` on loopback answers concurrent detection requests."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from flam_core.data.recipes import read_recipes
from flam_core.registry import register
from tests.conftest import smoke_params

pytestmark = pytest.mark.slow

PROMPTS = ["dog barking", "a bell rings", "speech"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.fixture(scope="module")
def server(smoke_models, smoke_recipes, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    env = os.environ | {
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlruns.db'}",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # uvicorn, from the venv
    }
    recipes, _ = smoke_recipes
    metrics = folder / "metrics.json"
    gate = {"test_unseen.frame_auroc_macro": 0.7, "test_unseen.psds1": 0.1}
    metrics.write_text(json.dumps({"gate": gate, "test_set_hash": "x"}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
        patch.chdir(folder)
        register(smoke_params(), smoke_models / "flam", metrics, recipes, out_dir=folder / "register")
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/flam-sed@champion"]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "2", "-t", "300"]
    log = (folder / "serve.log").open("w")
    process = subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow models serve exited: {(folder / 'serve.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=5) as answer:
                if answer.status == 200:
                    break
        except OSError:
            time.sleep(2)
    else:
        process.kill()
        pytest.fail("the model server did not answer /ping in 300 s")
    yield url
    process.terminate()
    process.wait(timeout=30)


def test_twenty_concurrent_requests_are_answered_correctly(server, mixer, smoke_recipes, tmp_path):
    recipes, _ = smoke_recipes
    plan = mixer.plan(read_recipes(recipes / "test_unseen.parquet"))
    payloads, lengths = [], []
    for i in range(20):
        audio = mixer.render(plan, i % len(plan))[: 16000 * (4 + i % 7)]  # 4-10 s
        path = tmp_path / f"request-{i}.wav"
        sf.write(path, audio, 16000)
        lengths.append(int(np.ceil(len(audio) / 16000 / 0.3125)))
        if i % 2:
            record = {"path": str(path), "audio_base64": "", "prompts": PROMPTS}
        else:
            record = {
                "path": "",
                "audio_base64": base64.b64encode(path.read_bytes()).decode(),
                "prompts": PROMPTS,
            }
        payloads.append({"dataframe_records": [record]})
    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(lambda p: post(f"{server}/invocations", p), payloads))
    for (status, body), frames in zip(answers, lengths, strict=True):
        assert status == 200, body
        (detection,) = body["predictions"]
        assert detection["prompts"] == PROMPTS
        assert np.asarray(detection["probs"]).shape == (len(PROMPTS), frames)
        assert all(0.0 <= s["onset"] < s["offset"] for s in detection["segments"])

    status, body = post(
        f"{server}/invocations", {"dataframe_records": [{"path": "/nope.wav", "prompts": PROMPTS}]}
    )
    assert status == 400 and "nope.wav" in json.dumps(body)
