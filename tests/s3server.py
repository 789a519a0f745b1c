"""A real S3 API for tests: `moto_server` on loopback, and a fault-injecting HTTP proxy in front of it.

Test modules get the server through the `s3_endpoint` fixture::

    from tests.s3server import s3_endpoint  # noqa: F401

It starts one ``moto_server`` per module, points the standard AWS environment at it (dummy credentials,
region us-east-1, ``AWS_ENDPOINT_URL``) for the module's duration and stops the server afterwards.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

HOST = "127.0.0.1"
REGION = "us-east-1"
START_TIMEOUT_S = 10.0

# Variables that would point boto3, DVC or MLflow elsewhere than the test server.
CLEARED_ENV = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_MAX_ATTEMPTS",
    "AWS_RETRY_MODE",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    "MLFLOW_S3_ENDPOINT_URL",
)


def free_port(host: str = HOST) -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def aws_env(endpoint: str, config_dir: Path) -> dict[str, str]:
    """The standard AWS variables for talking to a test server: dummy credentials, and empty AWS
    config and credentials files in `config_dir` instead of ~/.aws."""
    config_dir.mkdir(parents=True, exist_ok=True)
    for name in ("config", "credentials"):
        (config_dir / name).touch()
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_CONFIG_FILE": str(config_dir / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(config_dir / "credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def _answers(host: str, port: int) -> bool:
    conn = http.client.HTTPConnection(host, port, timeout=1.0)
    try:
        conn.request("GET", "/")
        return conn.getresponse().status < 500
    except OSError:
        return False
    finally:
        conn.close()


def _moto_command(host: str, port: int) -> list[str]:
    script = Path(sys.executable).parent / "moto_server"
    if script.is_file():
        return [str(script), "-H", host, "-p", str(port)]
    found = shutil.which("moto_server")
    if found:
        return [found, "-H", host, "-p", str(port)]
    return [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)]


@contextlib.contextmanager
def moto_server(host: str = HOST, timeout: float | None = None) -> Iterator[str]:
    """Run ``moto_server`` on a free loopback port; yield its endpoint URL once it answers.

    `timeout` defaults to ``FLAM_S3_SERVER_TIMEOUT`` seconds, else 10.
    """
    timeout = timeout or float(os.environ.get("FLAM_S3_SERVER_TIMEOUT") or START_TIMEOUT_S)
    with tempfile.TemporaryFile("w+") as log:
        for _ in range(3):  # the port may be taken between choosing and binding it: then try another
            port = free_port(host)
            proc = subprocess.Popen(
                _moto_command(host, port), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline and not _answers(host, port):
                time.sleep(0.1)
            if proc.poll() is None and _answers(host, port):
                break
            exited = proc.poll() is not None
            _stop(proc)
            if not exited:
                log.seek(0)
                tail = log.read()[-2000:]
                raise RuntimeError(f"moto_server did not answer within {timeout:.0f} s:\n{tail}")
        else:
            log.seek(0)
            raise RuntimeError(f"moto_server exited three times:\n{log.read()[-2000:]}")
        try:
            yield f"http://{host}:{port}"
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def s3_server_fixture(scope: str = "module", name: str = "s3_endpoint") -> Callable:
    """A pytest fixture that runs a moto server and points the AWS environment at it; yields the URL."""

    @pytest.fixture(scope=scope, name=name)
    def _s3_endpoint() -> Iterator[str]:
        with (
            moto_server() as endpoint,
            tempfile.TemporaryDirectory(prefix="aws-") as config_dir,
            pytest.MonkeyPatch.context() as patch,
        ):
            for var in CLEARED_ENV:
                patch.delenv(var, raising=False)
            for var, value in aws_env(endpoint, Path(config_dir)).items():
                patch.setenv(var, value)
            yield endpoint

    return _s3_endpoint


s3_endpoint = s3_server_fixture()


def make_bucket(endpoint: str, prefix: str = "test") -> str:
    """Create a bucket with a unique name on the server; return the name."""
    import boto3

    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket=name)
    return name


# --- fault injection ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProxiedRequest:
    method: str
    path: str
    status: int
    outcome: str  # "failed" (injected error), "forwarded", or "truncated" (body cut off)


_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
    | {"expect"}  # the proxy has already answered "100 Continue" and read the body
)


class FaultProxy:
    """A loopback HTTP proxy in front of an S3 endpoint that fails or truncates requests on demand.

    `fail_next(n)` answers the next `n` requests with an S3 error (503 SlowDown by default) without
    forwarding them; `truncate_objects = True` forwards object GETs but sends only half the body, then
    drops the connection (a string instead of True limits that to request paths containing it).
    Every request is recorded in `requests` before it is answered, so a test that has its response sees it.
    """

    def __init__(self, upstream: str, host: str = HOST) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or HOST, parts.port or 80)
        self.requests: list[ProxiedRequest] = []
        self.truncate_objects: bool | str = False
        self._failures: list[tuple[int, str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, 0), _ProxyHandler)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def fail_next(
        self,
        count: int,
        status: int = 503,
        code: str = "SlowDown",
        message: str = "Please reduce your request rate.",
    ) -> None:
        """Answer the next `count` requests with this S3 error instead of forwarding them."""
        with self._lock:
            self._failures.extend([(status, code, message)] * count)

    def statuses(self) -> list[int]:
        with self._lock:
            return [r.status for r in self.requests]

    def _take_failure(self) -> tuple[int, str, str] | None:
        with self._lock:
            return self._failures.pop(0) if self._failures else None

    def _record(self, request: ProxiedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        body = self._read_body()
        failure = proxy._take_failure()
        if failure is not None:
            status, code, message = failure
            payload = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Error><Code>{code}</Code><Message>{message}</Message>"
                f"<RequestId>fault-{len(proxy.requests)}</RequestId></Error>"
            ).encode()
            # Recorded before answering: once the client has its answer, the record must be there.
            proxy._record(ProxiedRequest(self.command, self.path, status, "failed"))
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return

        conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for key, value in self.headers.items():
                if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                    conn.putheader(key, value)
            if body or self.command in ("PUT", "POST"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            response = conn.getresponse()
            data = response.read()
            headers = response.getheaders()
        finally:
            conn.close()

        names = {k.lower() for k, _ in headers}
        wanted = proxy.truncate_objects
        truncate = (
            (wanted is True or (isinstance(wanted, str) and bool(wanted) and wanted in self.path))
            and self.command == "GET"
            and "etag" in names
            and response.status in (200, 206)
            and len(data) > 1
        )
        proxy._record(
            ProxiedRequest(self.command, self.path, response.status, "truncated" if truncate else "forwarded")
        )
        self.send_response(response.status)
        for key, value in headers:
            if key.lower() in _HOP_BY_HOP or key.lower() in ("server", "date"):
                continue
            if key.lower() == "content-length" and self.command != "HEAD":
                continue
            self.send_header(key, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        if truncate:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data[: len(data) // 2] if truncate else data)
        self.wfile.flush()

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()
