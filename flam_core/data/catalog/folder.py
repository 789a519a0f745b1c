"""A user's own labelled recordings: a folder of audio files and a CSV describing them.

The CSV has a header with `filename` and `label` columns and an optional `caption` column
(the ESC-50 / FSD50K style); several rows may name the same file with different captions.
Paths in `filename` are relative to the folder.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from flam_core.config import UserFolder
from flam_core.data.catalog.base import RawClip
from flam_core.errors import DataError


def folder_clips(spec: UserFolder, base_dir: Path | None = None) -> list[RawClip]:
    """One clip per distinct file in the CSV. Raises `DataError` naming a bad CSV or file."""
    folder = Path(spec.dir) if base_dir is None else base_dir / spec.dir
    csv_path = Path(spec.csv) if base_dir is None else base_dir / spec.csv
    if not folder.is_dir():
        raise DataError(f"user folder not found: {folder}")
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{csv_path}: cannot read CSV ({exc})") from exc
    missing = {"filename", "label"} - set(table.columns)
    if missing:
        raise DataError(f"{csv_path}: missing column(s) {sorted(missing)}; need filename,label[,caption]")
    empty = table.index[table["label"].str.strip() == ""].tolist()
    if empty:
        raise DataError(f"{csv_path}: empty label on data row(s) {[i + 1 for i in empty]}")
    package = f"user:{folder.name}"
    clips = []
    for filename, rows in table.groupby("filename", sort=True):
        path = folder / filename
        if not path.is_file():
            raise DataError(f"{csv_path}: file {filename!r} is not in {folder}")
        labels = sorted(set(rows["label"].str.strip()))
        if len(labels) != 1:
            raise DataError(f"{csv_path}: file {filename!r} has several labels {labels}")
        captions = tuple(c for c in rows.get("caption", pd.Series(dtype=str)).str.strip() if c)
        clips.append(
            RawClip(
                source_package=package,
                origin=str(filename),
                label=labels[0].lower(),
                kind=spec.kind,
                licence=spec.licence,
                path=path,
                captions=captions,
            )
        )
    return clips
