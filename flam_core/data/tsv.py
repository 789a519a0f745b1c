"""Strong-label SED datasets in the DCASE / DESED / URBAN-SED TSV format.

A TSV has the header `filename  onset  offset  event_label` (tab separated, other columns are
ignored) and one row per event; a row with empty onset, offset and label lists a file that has
no event. `read_sed_tsv` turns it into the ground-truth mapping the SED metrics take
(filename -> [(onset s, offset s, label)]), rejecting malformed rows with the file and line;
`write_sed_tsv` writes the same mapping back; `SedDataset` pairs the TSV with a folder of audio.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import soundfile as sf

from flam_core.data.events import Event
from flam_core.errors import AudioError, DataError
from flam_core.utils import atomic_path

COLUMNS = ("filename", "onset", "offset", "event_label")


def _parse_time(value: str, what: str, where: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise DataError(f"{where}: {what} {value!r} is not a number") from None
    if not math.isfinite(seconds):
        raise DataError(f"{where}: {what} {value!r} is not a finite number")
    if seconds < 0:
        raise DataError(f"{where}: {what} {seconds:g} s is negative")
    return seconds


def read_sed_tsv(path: str | os.PathLike) -> dict[str, list[Event]]:
    """Ground truth from a DCASE-format TSV: filename -> events sorted by onset (possibly none)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"SED annotation file not found: {path}")
    truth: dict[str, list[Event]] = {}
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: the file is empty; expected the header {'/'.join(COLUMNS)}")
        header = [name.strip() for name in header]
        missing = [name for name in COLUMNS if name not in header]
        if missing:
            raise DataError(f"{path}: header lacks column(s) {missing} (found {header})")
        index = [header.index(name) for name in COLUMNS]
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DataError(f"{where}: {len(row)} field(s) but the header has {len(header)}")
            filename, onset, offset, label = (row[i].strip() for i in index)
            if not filename:
                raise DataError(f"{where}: empty filename")
            events = truth.setdefault(filename, [])
            if not (onset or offset or label):
                continue
            if not (onset and offset and label):
                raise DataError(f"{where}: onset, offset and event_label must all be set or all be empty")
            start = _parse_time(onset, "onset", where)
            end = _parse_time(offset, "offset", where)
            if start > end:
                raise DataError(f"{where}: onset {start:g} s is after offset {end:g} s")
            if start == end:
                raise DataError(f"{where}: zero-length event at {start:g} s")
            events.append(Event(start, end, label))
    if not truth:
        raise DataError(f"{path}: no rows below the header")
    for events in truth.values():
        events.sort()
    return truth


def write_sed_tsv(path: str | os.PathLike, ground_truth: Mapping[str, Sequence[Event]]) -> Path:
    """Write ground truth as a DCASE-format TSV, atomically (temp file, then rename)."""
    path = Path(path)
    if not ground_truth:
        raise DataError("no files to write: the ground truth is empty")
    rows: list[tuple[str, str, str, str]] = []
    for filename in sorted(ground_truth):
        if not isinstance(filename, str) or not filename or any(c in filename for c in "\t\r\n"):
            raise DataError(f"filename {filename!r} is empty or holds a tab/newline")
        events = sorted(ground_truth[filename])
        if not events:
            rows.append((filename, "", "", ""))
        for event in events:
            if len(event) != 3:
                raise DataError(f"{filename}: event {event!r} is not (onset, offset, label)")
            onset, offset, label = float(event[0]), float(event[1]), event[2]
            if not (math.isfinite(onset) and math.isfinite(offset)) or onset < 0 or onset >= offset:
                raise DataError(f"{filename}: event {event!r} needs finite times with 0 <= onset < offset")
            if not isinstance(label, str) or not label or any(c in label for c in "\t\r\n"):
                raise DataError(f"{filename}: event label {label!r} is empty or holds a tab/newline")
            rows.append((filename, repr(onset), repr(offset), label))
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_NONE)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    return path


class SedDataset:
    """A folder of audio files annotated by a DCASE-format TSV.

    `files` maps each annotated filename to its audio path, `ground_truth` holds its events,
    `durations` its length in seconds (from the file header), `vocabulary` the sorted labels.
    """

    def __init__(self, audio_dir: str | os.PathLike, tsv_path: str | os.PathLike) -> None:
        self.audio_dir = Path(audio_dir)
        self.tsv_path = Path(tsv_path)
        if not self.audio_dir.is_dir():
            raise DataError(f"audio folder not found: {self.audio_dir}")
        self.ground_truth = read_sed_tsv(self.tsv_path)
        self.files = {name: self.audio_dir / name for name in sorted(self.ground_truth)}
        missing = [name for name, file in self.files.items() if not file.is_file()]
        if missing:
            shown = ", ".join(missing[:10]) + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else "")
            raise DataError(
                f"{len(missing)} of {len(self.files)} file(s) listed in {self.tsv_path} are missing from "
                f"{self.audio_dir}: {shown}"
            )
        self.durations = {name: _duration(file) for name, file in self.files.items()}
        self.vocabulary = sorted({label for events in self.ground_truth.values() for _, _, label in events})

    @property
    def audio_ids(self) -> list[str]:
        return list(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return f"SedDataset({self.audio_dir}, {len(self)} files, {len(self.vocabulary)} labels)"


def _duration(path: Path) -> float:
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError) as err:
        raise AudioError(f"cannot read audio header of {path}: {err}") from err
    if info.frames <= 0 or info.samplerate <= 0:
        raise AudioError(f"{path} holds no audio samples")
    return info.frames / info.samplerate
