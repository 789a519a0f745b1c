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

Audio inputs on S3 (`flam detect`, `flam index`, user folders of `flam sources build`): `input_objects`
and `list_objects` list what a URI names as a local path names files (an object, or the audio objects
under a prefix), with the size, modification time and ETag of each; `Staging` makes them local files
for the command that reads them, downloaded as the command reaches them.

boto3, botocore and s3transfer (about 0.2 s to import) are imported by the functions that talk to
S3, so the local half of this module (`is_s3`, `parse_uri`, `ObjectInfo`) costs a command
without S3 inputs nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import tempfile
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from flam_core.errors import ConfigError, DataError
from flam_core.utils import AUDIO_EXTENSIONS, atomic_dir, atomic_path

if TYPE_CHECKING:
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import ClientError

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
    import boto3
    from botocore.config import Config

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
    from boto3.s3.transfer import TransferConfig

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


def _transfer_manager(client: S3Client, transfer: TransferConfig | None) -> Any:
    """boto3's transfer manager (many uploads or downloads in parallel threads)."""
    from boto3.s3.transfer import create_transfer_manager

    return create_transfer_manager(client, _transfer(transfer))


# --- errors -----------------------------------------------------------------------------------------


def _client_error(exc: BaseException) -> ClientError | None:
    from botocore.exceptions import ClientError

    seen = exc
    while seen is not None:
        if isinstance(seen, ClientError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


@contextlib.contextmanager
def _s3_errors(uri: str, action: str) -> Iterator[None]:
    """Turn botocore / boto3 failures into `DataError` (missing) or `StorageError` (anything else)."""
    from boto3.exceptions import RetriesExceededError, S3TransferFailedError, S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError
    from s3transfer.exceptions import RetriesExceededError as TransferRetriesExceededError

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
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError

    error = _client_error(exc)
    if error is None:
        text = f"cannot {action} {uri}: {type(exc).__name__}: {exc}"
        if isinstance(exc, NoCredentialsError):
            text += "; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
        elif isinstance(exc, EndpointConnectionError):
            text += "; check the endpoint (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL) and the network"
        return StorageError(text)
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
    with atomic_path(path) as tmp, _s3_errors(uri, "download"):
        _client(client).download_file(bucket, key, str(tmp), Config=_transfer(transfer))
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
    with _transfer_manager(client, transfer) as manager:
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
    with atomic_dir(directory) as staging, _transfer_manager(client, transfer) as manager:
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
        with atomic_path(_local(uri)) as tmp:
            tmp.write_bytes(data)
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
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)


# --- inputs: S3 objects read as local files -----------------------------------------------------------

DEFAULT_AHEAD = 4
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_NAME_BYTES = 200  # a key segment may be longer than a file name may (255 bytes on most systems)


@dataclass(frozen=True)
class ObjectInfo:
    """One S3 object as listed: its URI, size in bytes, last modification (ns since the epoch), ETag.

    Size and modification time play the part of a local file's ``stat`` (`flam index` compares them
    to find changed files); the ETag names the version that a local copy holds.
    """

    uri: str
    size: int
    mtime_ns: int
    etag: str

    @property
    def name(self) -> str:
        """The key's last segment: the object's file name."""
        return PurePosixPath(parse_uri(self.uri)[1]).name


def _info(bucket: str, key: str, size: Any, modified: datetime, etag: str) -> ObjectInfo:
    mtime_ns = (modified - _EPOCH) // timedelta(microseconds=1) * 1000  # exact, no float rounding
    return ObjectInfo(f"{S3_SCHEME}{bucket}/{key}", int(size), mtime_ns, etag.strip('"'))


def object_info(uri: str, *, client: S3Client | None = None) -> ObjectInfo:
    """Size, modification time and ETag of one object; `DataError` naming `uri` when it is missing."""
    bucket, key = _object(uri)
    with _s3_errors(uri, "read"):
        head = _client(client).head_object(Bucket=bucket, Key=key)
    return _info(bucket, key, head["ContentLength"], head["LastModified"], head["ETag"])


def list_objects(
    uri_prefix: str, extensions: Sequence[str] | None = None, *, client: S3Client | None = None
) -> list[ObjectInfo]:
    """The objects under a prefix, by key; with `extensions`, only those whose name ends in one (any case).

    The prefix matches whole path segments (``s3://b/audio`` lists ``audio/...``, not ``audio2/...``),
    as a folder holds what is below it; folder markers (keys ending in ``/``) are left out. With the
    extensions of `utils.scan_audio_files`, a prefix gives the files a local folder would.
    """
    bucket, key = parse_uri(uri_prefix)
    suffixes = {"." + e.lower().lstrip(".") for e in extensions or ()}
    found = []
    with _s3_errors(uri_prefix, "list"):
        paginator = _client(client).get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=_prefix_key(key)):
            for item in page.get("Contents", ()):
                name = item["Key"]
                if name.endswith("/") or (suffixes and PurePosixPath(name).suffix.lower() not in suffixes):
                    continue
                found.append(_info(bucket, name, item["Size"], item["LastModified"], item["ETag"]))
    return sorted(found, key=lambda o: o.uri)


def input_objects(
    uri: str, extensions: Sequence[str] = AUDIO_EXTENSIONS, *, client: S3Client | None = None
) -> list[ObjectInfo]:
    """What an input URI names, read as a local path is: an object, or the audio objects of a prefix.

    An object is taken whatever its name, as a file named on the command line is; a URI that names
    no object (``s3://b/recordings/``, or ``s3://b/recordings`` without such an object) is a prefix,
    and its objects with one of `extensions` are taken, as a folder is scanned. Raises `DataError`
    naming `uri` when it names neither, `StorageError` when S3 cannot be asked.
    """
    key = parse_uri(uri)[1]
    if key and not key.endswith("/"):
        try:
            return [object_info(uri, client=client)]
        except StorageError:
            raise
        except DataError:
            pass  # no such object: a prefix, perhaps
    found = list_objects(uri, extensions, client=client)
    if not found:
        what = "no audio object" if not key or key.endswith("/") else "no such object, nor any audio object"
        raise DataError(f"{uri}: {what} ({', '.join(extensions)}) under it")
    return found


