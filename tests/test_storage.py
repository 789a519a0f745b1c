"""flam_core.storage against a real S3 API (moto_server on loopback), and DVC / MLflow with S3 stores.

Transient errors and broken downloads come from `FaultProxy`, a real HTTP proxy between the client
and the server that answers 503 SlowDown or cuts response bodies short on demand.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from flam_core import storage
from flam_core.errors import ConfigError, DataError
from flam_core.storage import StorageError
from tests.s3server import HOST, FaultProxy, free_port, make_bucket, s3_endpoint  # noqa: F401

MiB = 1 << 20
BIN = Path(sys.executable).parent


@pytest.fixture
def bucket(s3_endpoint: str) -> str:  # noqa: F811
    return make_bucket(s3_endpoint)


@pytest.fixture
def proxy(s3_endpoint: str):  # noqa: F811
    with FaultProxy(s3_endpoint) as running:
        yield running


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- URIs and client settings ------------------------------------------------------------------------


def test_parse_uri_splits_bucket_and_key():
    assert storage.parse_uri("s3://flam-data/dvc/files/md5/ab") == ("flam-data", "dvc/files/md5/ab")
    assert storage.parse_uri("s3://flam-data") == ("flam-data", "")
    assert storage.parse_uri("s3://flam-data/") == ("flam-data", "")


@pytest.mark.parametrize(
    "uri",
    [
        "flam-data/recipes.parquet",
        "s3:/flam-data/recipes.parquet",
        "S3://flam-data/recipes.parquet",
        "gs://flam-data/recipes.parquet",
        "s3://",
        "s3:///recipes.parquet",
        "s3://Flam_Data/recipes.parquet",
        "s3://ab/recipes.parquet",
        "s3://flam-data//recipes.parquet",
    ],
)
def test_parse_uri_rejects_malformed_uris(uri):
    with pytest.raises(ConfigError, match=r"S3 URI|bucket name|empty path segment") as caught:
        storage.parse_uri(uri)
    assert uri in str(caught.value)


def test_object_operations_reject_prefixes_and_foreign_schemes():
    with pytest.raises(ConfigError, match="not an object"):
        storage.read_bytes("s3://flam-data/shards/")
    with pytest.raises(ConfigError, match="only local paths and s3://"):
        storage.read_bytes("gs://flam-data/x")


def test_s3_client_reads_endpoint_region_and_retries_from_env(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:2")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    client = storage.s3_client()
    assert client.meta.endpoint_url == "http://127.0.0.1:2"
    assert client.meta.region_name == "eu-west-3"
    # botocore turns `max_attempts` (retries) into `total_max_attempts` (the first attempt included)
    retries = client.meta.config.retries
    assert retries == {"mode": "standard", "total_max_attempts": storage.DEFAULT_RETRIES + 1}
    assert client.meta.config.s3["addressing_style"] == "path"

    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    client = storage.s3_client()
    assert client.meta.endpoint_url == "http://127.0.0.1:1"
    assert client.meta.config.retries["total_max_attempts"] == 3
    assert storage.s3_client(retries=0).meta.config.retries["total_max_attempts"] == 1
    assert storage.s3_client(endpoint_url="http://127.0.0.1:3").meta.endpoint_url == "http://127.0.0.1:3"

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "zero")
    with pytest.raises(ConfigError, match="AWS_MAX_ATTEMPTS"):
        storage.s3_client()


def test_transfer_config_sets_multipart_threshold_and_part_size():
    default = storage.transfer_config()
    assert default.multipart_threshold == 64 * MiB
    assert default.multipart_chunksize == 64 * MiB
    small = storage.transfer_config(multipart_threshold=5 * MiB)
    assert (small.multipart_threshold, small.multipart_chunksize) == (5 * MiB, 5 * MiB)


# --- round trips ----------------------------------------------------------------------------------------


def test_bytes_round_trip(bucket):
    uri = f"s3://{bucket}/models/head.pt"
    payload = os.urandom(4096)
    assert not storage.exists(uri)
    storage.write_bytes(uri, payload)
    assert storage.exists(uri)
    assert storage.exists(f"s3://{bucket}")
    assert storage.read_bytes(uri) == payload
    storage.write_bytes(uri, b"")
    assert storage.read_bytes(uri) == b""


def test_file_round_trip_through_every_copy_direction(bucket, tmp_path):
    source = tmp_path / "recipes.parquet"
    source.write_bytes(os.urandom(100_000))
    uri = f"s3://{bucket}/recipes/train.parquet"
    assert storage.upload_file(source, uri) == uri
    storage.download_file(uri, tmp_path / "out" / "train.parquet")
    assert (tmp_path / "out" / "train.parquet").read_bytes() == source.read_bytes()

    storage.copy(uri, f"s3://{bucket}/backup/train.parquet")
    storage.copy(f"s3://{bucket}/backup/train.parquet", tmp_path / "from-s3.parquet")
    storage.copy(tmp_path / "from-s3.parquet", f"s3://{bucket}/again.parquet")
    storage.copy(tmp_path / "from-s3.parquet", tmp_path / "local" / "copy.parquet")
    assert storage.read_bytes(f"s3://{bucket}/again.parquet") == source.read_bytes()
    assert storage.read_bytes(tmp_path / "local" / "copy.parquet") == source.read_bytes()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["from-s3.parquet", "local", "out", "recipes.parquet"]


def test_directory_round_trip_replaces_the_target_folder(bucket, tmp_path):
    source = tmp_path / "shards"
    (source / "train" / "nested").mkdir(parents=True)
    (source / "train" / "shard-000000.tar").write_bytes(os.urandom(30_000))
    (source / "train" / "nested" / "index.json").write_text('{"shards": 1}')
    (source / "empty.txt").write_bytes(b"")
    prefix = f"s3://{bucket}/shards/v1"
    storage.write_bytes(f"s3://{bucket}/shards/v1x/not-mine.txt", b"neighbour")

    uploaded = storage.upload_dir(source, prefix)
    expected = sorted(f"{prefix}/{name}" for name in tree(source))
    assert uploaded == expected
    assert storage.list_uris(prefix + "/") == expected

    target = tmp_path / "copy"
    target.mkdir()
    (target / "stale.txt").write_text("from an older version")
    files = storage.download_dir(prefix, target)
    assert files == sorted(target / name for name in tree(source))
    assert tree(target) == tree(source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "shards"]


def test_local_paths_share_the_api(tmp_path):
    path = tmp_path / "a" / "b.bin"
    storage.write_bytes(path, b"local")
    assert storage.exists(path)
    assert storage.read_bytes(str(path)) == b"local"
    assert storage.list_uris(tmp_path) == [str(path)]
    assert storage.list_uris(tmp_path / "a" / "b") == [str(path)]
    assert storage.list_uris(tmp_path / "a" / "c") == []


def test_large_object_is_uploaded_in_parts_and_round_trips(bucket, tmp_path):
    payload = os.urandom(12 * MiB)
    source = tmp_path / "model.bin"
    source.write_bytes(payload)
    parts = storage.transfer_config(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    client = storage.s3_client()

    storage.upload_file(source, f"s3://{bucket}/multi.bin", transfer=parts)
    storage.upload_file(source, f"s3://{bucket}/single.bin")  # below the default 64 MiB threshold
    assert client.head_object(Bucket=bucket, Key="multi.bin")["ETag"].strip('"').endswith("-3")
    assert "-" not in client.head_object(Bucket=bucket, Key="single.bin")["ETag"]

    storage.download_file(f"s3://{bucket}/multi.bin", tmp_path / "back.bin", transfer=parts)
    assert sha256((tmp_path / "back.bin").read_bytes()) == sha256(payload)


# --- transient errors -------------------------------------------------------------------------------------


def test_transient_errors_are_retried_until_the_request_succeeds(bucket, proxy):
    client = storage.s3_client(endpoint_url=proxy.url, retries=3)
    uri = f"s3://{bucket}/retried.bin"

    proxy.fail_next(2)
    storage.write_bytes(uri, b"after two 503s", client=client)
    assert [(r.method, r.status) for r in proxy.requests] == [("PUT", 503), ("PUT", 503), ("PUT", 200)]
    assert storage.read_bytes(uri) == b"after two 503s"  # straight to the server

    proxy.requests.clear()
    proxy.fail_next(2)
    assert storage.read_bytes(uri, client=client) == b"after two 503s"
    assert proxy.statuses()[:2] == [503, 503]
    assert proxy.statuses()[2:] == [200] * (len(proxy.requests) - 2)


def test_without_retries_a_transient_error_fails_clearly(bucket, proxy):
    uri = f"s3://{bucket}/not-retried.bin"
    proxy.fail_next(1)
    with pytest.raises(StorageError, match="SlowDown") as caught:
        storage.write_bytes(uri, b"x", client=storage.s3_client(endpoint_url=proxy.url, retries=0))
    message = str(caught.value)
    assert uri in message
    assert "HTTP 503" in message
    assert "after 1 attempt(s)" in message
    assert proxy.statuses() == [503]
    assert not storage.exists(uri)

    proxy.requests.clear()
    proxy.fail_next(2)
    with pytest.raises(StorageError, match=r"after 2 attempt\(s\)"):
        storage.write_bytes(uri, b"x", client=storage.s3_client(endpoint_url=proxy.url, retries=1))
    assert proxy.statuses() == [503, 503]


# --- missing objects and failed downloads -------------------------------------------------------------


def test_missing_object_raises_data_error_naming_the_uri(bucket, tmp_path):
    uri = f"s3://{bucket}/recipes/missing.parquet"
    assert not storage.exists(uri)
    assert storage.list_uris(f"s3://{bucket}/recipes/") == []
    for action in (
        lambda: storage.read_bytes(uri),
        lambda: storage.download_file(uri, tmp_path / "out.parquet"),
        lambda: storage.copy(uri, f"s3://{bucket}/elsewhere.parquet"),
        lambda: storage.copy(uri, tmp_path / "out.parquet"),
    ):
        with pytest.raises(DataError, match="does not exist") as caught:
            action()
        assert not isinstance(caught.value, StorageError)
        assert uri in str(caught.value)
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(DataError, match="holds no objects"):
        storage.download_dir(f"s3://{bucket}/recipes", tmp_path / "recipes")
    with pytest.raises(DataError, match="bucket 'no-such-bucket-flam' does not exist"):
        storage.write_bytes("s3://no-such-bucket-flam/x", b"x")
    assert not storage.exists("s3://no-such-bucket-flam")
    with pytest.raises(DataError, match="does not exist"):
        storage.upload_file(tmp_path / "nothing-here", f"s3://{bucket}/x")
    with pytest.raises(DataError, match="does not exist"):
        storage.read_bytes(tmp_path / "nothing-here")
    assert list(tmp_path.iterdir()) == []


def test_broken_download_leaves_no_partial_file(bucket, proxy, tmp_path):
    payload = os.urandom(6 * MiB)
    storage.write_bytes(f"s3://{bucket}/big.bin", payload)
    storage.write_bytes(f"s3://{bucket}/dir/a.bin", payload[:1000])
    storage.write_bytes(f"s3://{bucket}/dir/sub/b-broken.bin", payload[: 2 * MiB])
    client = storage.s3_client(endpoint_url=proxy.url)
    parts = storage.transfer_config(multipart_threshold=5 * MiB)
    target = tmp_path / "big.bin"
    target.write_bytes(b"previous version")
    folder = tmp_path / "dir"
    folder.mkdir()
    (folder / "old.bin").write_bytes(b"previous folder")

    proxy.truncate_objects = "big.bin"
    with pytest.raises(StorageError, match="kept breaking off"):
        storage.download_file(f"s3://{bucket}/big.bin", target, client=client, transfer=parts)
    with pytest.raises(StorageError, match="kept breaking off"):
        storage.download_file(f"s3://{bucket}/big.bin", tmp_path / "new.bin", client=client)
    proxy.truncate_objects = "b-broken"
    with pytest.raises(StorageError, match="kept breaking off"):
        storage.download_dir(f"s3://{bucket}/dir", folder, client=client)
    gets = [r for r in proxy.requests if r.method == "GET"]
    outcomes = {(r.path.split("?")[0].rsplit("/", 1)[-1], r.outcome) for r in gets}
    assert {("big.bin", "truncated"), ("b-broken.bin", "truncated"), ("a.bin", "forwarded")} <= outcomes
    assert target.read_bytes() == b"previous version"
    assert tree(folder) == {"old.bin": b"previous folder"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin", "dir"]

    proxy.truncate_objects = False
    storage.download_file(f"s3://{bucket}/big.bin", target, client=client, transfer=parts)
    assert target.read_bytes() == payload


# --- DVC and MLflow with S3 stores ------------------------------------------------------------------------


def _tool_env(home: Path, *, endpoint: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    if not endpoint:
        env.pop("AWS_ENDPOINT_URL", None)
    home.mkdir(parents=True, exist_ok=True)
    env.update(
        PATH=f"{BIN}:/usr/bin:/bin",
        HOME=str(home),
        CI="1",
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(home / "dvc-site"),
        GIT_AUTHOR_NAME="flam tests",
        GIT_AUTHOR_EMAIL="tests@flam.invalid",
        GIT_COMMITTER_NAME="flam tests",
        GIT_COMMITTER_EMAIL="tests@flam.invalid",
    )
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.slow
def test_dvc_push_then_pull_into_a_clean_clone_gives_identical_recipes(s3_endpoint, bucket, tmp_path):  # noqa: F811
    import pandas as pd

    dvc = str(BIN / "dvc")
    # No AWS_ENDPOINT_URL here: DVC must take the endpoint from the remote's `endpointurl`.
    env = _tool_env(tmp_path / "home", endpoint=False)
    origin = tmp_path / "origin"
    origin.mkdir()
    _run(["git", "init", "-q"], origin, env)
    _run([dvc, "init", "-q"], origin, env)
    recipes = origin / "recipes.parquet"
    frame = pd.DataFrame({"clip": [f"mix-{i:04d}" for i in range(50)], "snr_db": [i / 7 for i in range(50)]})
    frame.to_parquet(recipes, engine="pyarrow", index=False)
    _run([dvc, "add", "recipes.parquet"], origin, env)
    _run([dvc, "remote", "add", "-d", "store", f"s3://{bucket}/dvc"], origin, env)
    _run([dvc, "remote", "modify", "--local", "store", "endpointurl", s3_endpoint], origin, env)
    _run(["git", "add", "-A"], origin, env)
    _run(["git", "commit", "-q", "-m", "recipes"], origin, env)
    _run([dvc, "push"], origin, env)
    pushed = storage.list_uris(f"s3://{bucket}/dvc/")
    assert len(pushed) == 1
    assert pushed[0].startswith(f"s3://{bucket}/dvc/files/md5/")

    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(origin), str(clone)], tmp_path, env)
    assert not (clone / "recipes.parquet").exists()
    assert "endpointurl" not in (clone / ".dvc" / "config").read_text()
    _run([dvc, "remote", "modify", "--local", "store", "endpointurl", s3_endpoint], clone, env)
    _run([dvc, "pull"], clone, env)
    pulled = (clone / "recipes.parquet").read_bytes()
    assert sha256(pulled) == sha256(recipes.read_bytes())
    pd.testing.assert_frame_equal(pd.read_parquet(clone / "recipes.parquet"), frame)


def _wait_for_health(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    parts = url.removeprefix("http://").split(":")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        conn = http.client.HTTPConnection(parts[0], int(parts[1]), timeout=2)
        try:
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.5)
    pytest.fail(f"mlflow server did not answer /health within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_mlflow_run_artifacts_are_stored_in_s3(s3_endpoint, bucket, tmp_path, monkeypatch):  # noqa: F811
    port = free_port()
    server = f"http://{HOST}:{port}"
    env = {
        **os.environ,
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }
    command = [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
        "--artifacts-destination",
        f"s3://{bucket}/mlartifacts",
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log = tmp_path / "mlflow-server.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_for_health(server, proc, log, timeout=300)

        import mlflow

        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        artifact = tmp_path / "head.pt"
        artifact.write_bytes(os.urandom(50_000))
        mlflow.set_tracking_uri(server)
        try:
            experiment = mlflow.create_experiment(f"storage-{uuid.uuid4().hex[:8]}")
            with mlflow.start_run(experiment_id=experiment) as run:
                mlflow.log_param("encoder", "yamnet")
                mlflow.log_artifact(str(artifact), artifact_path="model")
            artifact_uri = mlflow.get_run(run.info.run_id).info.artifact_uri
        finally:
            mlflow.set_tracking_uri(None)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    assert artifact_uri.startswith("mlflow-artifacts:/"), artifact_uri
    relative = artifact_uri.removeprefix("mlflow-artifacts:").lstrip("/")
    uri = f"s3://{bucket}/mlartifacts/{relative}/model/head.pt"
    assert storage.exists(uri), storage.list_uris(f"s3://{bucket}/mlartifacts/")
    downloaded = tmp_path / "downloaded.pt"
    storage.download_file(uri, downloaded)
    assert sha256(downloaded.read_bytes()) == sha256(artifact.read_bytes())
