"""Detection over many files in one run: the model loaded once, decoding in worker processes.

    inputs (files, folders, globs, a list file) -> audio files, in order, without duplicates
    -> worker processes decode each file to mono float32 at the model rate, a few files ahead
    -> the main process embeds and scores them (`FlamDetector.detect`) one after the other
    -> `<out>/detections.jsonl` (one line per file), `<out>/segments.tsv` (DCASE format),
       `<out>/failed.jsonl` (files that could not be decoded), optional `<out>/plots/*.png`

Inputs may be S3 objects and prefixes (``s3://bucket/key``, ``s3://bucket/prefix/``): a prefix
gives its audio objects as a folder does, and each object is downloaded into a temporary folder
when the run reaches it and deleted once detected (`storage.Staging`). Records, the TSV and
`failed.jsonl` name it by its URI.

A run is resumable: files already in `detections.jsonl` (by absolute path or URI) are skipped, new
ones are appended line by line as they are detected, so a crash loses at most the line being
written (dropped on the next run). Files that fail are not recorded as done: the next run
retries them. `segments.tsv` is regenerated whole from `detections.jsonl` at the end of a run.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
import os
import posixpath
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flam_core import storage
from flam_core.errors import AudioError, DataError, SilentAudioError
from flam_core.storage import ObjectInfo
from flam_core.utils import AUDIO_EXTENSIONS, atomic_write_text, scan_audio_files

DETECTIONS = "detections.jsonl"
SEGMENTS = "segments.tsv"
FAILED = "failed.jsonl"
PLOTS = "plots"
TSV_COLUMNS = ("filename", "onset", "offset", "event_label", "score")
IN_FLIGHT_PER_WORKER = 2  # decoded files waiting per worker: enough to hide decoding, bounded memory
# Longer files are streamed from their path in the scoring process, not decoded whole by a worker:
# 10 min at 16 kHz are 38 MB of float32, and a few of them wait per worker.
STREAM_LONGER_THAN_S = 600.0


# --- inputs ---------------------------------------------------------------------------------------
AudioItem = Path | ObjectInfo  # a local file, or an S3 object downloaded when its turn comes


def collect_audio_files(
    inputs: Sequence[str | Path], skip: Path | None = None, extensions: Sequence[str] | None = None
) -> list[AudioItem]:
    """Files, folders (searched recursively for audio files), glob patterns, S3 objects and S3
    prefixes -> absolute files and `ObjectInfo`s.

    A file or S3 object is taken whatever its extension; a folder or an S3 prefix gives the audio
    files under it (the extensions `flam index` scans), except those under `skip` (the output
    folder). Order: inputs in turn, each folder sorted; a file reached twice appears once. Raises
    `DataError` for an input that does not exist, a pattern that matches nothing, or a name holding
    a tab or newline (it could not be written to the TSV); `storage.StorageError` when S3 cannot be
    listed. S3 URIs are taken literally, not as glob patterns.
    """
    suffixes = tuple(extensions or AUDIO_EXTENSIONS)
    expanded: list[Path | list[ObjectInfo]] = []
    for item in inputs:  # every input is checked before any folder is scanned
        text = str(item)
        if storage.is_s3(text):
            expanded.append(storage.input_objects(text, suffixes))
        elif Path(text).exists():
            expanded.append(Path(text))
        elif glob.has_magic(text):
            matches = sorted(glob.glob(text, recursive=True))  # noqa: PTH207 - absolute patterns too
            if not matches:
                raise DataError(f"{text}: the pattern matches no file")
            expanded.extend(Path(m) for m in matches)
        else:
            raise DataError(f"no such file or folder: {text}")
    seen: dict[str, AudioItem] = {}
    for entry in expanded:
        if isinstance(entry, list):
            for obj in entry:
                seen.setdefault(obj.uri, obj)
        elif not entry.is_dir():
            seen.setdefault(str(entry.resolve()), entry.resolve())
        else:
            for _, found, _, _ in scan_audio_files(entry, suffixes, skip.resolve() if skip else None):
                seen.setdefault(str(found.resolve()), found.resolve())
    bad = [name for name in seen if any(c in name for c in "\t\r\n")]
    if bad:
        raise DataError(
            f"{bad[0]!r}: file names with a tab or newline cannot be written to the TSV; rename it"
        )
    return list(seen.values())


def item_name(item: AudioItem | str) -> str:
    """How records name an input: a local file by its absolute path, an S3 object by its URI."""
    if isinstance(item, ObjectInfo):
        return item.uri
    text = str(item)
    return text if storage.is_s3(text) else str(Path(text).resolve())


def read_list_file(path: Path) -> list[str]:
    """The paths of a list file, one per line (blank lines ignored; relative to the working folder)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the list of files ({exc})") from exc
    return [line.strip() for line in text.splitlines() if line.strip()]


