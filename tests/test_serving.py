"""`mlflow models serve -m models:/flam-sed@champion` on loopback: the README's requests, limits, abuse.

One server (2 workers) serves the smoke model with an audio root and a 120 s duration limit;
its workers' peak memory is read from /proc after a decompression bomb.
"""

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
import soundfile as sf

from flam_core.data.recipes import read_recipes
from flam_core.pyfunc import ENV_AUDIO_ROOT, ENV_MAX_AUDIO_MB, ENV_MAX_DURATION_S, PATH_REFUSED
from flam_core.registry import register
from tests.conftest import smoke_params
from tests.test_serving_limits import b64, encode, noise, silent_flac, without_length

pytestmark = pytest.mark.slow

PROMPTS = ["dog barking", "a bell rings", "speech"]
MAX_DURATION_S = 120  # the server's FLAM_SERVE_MAX_DURATION_S
MAX_AUDIO_MB = 5  # and FLAM_SERVE_MAX_AUDIO_MB
PEAK_RSS_LIMIT = 1.5 * 2**30


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


def error_of(body: dict) -> str:
    """Our message inside the scoring server's answer (`Failed to predict data '...'. Error: ...`)."""
    return body["message"].rsplit("\nError: ", 1)[-1]


@dataclass
class Server:
    url: str
    audio_root: Path
    pid: int

    def invoke(self, *records: dict) -> tuple[int, dict]:
        return post(f"{self.url}/invocations", {"dataframe_records": list(records)})

    def processes(self) -> list[psutil.Process]:
        """The mlflow command, uvicorn and its workers."""
        return [psutil.Process(self.pid), *psutil.Process(self.pid).children(recursive=True)]

    def peak_rss(self) -> dict[int, int]:
        """Peak resident memory (VmHWM, bytes) of every process of the server (workers included)."""
        peaks = {}
        for process in self.processes():
            status = Path(f"/proc/{process.pid}/status").read_text()
            (line,) = [x for x in status.splitlines() if x.startswith("VmHWM:")]
            peaks[process.pid] = int(line.split()[1]) * 1024  # kB
        return peaks

    def reset_peak_rss(self) -> None:
        """Start the peaks afresh from the current resident memory (Linux: clear_refs 5)."""
        for process in self.processes():
            Path(f"/proc/{process.pid}/clear_refs").write_text("5")


