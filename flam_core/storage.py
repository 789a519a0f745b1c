"""One API for local paths and ``s3://bucket/key`` URIs: sources, recipes, shards and models.

Every function takes either a local path or an S3 URI where it makes sense (`read_bytes`, `write_bytes`,
`exists`, `list_uris`, `copy`); the transfer helpers (`upload_*`, `download_*`) move data between the two.

Where the S3 client connects, in order: the `endpoint_url` argument of `s3_client`, then the environment
variable ``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL``, else AWS itself. Credentials follow boto3's
standard chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``,
``~/.aws``, instance roles); the region is ``AWS_REGION``, else ``AWS_DEFAULT_REGION``. A custom endpoint
(MinIO, moto, Ceph) is addressed path-style.

Transient failures (throttling such as ``SlowDown``, HTTP 500/502/503/504, dropped connections) are
retried by botocore's ``standard`` retry mode with exponential backoff and jitter: `retries` extra
attempts per request, ``DEFAULT_RETRIES`` unless ``AWS_MAX_ATTEMPTS`` (total attempts) says otherwise.
Downloads also retry a body that breaks off mid-stream. Failures that remain are raised as project errors:
a missing object or bucket as `DataError` naming the URI, anything else as `StorageError`.

Local writes are atomic: a download goes to a temporary sibling that is renamed into place at the end,
so readers never see a half-written file or folder.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
from boto3.exceptions import RetriesExceededError, S3TransferFailedError, S3UploadFailedError
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from s3transfer.exceptions import RetriesExceededError as TransferRetriesExceededError

from flam_core.errors import ConfigError, DataError
from flam_core.utils import atomic_dir

S3Client = Any  # botocore builds the client class at run time

MiB = 1 << 20
S3_SCHEME = "s3://"
DEFAULT_RETRIES = 4
DEFAULT_MULTIPART_THRESHOLD = 64 * MiB
DEFAULT_MAX_CONCURRENCY = 8

_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_OTHER_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchBucket"})
_CLIENT_ENV = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_MAX_ATTEMPTS",
)
_clients: dict[tuple[str | None, ...], S3Client] = {}
_clients_lock = threading.Lock()


class StorageError(DataError):
    """An S3 request failed for good: service error, retries used up, network or credentials."""


# --- URIs -------------------------------------------------------------------------------------------


def is_s3(uri: str | os.PathLike[str]) -> bool:
    """Whether `uri` names an S3 object or prefix (``s3://...``) rather than a local path."""
    return isinstance(uri, str) and uri.startswith(S3_SCHEME)


def parse_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into ``(bucket, key)``; the key is empty for ``s3://bucket``."""
    if not isinstance(uri, str) or not uri.startswith(S3_SCHEME):
        raise ConfigError(f"{uri!r} is not an S3 URI: expected s3://bucket/key")
    bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
    if not _BUCKET_NAME.fullmatch(bucket) or ".." in bucket:
        raise ConfigError(
            f"{uri!r} has an invalid bucket name {bucket!r}: expected 3-63 lowercase letters, digits, "
            "dots or hyphens, starting and ending with a letter or digit"
        )
    if key.startswith("/"):
        raise ConfigError(f"{uri!r} has an empty path segment after the bucket: write s3://{bucket}/key")
    return bucket, key


def _object(uri: str) -> tuple[str, str]:
    bucket, key = parse_uri(uri)
    if not key or key.endswith("/"):
        raise ConfigError(f"{uri!r} names a bucket or prefix, not an object: expected s3://bucket/key")
    return bucket, key


def _local(path: str | os.PathLike[str]) -> Path:
    text = os.fspath(path)
    if is_s3(text):
        raise ConfigError(f"{text!r}: expected a local path here, not an S3 URI")
    if _OTHER_SCHEME.match(text):
        raise ConfigError(f"{text!r}: only local paths and s3:// URIs are supported")
    return Path(text)


def _prefix_key(key: str) -> str:
    """A key prefix that matches whole path segments: ``a/b`` lists ``a/b/...`` but not ``a/bc``."""
    return f"{key.rstrip('/')}/" if key else ""


# --- client and transfer settings ------------------------------------------------------------------


def endpoint_url_from_env() -> str | None:
    """The S3 endpoint the environment names (``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL``)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def retries_from_env() -> int:
    """Retries per request: ``AWS_MAX_ATTEMPTS - 1`` when set (it counts the first attempt too)."""
    raw = os.environ.get("AWS_MAX_ATTEMPTS")
    if not raw:
        return DEFAULT_RETRIES
    try:
        attempts = int(raw)
    except ValueError:
        attempts = 0
    if attempts < 1:
        raise ConfigError(f"AWS_MAX_ATTEMPTS={raw!r} must be a whole number >= 1 (total attempts)")
    return attempts - 1


def s3_client(
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    retries: int | None = None,
    addressing_style: str | None = None,
    connect_timeout: float = 10.0,
    read_timeout: float = 60.0,
    max_pool_connections: int = 2 * DEFAULT_MAX_CONCURRENCY,
) -> S3Client:
    """A boto3 S3 client from the standard AWS environment, with explicit retry settings.

    `retries` is the number of extra attempts per request after a transient failure (0 disables
    retrying); botocore's ``standard`` mode backs off exponentially with jitter between attempts.
    """
    endpoint = endpoint_url or endpoint_url_from_env()
    retries = retries_from_env() if retries is None else retries
    if retries < 0:
        raise ConfigError(f"retries must be >= 0, got {retries}")
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
    style = addressing_style or ("path" if endpoint else "auto")
    config = Config(
        region_name=region,
        retries={"max_attempts": retries, "mode": "standard"},
        s3={"addressing_style": style},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_pool_connections=max_pool_connections,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


def transfer_config(
    *,
    multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
    multipart_chunksize: int | None = None,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
) -> TransferConfig:
    """Transfer settings: objects of `multipart_threshold` bytes or more move in parts.

    Parts are `multipart_chunksize` bytes (default: the threshold); S3 requires at least 5 MiB per part
    except the last, and boto3 raises smaller sizes to that minimum.
    """
    chunksize = multipart_chunksize or multipart_threshold
    if multipart_threshold <= 0 or chunksize <= 0 or max_concurrency <= 0:
        raise ConfigError("multipart_threshold, multipart_chunksize and max_concurrency must be positive")
    return TransferConfig(
        multipart_threshold=multipart_threshold,
        multipart_chunksize=chunksize,
        max_concurrency=max_concurrency,
        preferred_transfer_client="classic",
    )


def _client(client: S3Client | None) -> S3Client:
    if client is not None:
        return client
    key = tuple(os.environ.get(name) for name in _CLIENT_ENV)
    with _clients_lock:
        if key not in _clients:
            _clients.clear()
            _clients[key] = s3_client()
        return _clients[key]


def _transfer(transfer: TransferConfig | None) -> TransferConfig:
    return transfer if transfer is not None else transfer_config()


# --- errors -----------------------------------------------------------------------------------------


def _client_error(exc: BaseException) -> ClientError | None:
    seen = exc
    while seen is not None:
        if isinstance(seen, ClientError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


@contextlib.contextmanager
def _s3_errors(uri: str, action: str) -> Iterator[None]:
    """Turn botocore / boto3 failures into `DataError` (missing) or `StorageError` (anything else)."""
    try:
        yield
    except (ClientError, BotoCoreError, S3UploadFailedError, S3TransferFailedError) as exc:
        raise _translate(exc, uri, action) from exc
    except (RetriesExceededError, TransferRetriesExceededError) as exc:
        cause = exc.last_exception
        raise StorageError(
            f"cannot {action} {uri}: the transfer kept breaking off and was abandoned after its retries "
            f"({type(cause).__name__}: {cause})"
        ) from exc


def _translate(exc: BaseException, uri: str, action: str) -> DataError:
    error = _client_error(exc)
    if error is None:
        return StorageError(f"cannot {action} {uri}: {type(exc).__name__}: {exc}")
    info = error.response.get("Error", {})
    meta = error.response.get("ResponseMetadata", {})
    code = str(info.get("Code", "unknown"))
    status = meta.get("HTTPStatusCode")
    if code in _MISSING_CODES or status == 404:
        if code == "NoSuchBucket":
            name = info.get("BucketName") or parse_uri(uri)[0]
            return DataError(f"cannot {action} {uri}: bucket {name!r} does not exist")
        return DataError(f"{uri} does not exist")
    attempts = int(meta.get("RetryAttempts", 0)) + 1
    message = str(info.get("Message") or "").rstrip(".")
    text = f"cannot {action} {uri}: {code} (HTTP {status}) after {attempts} attempt(s)"
    if message:
        text += f": {message}"
    if status in (401, 403):
        text += "; check the AWS credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE) and the bucket policy"
    elif status is not None and (status >= 500 or status == 429):
        text += "; transient errors are retried, raise the retry count (AWS_MAX_ATTEMPTS) if this recurs"
    return StorageError(text)


def _missing_local(path: Path) -> DataError:
    return DataError(f"{path} does not exist")


# --- transfers ----------------------------------------------------------------------------------------


def upload_file(
    path: str | os.PathLike[str],
    uri: str,
    *,
    client: S3Client | None = None,
    transfer: TransferConfig | None = None,
) -> str:
    """Upload one local file to ``s3://bucket/key`` (multipart above the threshold); returns `uri`."""
    path = _local(path)
    bucket, key = _object(uri)
    if not path.is_file():
        raise _missing_local(path)
    with _s3_errors(uri, "upload to"):
        _client(client).upload_file(str(path), bucket, key, Config=_transfer(transfer))
    return uri


def download_file(
    uri: str,
    path: str | os.PathLike[str],
    *,
    client: S3Client | None = None,
    transfer: TransferConfig | None = None,
) -> Path:
    """Download one object to `path`, atomically: on any error `path` is left as it was."""
    bucket, key = _object(uri)
    path = _local(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        with _s3_errors(uri, "download"):
            _client(client).download_file(bucket, key, tmp, Config=_transfer(transfer))
        Path(tmp).chmod(0o644)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def upload_dir(
    directory: str | os.PathLike[str],
    uri_prefix: str,
    *,
    client: S3Client | None = None,
    transfer: TransferConfig | None = None,
) -> list[str]:
    """Upload every file under `directory` to ``uri_prefix/<relative path>``; returns the URIs, sorted.

    Objects already under the prefix that the folder does not hold are left alone.
    """
    directory = _local(directory)
    bucket, key = parse_uri(uri_prefix)
    if not directory.is_dir():
        raise DataError(f"{directory} is not a directory")
    base = _prefix_key(key)
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    client = _client(client)
    jobs: list[tuple[str, Any]] = []
    with create_transfer_manager(client, _transfer(transfer)) as manager:
        for file in files:
            target = base + file.relative_to(directory).as_posix()
            jobs.append((f"{S3_SCHEME}{bucket}/{target}", manager.upload(str(file), bucket, target)))
        for uri, future in jobs:
            with _s3_errors(uri, "upload to"):
                future.result()
    return [uri for uri, _ in jobs]


def download_dir(
    uri_prefix: str,
    directory: str | os.PathLike[str],
    *,
    client: S3Client | None = None,
    transfer: TransferConfig | None = None,
) -> list[Path]:
    """Download every object under `uri_prefix` into `directory`, replacing it atomically.

    Files land in a temporary sibling folder that is renamed to `directory` only once all of them
    arrived; on error `directory` is left as it was. Returns the local files, sorted.
    """
    bucket, key = parse_uri(uri_prefix)
    directory = _local(directory)
    base = _prefix_key(key)
    client = _client(client)
    keys = [k for k in _list_keys(client, bucket, base, uri_prefix) if not k.endswith("/")]
    if not keys:
        raise DataError(f"{uri_prefix} holds no objects")
    relative = []
    for name in keys:
        rel = Path(name[len(base) :])
        if rel.is_absolute() or ".." in rel.parts:
            raise DataError(f"{S3_SCHEME}{bucket}/{name}: key escapes the target folder")
        relative.append(rel)
    with atomic_dir(directory) as staging, create_transfer_manager(client, _transfer(transfer)) as manager:
        jobs = []
        for name, rel in zip(keys, relative, strict=True):
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            jobs.append((f"{S3_SCHEME}{bucket}/{name}", manager.download(bucket, name, str(staging / rel))))
        for uri, future in jobs:
            with _s3_errors(uri, "download"):
                future.result()
    return sorted(directory / rel for rel in relative)


# --- objects and paths alike --------------------------------------------------------------------------


def exists(uri: str | os.PathLike[str], *, client: S3Client | None = None) -> bool:
    """Whether the object (or local path) exists; ``s3://bucket`` asks whether the bucket exists."""
    if not is_s3(uri):
        return _local(uri).exists()
    bucket, key = parse_uri(uri)
    try:
        with _s3_errors(uri, "check"):
            if key:
                _client(client).head_object(Bucket=bucket, Key=key)
            else:
                _client(client).head_bucket(Bucket=bucket)
    except StorageError:
        raise
    except DataError:
        return False
    return True


def _list_keys(client: S3Client, bucket: str, prefix: str, uri: str) -> list[str]:
    keys: list[str] = []
    with _s3_errors(uri, "list"):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(item["Key"] for item in page.get("Contents", ()))
    return keys


def list_uris(prefix: str | os.PathLike[str], *, client: S3Client | None = None) -> list[str]:
    """Every object whose URI starts with `prefix`, sorted.

    For S3 the prefix is a plain string prefix (``s3://b/shards/train-`` lists the train shards); a local
    folder lists all files below it, and any other local path lists the files starting with it.
    """
    if is_s3(prefix):
        bucket, key = parse_uri(prefix)
        return [f"{S3_SCHEME}{bucket}/{k}" for k in _list_keys(_client(client), bucket, key, prefix)]
    path = _local(prefix)
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*") if p.is_file())
    parent = path.parent
    if not parent.is_dir():
        return []
    text = str(path)
    return sorted(str(p) for p in parent.rglob("*") if p.is_file() and str(p).startswith(text))


def read_bytes(
    uri: str | os.PathLike[str],
    *,
    client: S3Client | None = None,
    transfer: TransferConfig | None = None,
) -> bytes:
    """The whole content of an object or local file."""
    if not is_s3(uri):
        path = _local(uri)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise _missing_local(path) from None
    bucket, key = _object(uri)
    buffer = io.BytesIO()
    with _s3_errors(uri, "read"):
        _client(client).download_fileobj(bucket, key, buffer, Config=_transfer(transfer))
    return buffer.getvalue()


def write_bytes(
    uri: str | os.PathLike[str],
    data: bytes,
    *,
    client: S3Client | None = None,
    transfer: TransferConfig | None = None,
) -> None:
    """Write `data` to an object (multipart above the threshold) or, atomically, to a local file."""
    if not is_s3(uri):
        path = _local(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            Path(tmp).chmod(0o644)
            Path(tmp).replace(path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return
    bucket, key = _object(uri)
    with _s3_errors(uri, "write"):
        _client(client).upload_fileobj(io.BytesIO(data), bucket, key, Config=_transfer(transfer))


def copy(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    client: S3Client | None = None,
    transfer: TransferConfig | None = None,
) -> None:
    """Copy one file or object; each side may be a local path or an S3 URI. Local targets are atomic."""
    if is_s3(src) and is_s3(dst):
        src_bucket, src_key = _object(src)
        dst_bucket, dst_key = _object(dst)
        source = {"Bucket": src_bucket, "Key": src_key}
        with _s3_errors(src, f"copy to {dst} from"):
            _client(client).copy(source, dst_bucket, dst_key, Config=_transfer(transfer))
    elif is_s3(dst):
        upload_file(src, dst, client=client, transfer=transfer)
    elif is_s3(src):
        download_file(src, dst, client=client, transfer=transfer)
    else:
        source, target = _local(src), _local(dst)
        if not source.is_file():
            raise _missing_local(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        os.close(fd)
        try:
            shutil.copyfile(source, tmp)
            Path(tmp).chmod(0o644)
            Path(tmp).replace(target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