def common_folder(files: Iterable[Path | str]) -> Path | str | None:
    """The deepest folder holding every file, or None when only the file-system root does.

    For S3 URIs, the deepest prefix (``s3://bucket/a/b``) holding every object, None when they lie
    in different buckets or some files are local.
    """
    names = [str(f) for f in files]
    if not names:
        return None
    remote = [storage.is_s3(n) for n in names]
    if any(remote):
        if not all(remote):
            return None
        common = posixpath.commonpath([posixpath.dirname(n.removeprefix(storage.S3_SCHEME)) for n in names])
        return storage.S3_SCHEME + common if common else None
    parents = [str(Path(n).absolute().parent) for n in names]
    common = Path(os.path.commonpath(parents))
    return None if common == Path(common.anchor) else common


def relative_name(file: Path | str, root: Path | str | None) -> str:
    """`file` relative to `root` (POSIX separators), or its absolute path (or URI) without a root."""
    text = str(file)
    if storage.is_s3(text):
        return text.removeprefix(f"{root}/") if isinstance(root, str) else text
    path = Path(text).absolute()
    return path.relative_to(root).as_posix() if isinstance(root, Path) else path.as_posix()


# --- decoding -------------------------------------------------------------------------------------
def decode_file(path: str, sample_rate: int) -> np.ndarray | AudioError | None:
    """Mono float32 samples `[n]` of `path` at `sample_rate`, or the `AudioError` saying why not.

    The error is returned, not raised, so that a worker process hands it back with the file's
    place in the order kept. Digital silence is an error (`SilentAudioError`), as in `detect`.
    None for a file whose header says it lasts over `STREAM_LONGER_THAN_S`: it is not decoded
    whole here but streamed by `detect` from its path (memory stays bounded by the block size).
    """
    import soundfile as sf

    from flam_core.audio.io import read_audio
    from flam_core.detection import check_not_silent

    try:
        info = sf.info(path)
        if info.samplerate > 0 and info.frames / info.samplerate > STREAM_LONGER_THAN_S:
            return None
    except (sf.SoundFileError, RuntimeError, OSError, ValueError):
        pass  # read_audio says what is wrong with it
    try:
        samples, _ = read_audio(path, sample_rate, mono=True)
    except AudioError as exc:
        return exc
    try:
        check_not_silent(path, float(np.abs(samples).max(initial=0.0)))
    except SilentAudioError as exc:
        return exc
    return samples


def _init_worker() -> None:
    """One thread per decoding worker: the cores are for the model in the main process."""
    import torch

    torch.set_num_threads(1)


def decoded_files(
    paths: Iterable[str | Path], sample_rate: int, workers: int = 1
) -> Iterator[tuple[Path, np.ndarray | AudioError | None]]:
    """(path, samples, error or None) of each file, in order (`decode_file`); `workers` processes
    decode ahead.

    At most `IN_FLIGHT_PER_WORKER * workers` files are decoded and not yet consumed at any
    time, so memory holds a few files whatever the number of paths. `workers=0` decodes in
    this process, one file when it is asked for. Workers are spawned (not forked): a fork of a
    process whose torch thread pools have run can hang.
    """
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        raise DataError(f"workers must be 0 or a positive integer, got {workers!r}")
    paths = iter(Path(p) for p in paths)
    if workers == 0:
        for path in paths:
            yield path, decode_file(str(path), sample_rate)
        return
    import multiprocessing

    pending: deque[tuple[Path, Future[np.ndarray | AudioError | None]]] = deque()
    executor = ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker
    )
    try:

        def submit() -> None:
            for path in paths:
                pending.append((path, executor.submit(decode_file, str(path), sample_rate)))
                return

        for _ in range(IN_FLIGHT_PER_WORKER * workers):
            submit()
        while pending:
            path, future = pending.popleft()
            result = future.result()
            submit()  # the next file starts decoding while this one is scored
            yield path, result
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def detect_many(
    detector: Any,
    paths: Iterable[str | Path],
    prompts: list[str],
    threshold: float | None = None,
    workers: int = 1,
) -> Iterator[tuple[Path, Any]]:
    """(path, `Detection` or `AudioError`) of each file in order, with one loaded detector.

    The same detections as `detector.detect(path, prompts, threshold=threshold)` file by file:
    decoding (worker processes, see `decoded_files`) overlaps embedding and scoring (here).
    A file that cannot be decoded, or is digital silence, yields its `AudioError` and the run
    goes on; bad prompts raise `DataError` before any file is decoded.
    """
    prompts = list(prompts)
    detector.prompt_embeddings(prompts)
    for path, decoded in decoded_files(paths, detector.sample_rate, workers):
        if isinstance(decoded, AudioError):
            yield path, decoded
        elif decoded is None:  # a long file: streamed block by block from its path
            try:
                yield path, detector.detect(path, prompts, threshold=threshold)
            except AudioError as exc:
                yield path, exc
        else:
            yield (
                path,
                detector.detect(decoded, prompts, sample_rate=detector.sample_rate, threshold=threshold),
            )