@pytest.fixture(scope="module")
def server(smoke_models, smoke_recipes, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    audio_root = folder / "audio"
    audio_root.mkdir()
    env = os.environ | {
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlruns.db'}",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # uvicorn, from the venv
        ENV_AUDIO_ROOT: str(audio_root),
        ENV_MAX_DURATION_S: str(MAX_DURATION_S),
        ENV_MAX_AUDIO_MB: str(MAX_AUDIO_MB),
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
    yield Server(url, audio_root, process.pid)
    children = psutil.Process(process.pid).children(recursive=True)
    process.terminate()
    process.wait(timeout=30)
    for child in children:  # uvicorn and its workers, when they outlive the mlflow command
        if child.is_running():
            child.terminate()
    psutil.wait_procs(children, timeout=30)


def test_twenty_concurrent_requests_are_answered_correctly(server, mixer, smoke_recipes):
    recipes, _ = smoke_recipes
    plan = mixer.plan(read_recipes(recipes / "test_unseen.parquet"))
    payloads, lengths = [], []
    for i in range(20):
        audio = mixer.render(plan, i % len(plan))[: 16000 * (4 + i % 7)]  # 4-10 s
        path = server.audio_root / f"request-{i}.wav"
        sf.write(path, audio, 16000)
        lengths.append(int(np.ceil(len(audio) / 16000 / 0.3125)))
        if i % 2:  # relative and absolute paths, with or without an empty audio_base64
            record = {"path": path.name if i % 4 == 1 else str(path), "prompts": PROMPTS}
            record |= {"audio_base64": ""} if i % 4 == 3 else {}
        else:
            record = {"audio_base64": base64.b64encode(path.read_bytes()).decode(), "prompts": PROMPTS}
        payloads.append({"dataframe_records": [record]})
    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(lambda p: post(f"{server.url}/invocations", p), payloads))
    for (status, body), frames in zip(answers, lengths, strict=True):
        assert status == 200, body
        (detection,) = body["predictions"]
        assert detection["prompts"] == PROMPTS
        assert np.asarray(detection["probs"]).shape == (len(PROMPTS), frames)
        assert all(0.0 <= s["onset"] < s["offset"] for s in detection["segments"])


def test_readme_example_and_threshold(server):
    recording = server.audio_root / "recording.wav"
    sf.write(recording, noise(6.0, 16000, channels=2), 16000)
    # The README's request: a path under the audio root and prompts, no other column.
    status, body = server.invoke({"path": str(recording), "prompts": ["dog barking", "siren"]})
    assert status == 200, body
    (detection,) = body["predictions"]
    assert detection["prompts"] == ["dog barking", "siren"] and detection["duration_s"] == 6.0
    assert np.asarray(detection["probs"]).shape == (2, 20)

    # threshold reaches the detector: 0 marks every frame, 1 none; None and a missing column
    # (MLflow fills it with NaN for rows that lack it) mean the calibrated threshold.
    audio = b64(recording.read_bytes())
    status, body = server.invoke(
        {"path": recording.name, "prompts": PROMPTS, "threshold": 0.0},
        {"audio_base64": audio, "prompts": PROMPTS, "threshold": 1.0},
        {"audio_base64": audio, "prompts": PROMPTS, "threshold": None},
        {"path": recording.name, "prompts": PROMPTS},
    )
    assert status == 200, body
    everything, nothing, default_none, default_missing = body["predictions"]
    assert [(s["prompt"], s["onset"], s["offset"]) for s in everything["segments"]] == [
        (p, 0.0, 6.0) for p in PROMPTS
    ]
    assert nothing["segments"] == []
    np.testing.assert_allclose(everything["probs"], nothing["probs"], atol=1e-4)  # path == its bytes
    assert default_none["segments"] == default_missing["segments"]

    for threshold in (-1, 1.5, "abc"):
        status, body = server.invoke({"path": recording.name, "prompts": PROMPTS, "threshold": threshold})
        assert status == 400, body
        assert "threshold" in body["message"], body
    status, body = server.invoke({"path": recording.name, "prompts": PROMPTS, "threshold": "0.5"})
    assert status == 200, body  # MLflow converts numeric text to the column's double


def test_both_or_neither_audio_field_is_a_400_naming_the_row(server):
    recording = server.audio_root / "both.wav"
    sf.write(recording, noise(2.0, 16000), 16000)
    good = {"path": recording.name, "prompts": PROMPTS}
    status, body = server.invoke(good, good | {"audio_base64": b64(recording.read_bytes())})
    assert status == 400 and error_of(body) == "row 1: give exactly one of path or audio_base64, not both"
    status, body = server.invoke(good, good, {"prompts": PROMPTS})
    assert status == 400 and error_of(body).startswith("row 2: give path"), body
    status, body = server.invoke({"path": "", "audio_base64": None, "prompts": PROMPTS})
    assert status == 400 and error_of(body).startswith("row 0: give path"), body


def test_paths_outside_the_root_and_missing_files_get_one_answer(server, tmp_path):
    outside = tmp_path / "outside.wav"  # a readable audio file, outside the root
    sf.write(outside, noise(1.0, 16000), 16000)
    (server.audio_root / "link-out.wav").symlink_to(outside)
    answers = [
        server.invoke({"path": path, "prompts": PROMPTS})
        for path in (
            "/etc/passwd",
            "/nope.wav",
            str(outside),
            "../" * 10 + "etc/passwd",
            "link-out.wav",
            str(server.audio_root / "missing.wav"),
        )
    ]
    assert {status for status, _ in answers} == {400}
    assert {error_of(body) for _, body in answers} == {f"row 0: {PATH_REFUSED}"}, answers


def test_decompression_bombs_and_oversized_payloads_are_refused(server):
    bomb = silent_flac(2.0)  # 2 h at 48 kHz: 1.1 MB of FLAC, 1.4 GB of float32 once decoded
    hidden = without_length(bomb)  # the same, its header not stating a length
    assert len(b64(bomb)) < MAX_AUDIO_MB * 1e6
    lifetime = server.peak_rss()  # model loading and the requests of the tests above
    server.reset_peak_rss()
    status, body = server.invoke({"audio_base64": b64(bomb), "prompts": PROMPTS})
    assert status == 400 and "lasts 7200.0 s" in error_of(body), body
    status, body = server.invoke({"audio_base64": b64(hidden), "prompts": PROMPTS})
    assert status == 400 and f"limit of {MAX_DURATION_S} s" in error_of(body), body
    peaks = server.peak_rss()
    mib = {pid: (lifetime[pid] >> 20, peak >> 20) for pid, peak in peaks.items()}
    print(f"peak RSS of the server's processes (MiB), until the bombs and while they were refused: {mib}")
    assert max(peaks.values()) < PEAK_RSS_LIMIT, mib

    status, body = server.invoke({"audio_base64": "A" * int(MAX_AUDIO_MB * 1e6 + 4), "prompts": PROMPTS})
    assert status == 400 and ENV_MAX_AUDIO_MB in error_of(body), body
    short = b64(encode(noise(3.0, 16000), 16000))
    status, body = server.invoke({"audio_base64": short, "prompts": PROMPTS, "max_duration_s": 2})
    assert status == 400 and "lasts 3.0 s" in error_of(body), body
    status, body = server.invoke({"audio_base64": short, "prompts": PROMPTS, "max_duration_s": 121})
    assert status == 400 and ENV_MAX_DURATION_S in error_of(body), body
    status, body = server.invoke({"audio_base64": short, "prompts": PROMPTS, "max_duration_s": 3})
    assert status == 200, body
