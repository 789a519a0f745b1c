"""A user's own labelled recordings: a folder of audio files and a CSV describing them.

The CSV has a header with `filename` and `label` columns and an optional `caption` column
(the ESC-50 / FSD50K style); several rows may name the same file with different captions.
Paths in `filename` are relative to the folder.

The folder may be an S3 prefix and the CSV an S3 object (``dir: s3://bucket/esc50/audio``,
``csv: s3://bucket/esc50/labels.csv``). The files the CSV names are then downloaded into
``<cache>/s3`` (`Params.cache_path`), where they stay, keyed by URI and ETag (`storage.Staging`):
a rebuild downloads only the objects that changed. Clips get the ids they would get from a local
copy of the folder of the same name.
"""

from __future__ import annotations

import io
import posixpath
from pathlib import Path, PurePosixPath

import pandas as pd

from flam_core.config import UserFolder
from flam_core.data.catalog.base import RawClip
from flam_core.errors import ConfigError, DataError


def folder_clips(
    spec: UserFolder, base_dir: Path | None = None, cache_dir: Path | None = None
) -> list[RawClip]:
    """One clip per distinct file in the CSV. Raises `DataError` naming a bad CSV or file.

    Local paths are relative to `base_dir`; S3 objects are downloaded into `cache_dir / "s3"`.
    """
    from flam_core import storage  # boto3 only for the folders that need it

    remote = storage.is_s3(spec.dir)
    csv_path = _located(spec.csv, base_dir)
    if remote:
        if cache_dir is None:
            raise ConfigError(f"user folder {spec.dir}: a folder on S3 needs a cache folder to download into")
        objects = {_relative(o.uri, spec.dir): o for o in storage.list_objects(spec.dir)}
        if not objects:
            raise DataError(f"user folder not found: {spec.dir} holds no objects")
        bucket, key = storage.parse_uri(spec.dir)
        folder_name = PurePosixPath(key.rstrip("/")).name or bucket
        where: str | Path = spec.dir
    else:
        folder = where = Path(_located(spec.dir, base_dir))
        if not folder.is_dir():
            raise DataError(f"user folder not found: {folder}")
        folder_name = folder.name
    table = _read_csv(csv_path)
    missing = {"filename", "label"} - set(table.columns)
    if missing:
        raise DataError(f"{csv_path}: missing column(s) {sorted(missing)}; need filename,label[,caption]")
    empty = table.index[table["label"].str.strip() == ""].tolist()
    if empty:
        raise DataError(f"{csv_path}: empty label on data row(s) {[i + 1 for i in empty]}")
    package = f"user:{folder_name}"
    found: list[tuple[str, storage.ObjectInfo | Path, str, tuple[str, ...]]] = []
    for filename, rows in table.groupby("filename", sort=True):
        if remote:
            item: storage.ObjectInfo | Path | None = objects.get(posixpath.normpath(filename))
        else:
            item = folder / filename
            item = item if item.is_file() else None
        if item is None:
            raise DataError(f"{csv_path}: file {filename!r} is not in {where}")
        labels = sorted(set(rows["label"].str.strip()))
        if len(labels) != 1:
            raise DataError(f"{csv_path}: file {filename!r} has several labels {labels}")
        captions = tuple(c for c in rows.get("caption", pd.Series(dtype=str)).str.strip() if c)
        found.append((str(filename), item, labels[0].lower(), captions))
    if remote:  # every name checked before anything is downloaded
        with storage.Staging(Path(cache_dir) / "s3") as staging:
            local = dict(staging.fetch_all(item for _, item, _, _ in found))
    return [
        RawClip(
            source_package=package,
            origin=filename,
            label=label,
            kind=spec.kind,
            licence=spec.licence,
            path=local[item] if remote else item,
            captions=captions,
        )
        for filename, item, label, captions in found
    ]


def _located(path: str, base_dir: Path | None) -> str | Path:
    """An S3 URI as it is; a local path relative to `base_dir`."""
    from flam_core import storage

    if storage.is_s3(path):
        return path
    return Path(path) if base_dir is None else base_dir / path


def _relative(uri: str, prefix: str) -> str:
    return uri.removeprefix(prefix.rstrip("/") + "/")


def _read_csv(path: str | Path) -> pd.DataFrame:
    from flam_core import storage

    try:
        source = io.BytesIO(storage.read_bytes(path)) if storage.is_s3(path) else path
        return pd.read_csv(source, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read CSV ({exc})") from exc