# --- the output folder ----------------------------------------------------------------------------
def read_detections(out_dir: Path) -> list[dict[str, Any]]:
    """The records of `out_dir/detections.jsonl` (none when it is missing).

    A last line cut short (a run killed while writing it) is dropped and the file rewritten
    without it; any other line that is not a JSON object with a "file" raises `DataError`.
    """
    path = Path(out_dir) / DETECTIONS
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    records, broken_tail = [], False
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("file"), str):
                raise ValueError("not an object with a file")
        except ValueError as exc:
            if all(not rest.strip() for rest in lines[number:]):
                broken_tail = True  # the line a killed run was writing
                break
            raise DataError(
                f"{path}:{number} is not a detection record ({exc}); remove the line or use another --out"
            ) from None
        records.append(record)
    if broken_tail or (text and not text.endswith("\n")):  # appending must start a new line
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return records


def segments_tsv(records: Sequence[dict[str, Any]]) -> str:
    """DCASE-format TSV text (`TSV_COLUMNS`) of detection records, one row per segment.

    Filenames are relative to the folder common to all files (absolute without one), as
    `flam evaluate --tsv --audio-dir <that folder>` reads them. A file without segments gets one
    row with empty onset, offset, label and score, so that every detected file is listed;
    segments that round to zero length (the last frame cut by the end of the file) are left out.
    """
    root = common_folder(r["file"] for r in records)
    text = io.StringIO()
    # no quoting, as `read_sed_tsv` reads it: a quote in a prompt is text, a tab cannot be written
    writer = csv.writer(text, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_NONE, quotechar=None)
    writer.writerow(TSV_COLUMNS)
    for record in sorted(records, key=lambda r: relative_name(r["file"], root)):
        name = relative_name(record["file"], root)
        segments = [s for s in record.get("segments", []) if s["offset"] > s["onset"]]
        if not segments:
            writer.writerow([name, "", "", "", ""])
        writer.writerows(
            [name, f"{seg['onset']:.3f}", f"{seg['offset']:.3f}", seg["prompt"], f"{seg['score']:.4f}"]
            for seg in segments
        )
    return text.getvalue()


@dataclass
class BatchSummary:
    """What a run did: counts, the audio it detected and where the outputs are."""

    out_dir: Path
    done: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (name, error)
    audio_s: float = 0.0
    seconds: float = 0.0

    def line(self) -> str:
        rate = f", {self.done / self.seconds:.2f} files/s" if self.seconds > 0 and self.done else ""
        return (
            f"{self.done} done, {self.skipped} skipped (already done), {len(self.failed)} failed; "
            f"{self.audio_s / 3600:.3f} h of audio in {self.seconds:.1f} s{rate}; "
            f"{self.out_dir / DETECTIONS}, {self.out_dir / SEGMENTS}"
        )


def _check_same_run(
    records: Sequence[dict[str, Any]], model: str, prompts: list[str], threshold: Any
) -> None:
    """Resuming mixes two runs' lines in one file: only when they are comparable."""
    for record in records[:1]:
        theirs = (record.get("model"), record.get("prompts"), record.get("threshold"))
        if theirs != (model, prompts, threshold):
            raise DataError(
                f"the output folder holds detections of model {theirs[0]!r}, prompts {theirs[1]!r}, "
                f"threshold {theirs[2]!r}, not {model!r}, {prompts!r}, {threshold!r}: "
                "use another --out, or the same model, prompts and threshold to resume"
            )