class Staging:
    """S3 objects as local files for the commands that read audio from S3.

    `fetch` downloads one object, `fetch_all` many in order, with `ahead` downloads running in
    threads ahead of the consumer so that transfers overlap the model's work. Downloads stream to a
    temporary sibling file (boto3's transfer manager, multipart above the threshold) that is renamed
    into place when complete: memory holds a chunk per transfer, never a file, and no half-written
    file is ever visible under its name. Each object lands in ``<folder>/<hash of URI and ETag>/``
    under its own file name, so a decoder sees the real suffix and messages the real name.

    Two ways of keeping them:

    - ``Staging()``, for `flam detect` and `flam index`: a temporary folder (under ``$TMPDIR``),
      removed with everything in it when the ``with`` block ends, however it ends; `release` deletes
      a file as soon as the command is done with it, so the local disk holds the files in flight,
      not the prefix. Nothing is kept between runs because these commands record what they have done
      (``detections.jsonl``; the index's size and modification time of each file) and a second run
      skips those objects before downloading anything: a cache would only spare the download of
      files that failed, at the price of a local copy of the bucket.
    - ``Staging(folder)``, for `flam sources build` with a user folder on S3: a cache that stays.
      The library is rebuilt from every file of its user folders whenever its parameters change,
      so a version already in the cache (same URI and ETag, same size) is not downloaded again,
      and a changed object (new ETag) is, as the Debian packages it reads are cached.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        ahead: int = DEFAULT_AHEAD,
        client: S3Client | None = None,
        transfer: TransferConfig | None = None,
    ) -> None:
        if isinstance(ahead, bool) or not isinstance(ahead, int) or ahead < 1:
            raise ConfigError(f"ahead must be a positive number of downloads, got {ahead!r}")
        self._cache = _local(directory) if directory is not None else None
        self._folder: Path | None = None
        self._pool: ThreadPoolExecutor | None = None
        self.ahead = ahead
        self._client = client
        # `ahead` transfers at once, each in parts above the threshold: together within the
        # client's connection pool (2 * DEFAULT_MAX_CONCURRENCY).
        self._transfer = transfer or transfer_config(max_concurrency=max(1, DEFAULT_MAX_CONCURRENCY // ahead))

    def __enter__(self) -> Staging:
        if self._cache is None:
            self._folder = Path(tempfile.mkdtemp(prefix="flam-s3-"))
        else:
            self._cache.mkdir(parents=True, exist_ok=True)
            self._folder = self._cache
        return self

    def __exit__(self, *exc: object) -> None:
        # Downloads still running (a consumer that stopped early) finish or are cancelled first,
        # so that none writes into the folder after it is gone.
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._cache is None and self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
        self._folder = None

    @property
    def folder(self) -> Path:
        """Where the local copies are (only inside the ``with`` block)."""
        if self._folder is None:
            raise RuntimeError("Staging is used outside its `with` block")
        return self._folder

    def local_path(self, obj: ObjectInfo) -> Path:
        """Where `obj` is (or will be) stored: named by its URI and ETag, ending in its file name."""
        digest = hashlib.sha256(f"{obj.uri}\0{obj.etag}".encode()).hexdigest()[:24]
        name = obj.name
        if len(name.encode()) > _MAX_NAME_BYTES or name in ("", ".", ".."):
            name = "object" + PurePosixPath(name).suffix[:16]
        return self.folder / digest / name

    def fetch(self, obj: ObjectInfo) -> Path:
        """The local file of `obj`, downloaded unless this version is already there."""
        path = self.local_path(obj)
        if not (path.is_file() and path.stat().st_size == obj.size):
            download_file(obj.uri, path, client=self._client, transfer=self._transfer)
        return path

    def fetch_all(self, items: Iterable[ObjectInfo | Path]) -> Iterator[tuple[ObjectInfo | Path, Path]]:
        """(item, local file) of each item in order; local paths pass through as they are.

        Items are read from `items` only as downloads start, `ahead` at most before the consumer,
        so a generator of items is consumed lazily. A failed download raises (`DataError` or
        `StorageError` naming the URI) when the consumer reaches its item.
        """
        source = iter(items)
        pending: deque[tuple[ObjectInfo | Path, Future[Path] | None]] = deque()
        if self._folder is None:
            raise RuntimeError("Staging is used outside its `with` block")
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.ahead, thread_name_prefix="flam-s3")
        pool = self._pool

        def submit() -> None:
            for item in source:
                future = pool.submit(self.fetch, item) if isinstance(item, ObjectInfo) else None
                pending.append((item, future))
                if future is not None:
                    return

        try:
            for _ in range(self.ahead):
                submit()
            while pending:
                item, future = pending.popleft()
                path = future.result() if future is not None else Path(item)  # type: ignore[arg-type]
                submit()
                yield item, path
        finally:
            for _, future in pending:
                if future is not None:
                    future.cancel()

    def release(self, path: str | os.PathLike[str]) -> None:
        """Done with a file `fetch` made: a temporary staging deletes it, a cache keeps it."""
        path = Path(path)
        if self._cache is None and self._folder is not None and path.parent.parent == self._folder:
            shutil.rmtree(path.parent, ignore_errors=True)