def _plot_name(name: str, root: Path | str | None) -> str:
    """A file's plot path below `plots/`: relative to the common folder, else its whole name (an
    S3 URI without its scheme, an absolute path without its leading slash), never outside."""
    return relative_name(name, root).removeprefix(storage.S3_SCHEME).lstrip("/")


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def scoring_threads(workers: int) -> int:
    """Threads for the model while `workers` processes decode: the cores they leave, at least one."""
    return max(1, available_cores() - workers)


@contextlib.contextmanager
def _restore_threads(threads: int) -> Iterator[None]:
    import torch

    try:
        yield
    finally:
        torch.set_num_threads(threads)


def detect_to_folder(
    detector: Any,
    files: Sequence[AudioItem | str],
    prompts: list[str],
    out_dir: Path,
    threshold: float | None = None,
    workers: int = 1,
    plots: bool = False,
    on_failure: Callable[[str, str], None] | None = None,
    progress: bool = True,
) -> BatchSummary:
    """Detect `prompts` in `files` into `out_dir` (see the module doc); resumes a previous run.

    `files` are local paths and S3 objects (`collect_audio_files`). `on_failure(name, message)`
    is called for each file that cannot be decoded, as it happens. The progress bar (stderr,
    only when interactive) shows files/s and audio-hours/s.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from flam_core.utils import interactive

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Records are keyed by absolute path or URI.
    items = [f if isinstance(f, ObjectInfo) else Path(f).resolve() for f in files]
    names = [item_name(f) for f in items]
    started = time.perf_counter()
    records = read_detections(out_dir)
    _check_same_run(records, detector.source, list(prompts), threshold)
    done = {r["file"] for r in records}
    todo = [(item, name) for item, name in zip(items, names, strict=True) if name not in done]
    summary = BatchSummary(out_dir, skipped=len(items) - len(todo))
    root = common_folder(names)
    bar = None
    if progress and interactive():
        bar = Progress(
            TextColumn("detecting"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[files_s]:.2f} files/s, {task.fields[hours_s]:.4f} audio-h/s"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        )
    remote = any(isinstance(item, ObjectInfo) for item, _ in todo)
    in_flight: deque[tuple[str, bool]] = deque()  # (name, downloaded) of each file handed on, in order

    def local_files(staging: storage.Staging | None) -> Iterator[Path]:
        """The files of `todo` as local paths, S3 objects downloaded as the decoders ask for them."""
        pending = (item for item, _ in todo)
        fetched = staging.fetch_all(pending) if staging is not None else ((f, f) for f in pending)
        for item, path in fetched:
            in_flight.append((item_name(item), isinstance(item, ObjectInfo)))
            yield path

    import torch

    threads = torch.get_num_threads()
    # The decoding workers have cores of their own: threads of the model that outnumber the
    # free cores wait on each other at every operation (several times slower, not faster).
    torch.set_num_threads(scoring_threads(workers))
    with (
        _restore_threads(threads),
        storage.Staging() if remote else contextlib.nullcontext() as staging,
        (out_dir / FAILED).open("w", encoding="utf-8") as failed_log,
        (out_dir / DETECTIONS).open("a", encoding="utf-8") as log,
        bar if bar is not None else contextlib.nullcontext(),
    ):
        task = bar.add_task("detecting", total=len(todo), files_s=0.0, hours_s=0.0) if bar else None
        for path, result in detect_many(detector, local_files(staging), prompts, threshold, workers):
            name, downloaded = in_flight.popleft()
            if downloaded:
                staging.release(path)
            if isinstance(result, AudioError):
                # A downloaded file's error names its temporary copy: name the object instead.
                message = str(result).replace(str(path), name) if downloaded else str(result)
                summary.failed.append((name, message))
                failed_log.write(json.dumps({"file": name, "error": message}) + "\n")
                failed_log.flush()
                if on_failure is not None:
                    on_failure(name, message)
            else:
                record = {"file": name, "threshold": threshold, **result.to_json()}
                log.write(json.dumps(record) + "\n")
                log.flush()  # a line is either whole on disk or the one a crash cut short
                records.append(record)
                summary.done += 1
                summary.audio_s += result.duration_s
                if plots:
                    from flam_core.detection import plot_detection

                    plot_detection(result, out_dir / PLOTS / (_plot_name(name, root) + ".png"))
            if bar is None or task is None:
                continue
            elapsed = max(time.perf_counter() - started, 1e-9)
            bar.update(
                task, advance=1, files_s=summary.done / elapsed, hours_s=summary.audio_s / 3600 / elapsed
            )
    if records:
        atomic_write_text(out_dir / SEGMENTS, segments_tsv(records))
    summary.seconds = time.perf_counter() - started
    return summary
