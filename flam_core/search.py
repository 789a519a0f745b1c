"""Audio content search: a frame-embedding index over a corpus of recordings, queried by text.

`build_index(audio_dir, index_dir, detector)` embeds every audio file once with
`FlamDetector.embed` and stores the frame embeddings; `search(SearchIndex.open(index_dir),
detector, "dog barking")` returns the best-matching segments of the corpus, ranked by the same
frame scores that `flam detect` computes.

An index folder holds

    index.json                  format version, the model reference, the chunks, the current files
                                table and the product quantizer (when there is one)
    files-<generation>.parquet  one row per indexed file version: path (relative to the audio
                                folder; the object's s3:// URI for an S3 prefix), size, mtime_ns,
                                duration_s, n_frames, first_row (global), chunk, deleted
    chunks/chunk-<n>.npy        float16 `[rows, D]` unit-norm frame embeddings, memory-mapped
    chunks/chunk-<n>.codes.npy  uint8 `[rows, ceil(D / 4)]` product-quantizer codes of the same rows
    pq-centroids.npy            float32 `[ceil(D / 2), 16, 2]` the product quantizer's codebook (an
                                odd D is coded with one zero dimension appended)

Indexing is incremental and append-only: each run (every `batch_files` files) writes new chunk
files and a new files table, and never rewrites a chunk. A file whose size or mtime changed gets
its old rows marked deleted and is embedded again; a file gone from the folder is marked deleted.
The audio folder may be an S3 prefix (``s3://bucket/recordings/``): its objects' sizes and
modification times come from the listing, so only new or changed objects are downloaded (into a
temporary folder, each deleted once embedded: `storage.Staging`), and the index names them by URI,
the name that reaches them from anywhere.
Every commit writes the files table under a new name and then `index.json` through an atomic
rename, so a reader (or a crash) sees either the previous state or the new one.

Search. For one query the frame score is a monotone function of the cosine between the frame and
text embeddings (`alpha > 0`), so the best frames by inner product are the best frames by score.
Small indexes (fewer than `PQ_MIN_ROWS` live frames) are scanned exactly in float32. Larger ones
are scanned with faiss' 4-bit product-quantizer fast scan (`IndexPQFastScan`, one 4-bit code per
pair of dimensions: 128 bytes per 512-d frame, 259 per 1033-d fused frame, held in memory); its
`rerank` best candidates are re-scored exactly from the float16 embeddings. At one million frames
on the reference machine (2 cores) an exact float32 scan takes ~200 ms per query, the fast scan
plus re-ranking ~22 ms with recall@10 = 1.0 against exact search, even on random unit vectors,
the hardest case for quantization (BENCHMARKS.md, `bench/bench_search.py`).

Segments: a segment's best frame is active (its median-filtered score passes the threshold), so
only candidates active in their own neighbourhood start a file visit, in order of score. Around a
file's active candidates the exact scores of a window of frames are computed (grown until no
active frame touches a window edge), median-filtered and thresholded exactly as `flam detect`
does, and segments are ranked by their highest frame score. When no segment passes the threshold,
the best frames are returned as one-frame segments, so a query always answers.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import heapq
import importlib
import json
import math
import re
import shutil
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from flam_core.errors import AudioError, ConfigError, DataError
from flam_core.utils import AUDIO_EXTENSIONS, atomic_path, atomic_write_text, interactive, scan_audio_files

if TYPE_CHECKING:
    from flam_core.storage import ObjectInfo

FORMAT = "flam-search-index"
FORMAT_VERSION = 1
PQ_MIN_ROWS = 65_536  # from this many live frames on, searches scan PQ codes instead of float32
PQ_TRAIN_ROWS = 65_536  # frames sampled to train the product quantizer
PQ_BITS = 4
RERANK = 2000  # candidates of the PQ scan re-scored exactly
CHUNK_MAX_ROWS = 262_144  # a chunk is written after this many frames even before batch_files files
REGION_FRAMES = 128  # half-width of the window of exact scores around a hit, grown as needed
WHOLE_FILE_FRAMES = 2048  # files up to this long (640 s at 312.5 ms) are scored whole, in one call
ACTIVITY_BLOCK = 256  # candidates whose median-filtered activity is checked at once
# The names index.json may give for its files, each a plain file name in the index folder (or in
# chunks/): what the writer produces, and nothing that could point elsewhere.
FILES_TABLE_NAME = re.compile(r"files-[0-9]{6,}\.parquet")
CHUNK_NAME = re.compile(r"chunk-[0-9]{6,}")
CENTROIDS_NAME = "pq-centroids.npy"
FILE_COLUMNS = {
    "path": "string",
    "size": "int64",
    "mtime_ns": "int64",
    "duration_s": "float64",
    "n_frames": "int64",
    "first_row": "int64",
    "chunk": "string",
    "deleted": "bool",
}


# --- model reference ------------------------------------------------------------------------------
def model_reference(detector: Any) -> dict[str, Any]:
    """What an index records about the model that embedded it.

    `fingerprint` hashes the weights that make frame embeddings (audio encoder and FLAM head), so
    the same model is recognised under another source (a folder or its MLflow URI), and a moved
    MLflow alias is not.
    """
    digest = hashlib.sha256()
    for part in (detector.model.audio_encoder, detector.model.head):
        for name, tensor in sorted(part.state_dict().items()):
            array = tensor.detach().cpu().contiguous().numpy()
            digest.update(f"{name}:{array.dtype}:{array.shape}".encode())
            digest.update(array.tobytes())
    return {
        "source": str(detector.source),
        "fingerprint": digest.hexdigest(),
        "embed_dim": int(detector.model.vector_dim),
        "frame_hop_s": float(detector.frame_hop_s),
        "sample_rate": int(detector.sample_rate),
    }


def _check_model(index_dir: Path, stored: dict[str, Any], model: dict[str, Any]) -> None:
    problems = []
    if int(stored["embed_dim"]) != int(model["embed_dim"]):
        problems.append(f"embedding size {stored['embed_dim']} vs {model['embed_dim']}")
    if not math.isclose(float(stored["frame_hop_s"]), float(model["frame_hop_s"]), rel_tol=1e-9):
        problems.append(f"frame hop {stored['frame_hop_s']} s vs {model['frame_hop_s']} s")
    if stored["fingerprint"] != model["fingerprint"]:
        problems.append(f"weights {stored['fingerprint'][:12]} vs {model['fingerprint'][:12]}")
    if problems:
        raise ConfigError(
            f"{index_dir} was built with model {stored['source']!r}, which differs from {model['source']!r} "
            f"({'; '.join(problems)}): frame embeddings of two models cannot be mixed. Use the index's "
            "model, or build a new index in another folder"
        )


# --- small helpers --------------------------------------------------------------------------------
def _faiss() -> Any:
    import faiss

    return faiss


@contextlib.contextmanager
def _faiss_threads(n: int) -> Iterator[Any]:
    """faiss with `n` OpenMP threads: one thread avoids OpenMP spinning against torch's threads."""
    faiss = _faiss()
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield faiss
    finally:
        faiss.omp_set_num_threads(before)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        np.save(handle, array)


def _to_float32(array: np.ndarray) -> np.ndarray:
    """float16 rows -> float32 (torch converts with F16C, several times faster than numpy)."""
    return torch.from_numpy(np.ascontiguousarray(array)).float().numpy()


def _pq_dim(dim: int) -> int:
    """The product quantizer codes pairs of dimensions: an odd-sized embedding (FLAM's 512 with the
    classifier's 521 logits, `flam_core.model.fusion`) gets one zero dimension appended, which
    changes no inner product and halves its codes against one 4-bit code per dimension."""
    return dim + dim % 2


def _pq_padded(vectors: np.ndarray, pq_dim: int) -> np.ndarray:
    """float32 `[N, D]` (or `[D]`) rows, zero-padded to the quantizer's `pq_dim`, contiguous."""
    vectors = np.asarray(vectors, dtype=np.float32)
    pad = pq_dim - vectors.shape[-1]
    if pad:
        vectors = np.concatenate([vectors, np.zeros((*vectors.shape[:-1], pad), np.float32)], axis=-1)
    return np.ascontiguousarray(vectors)


def _pq_from_centroids(faiss: Any, centroids: np.ndarray, bits: int) -> Any:
    """An `IndexPQ` with the stored codebook `[M, 2**bits, dsub]` (its dimension is M * dsub)."""
    m, _, dsub = centroids.shape
    index = faiss.IndexPQ(m * dsub, m, bits, faiss.METRIC_INNER_PRODUCT)
    faiss.copy_array_to_vector(centroids.astype(np.float32).ravel(), index.pq.centroids)
    index.is_trained = True
    return index


@contextlib.contextmanager
def _locked(index_dir: Path) -> Iterator[None]:
    """Hold the index folder's write lock; a folder created here and never committed is removed."""
    created = not index_dir.exists()
    index_dir.mkdir(parents=True, exist_ok=True)
    try:
        with (index_dir / ".lock").open("w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"{index_dir} is being indexed by another process") from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        if created and not (index_dir / "index.json").exists():
            shutil.rmtree(index_dir, ignore_errors=True)


def _read_meta(index_dir: Path) -> dict[str, Any] | None:
    path = index_dir / "index.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path} is not a FLAM search index")
    if meta.get("version") != FORMAT_VERSION:
        raise DataError(
            f"{path} has index format version {meta.get('version')}, this version of flam reads "
            f"{FORMAT_VERSION}: build the index again"
        )
    _check_names(path, meta)
    return meta


def _check_names(path: Path, meta: dict[str, Any]) -> None:
    """The file names in index.json are the writer's own: a reader joins them to the index folder
    and a commit deletes the old files table, so a name that could lead out of it is refused."""

    def check(what: str, name: Any, valid: bool) -> None:
        if not valid:
            raise DataError(
                f"{path}: {what} {name!r} is not a file name this index writes; the index is damaged or "
                "not flam's: build it again"
            )

    table = meta.get("files_table")
    check("files_table", table, isinstance(table, str) and _matches(FILES_TABLE_NAME, table))
    chunks = meta.get("chunks")
    check("chunks", chunks, isinstance(chunks, list) and all(isinstance(c, dict) for c in chunks))
    for chunk in chunks:
        name = chunk.get("name")
        check("chunk name", name, isinstance(name, str) and _matches(CHUNK_NAME, name))
    if meta.get("pq") is not None:
        centroids = meta["pq"].get("centroids") if isinstance(meta["pq"], dict) else None
        check("pq centroids", centroids, centroids == CENTROIDS_NAME)


def _matches(pattern: re.Pattern[str], name: str) -> bool:
    return pattern.fullmatch(name) is not None


def _read_files(index_dir: Path, meta: dict[str, Any]) -> pd.DataFrame:
    path = index_dir / meta["files_table"]
    if not path.is_file():
        raise DataError(f"{index_dir}: the files table {meta['files_table']} named in index.json is missing")
    files = pd.read_parquet(path)
    missing = sorted(set(FILE_COLUMNS) - set(files.columns))
    if missing:
        raise DataError(f"{path} lacks column(s) {missing}")
    return files[list(FILE_COLUMNS)].astype(FILE_COLUMNS).reset_index(drop=True)


def _empty_files() -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in FILE_COLUMNS.items()})


# --- writing --------------------------------------------------------------------------------------
@dataclass
class _Pending:
    path: str
    size: int
    mtime_ns: int
    duration_s: float
    embeddings: np.ndarray  # [T, D] float16


class _IndexWriter:
    """Appends chunks to an index folder (created on the first commit) and commits after each."""

    def __init__(self, index_dir: Path, model: dict[str, Any], pq_min_rows: int = PQ_MIN_ROWS) -> None:
        self.dir = Path(index_dir)
        self.pq_min_rows = pq_min_rows
        meta = _read_meta(self.dir)
        if meta is None:
            if self.dir.exists() and any(
                p.name != "chunks" and not p.name.startswith(".") for p in self.dir.iterdir()
            ):
                raise ConfigError(f"{self.dir} exists and is not a search index: choose an empty folder")
            meta = {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "model": model,
                "audio_dir": None,
                "rows": 0,
                "next_chunk": 0,
                "generation": 0,
                "chunks": [],
                "files_table": None,
                "pq": None,
            }
            self.files = _empty_files()
        else:
            _check_model(self.dir, meta["model"], model)
            self.files = _read_files(self.dir, meta)
        self.meta = meta
        self.dim = int(meta["model"]["embed_dim"])
        self.chunks_written: list[str] = []
        self._pq: Any = None

    # -- state ----------------------------------------------------------------------------------
    def live(self) -> pd.DataFrame:
        return self.files[~self.files["deleted"]]

    def mark_deleted(self, paths: Iterable[str]) -> None:
        paths = set(paths)
        if paths:
            self.files.loc[self.files["path"].isin(paths) & ~self.files["deleted"], "deleted"] = True

    # -- chunks ---------------------------------------------------------------------------------
    def add_chunk(self, pending: Sequence[_Pending]) -> None:
        if not pending:
            return
        emb = np.concatenate([p.embeddings for p in pending]).astype(np.float16, copy=False)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise DataError(f"frame embeddings must be [T, {self.dim}], got {emb.shape}")
        name = f"chunk-{self.meta['next_chunk']:06d}"
        folder = self.dir / "chunks"
        folder.mkdir(parents=True, exist_ok=True)
        _save_npy(folder / f"{name}.npy", emb)
        has_codes = False
        if self.meta["pq"] is not None:
            _save_npy(folder / f"{name}.codes.npy", self._encode(emb))
            has_codes = True
        first = int(self.meta["rows"])
        starts = first + np.concatenate([[0], np.cumsum([len(p.embeddings) for p in pending])[:-1]])
        rows = pd.DataFrame(
            {
                "path": [p.path for p in pending],
                "size": [p.size for p in pending],
                "mtime_ns": [p.mtime_ns for p in pending],
                "duration_s": [p.duration_s for p in pending],
                "n_frames": [len(p.embeddings) for p in pending],
                "first_row": starts.astype(np.int64),
                "chunk": name,
                "deleted": False,
            }
        ).astype(FILE_COLUMNS)
        self.mark_deleted(rows["path"])  # an earlier version of a re-embedded file
        self.files = pd.concat([self.files, rows], ignore_index=True) if len(self.files) else rows
        self.meta["chunks"].append({"name": name, "first_row": first, "rows": len(emb), "codes": has_codes})
        self.meta["rows"] = first + len(emb)
        self.meta["next_chunk"] += 1
        self.chunks_written.append(name)
        self.commit()

    def chunk_array(self, chunk: dict[str, Any]) -> np.ndarray:
        return np.load(self.dir / "chunks" / f"{chunk['name']}.npy", mmap_mode="r")

    # -- product quantizer ----------------------------------------------------------------------
    def _quantizer(self) -> Any:
        if self._pq is None:
            info = self.meta["pq"]
            self._pq = _pq_from_centroids(_faiss(), np.load(self.dir / info["centroids"]), int(info["bits"]))
        return self._pq

    def _encode(self, emb: np.ndarray, batch: int = 65_536) -> np.ndarray:
        index = self._quantizer()
        with _faiss_threads(1):
            parts = [
                index.pq.compute_codes(_pq_padded(emb[i : i + batch], index.d))
                for i in range(0, len(emb), batch)
            ]
        return np.concatenate(parts) if parts else np.zeros((0, index.pq.code_size), np.uint8)

    def _train_pq(self) -> None:
        live = self.live()
        sample_size = min(PQ_TRAIN_ROWS, int(live["n_frames"].sum()))
        rows = np.concatenate(
            [np.arange(f, f + n) for f, n in zip(live["first_row"], live["n_frames"], strict=True)]
        )
        rows = np.sort(np.random.default_rng(0).choice(rows, sample_size, replace=False))
        sample = np.empty((sample_size, self.dim), np.float32)
        starts = np.array([c["first_row"] for c in self.meta["chunks"]], dtype=np.int64)
        which = np.searchsorted(starts, rows, side="right") - 1
        for c in np.unique(which):
            chunk = self.meta["chunks"][c]
            mine = which == c
            sample[mine] = self.chunk_array(chunk)[rows[mine] - chunk["first_row"]]
        pq_dim = _pq_dim(self.dim)
        m = pq_dim // 2
        with _faiss_threads(1) as faiss:
            index = faiss.IndexPQ(pq_dim, m, PQ_BITS, faiss.METRIC_INNER_PRODUCT)
            index.train(_pq_padded(sample, pq_dim))
        centroids = faiss.vector_to_array(index.pq.centroids).reshape(m, 2**PQ_BITS, pq_dim // m)
        _save_npy(self.dir / CENTROIDS_NAME, centroids.astype(np.float32))
        self._pq = index
        self.meta["pq"] = {
            "centroids": CENTROIDS_NAME,
            "subquantizers": m,
            "bits": PQ_BITS,
            "trained_on_rows": sample_size,
        }

    def finish(self) -> None:
        """Train the product quantizer once the index is large enough, code every chunk, commit."""
        if self.meta["pq"] is None and int(self.live()["n_frames"].sum()) >= self.pq_min_rows:
            self._train_pq()
        if self.meta["pq"] is not None:
            for chunk in self.meta["chunks"]:
                if not chunk["codes"]:
                    _save_npy(
                        self.dir / "chunks" / f"{chunk['name']}.codes.npy",
                        self._encode(self.chunk_array(chunk)),
                    )
                    chunk["codes"] = True
        self.commit()

    def commit(self) -> None:
        self.meta["generation"] += 1
        old = self.meta["files_table"]
        name = f"files-{self.meta['generation']:06d}.parquet"
        with atomic_path(self.dir / name) as tmp:
            self.files.to_parquet(tmp, index=False)
        self.meta["files_table"] = name
        self.meta["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic_write_text(self.dir / "index.json", json.dumps(self.meta, indent=2))
        # `old` was checked when index.json was read; checked again here because this deletes.
        if old and old != name and _matches(FILES_TABLE_NAME, old):
            (self.dir / old).unlink(missing_ok=True)


def write_embeddings(
    index_dir: Path | str,
    model: dict[str, Any],
    files: Iterable[tuple[str, np.ndarray]],
    chunk_rows: int = CHUNK_MAX_ROWS,
    pq_min_rows: int = PQ_MIN_ROWS,
) -> dict[str, Any]:
    """Append precomputed frame embeddings (`(name, [T, D] unit-norm array)` pairs) to an index.

    The same on-disk format as `build_index`, for embeddings computed elsewhere and for
    benchmarks; `model` is a `model_reference`. The files get size and mtime 0, so a later
    `build_index` over a folder treats them as gone. Returns the number of files and frames added.
    """
    index_dir = Path(index_dir)
    n_files = n_frames = 0
    with _locked(index_dir):
        writer = _IndexWriter(index_dir, model, pq_min_rows)
        pending: list[_Pending] = []
        rows = 0
        for name, emb in files:
            emb = np.asarray(emb)
            if emb.ndim != 2 or emb.shape[1] != writer.dim or len(emb) == 0:
                raise DataError(
                    f"{name}: embeddings must be a non-empty [T, {writer.dim}] array, got {emb.shape}"
                )
            hop = float(model["frame_hop_s"])
            pending.append(_Pending(str(name), 0, 0, len(emb) * hop, emb.astype(np.float16)))
            rows += len(emb)
            n_files, n_frames = n_files + 1, n_frames + len(emb)
            if rows >= chunk_rows:
                writer.add_chunk(pending)
                pending, rows = [], 0
        writer.add_chunk(pending)
        writer.finish()
    return {"files": n_files, "frames": n_frames, "chunks_written": writer.chunks_written}


# --- indexing -------------------------------------------------------------------------------------
def build_index(
    audio_dir: Path | str,
    index_dir: Path | str,
    detector: Any,
    extensions: Sequence[str] = AUDIO_EXTENSIONS,
    batch_files: int = 1024,
    progress: bool = True,
    pq_min_rows: int = PQ_MIN_ROWS,
    objects: Sequence[ObjectInfo] | None = None,
) -> dict[str, Any]:
    """Index every audio file under `audio_dir` (recursively) into `index_dir`; see the module doc.

    `audio_dir` is a local folder or an S3 prefix; `objects` is the prefix's audio objects when the
    caller has listed them already (`storage.list_objects`), so a large prefix is listed once.
    Only new or changed files (size or mtime differ) are embedded; files gone from the folder
    are marked deleted. Files that cannot be decoded are skipped and listed in the summary.
    Every `batch_files` files (or `CHUNK_MAX_ROWS` frames) become one new chunk, committed at once.
    """
    from rich.progress import Progress

    from flam_core import storage  # boto3 only where an index is built, not where one is searched

    remote = storage.is_s3(audio_dir)
    index_dir = Path(index_dir)
    if not remote:
        audio_dir = Path(audio_dir)
        if not audio_dir.is_dir():
            raise DataError(f"audio folder {audio_dir} does not exist")
    if not isinstance(batch_files, int) or batch_files < 1:
        raise ConfigError(f"batch_files must be a positive integer, got {batch_files!r}")
    if isinstance(extensions, str) or not extensions:
        raise ConfigError(f"extensions must be a list of file extensions, got {extensions!r}")
    started = time.perf_counter()
    found: list[tuple[str, Path | ObjectInfo, int, int]]  # (name in the index, file, size, mtime_ns)
    if remote:
        listed = storage.list_objects(str(audio_dir), extensions) if objects is None else objects
        found = [(o.uri, o, o.size, o.mtime_ns) for o in listed]
    else:
        found = list(scan_audio_files(Path(audio_dir), extensions, index_dir.resolve()))
    if not found:
        raise DataError(f"{audio_dir} holds no audio files ({', '.join(extensions)})")
    model = model_reference(detector)
    with _locked(index_dir):
        writer = _IndexWriter(index_dir, model, pq_min_rows)
        live = writer.live().set_index("path")
        todo, unchanged, changed = [], 0, 0
        for rel, path, size, mtime in found:
            if rel in live.index:
                old = live.loc[rel]
                if int(old["size"]) == size and int(old["mtime_ns"]) == mtime:
                    unchanged += 1
                    continue
                changed += 1
            todo.append((rel, path, size, mtime))
        removed = sorted(set(live.index) - {rel for rel, *_ in found})
        writer.mark_deleted(removed)
        writer.mark_deleted(rel for rel, *_ in todo)  # changed files stay out even if they now fail
        writer.meta["audio_dir"] = str(audio_dir) if remote else str(Path(audio_dir).resolve())
        skipped: list[dict[str, str]] = []
        pending: list[_Pending] = []
        rows = embedded = frames = 0
        audio_s = 0.0
        with (
            Progress(disable=not (progress and interactive())) as bar,
            storage.Staging() if remote else contextlib.nullcontext() as staging,
        ):
            task = bar.add_task("indexing", total=len(todo))
            files = (item for _, item, _, _ in todo)
            local = staging.fetch_all(files) if remote else ((f, f) for f in files)
            for (rel, _, size, mtime), (_, path) in zip(todo, local, strict=True):
                try:
                    samples = detector.load_audio(path)
                except AudioError as exc:
                    # A downloaded file's error names its temporary copy: name the object instead.
                    message = str(exc).replace(str(path), rel) if remote else str(exc)
                    skipped.append({"file": rel, "error": message})
                    bar.advance(task)
                    continue
                finally:
                    if remote:
                        staging.release(path)
                emb = detector.embed(samples)
                duration = len(samples) / detector.sample_rate
                pending.append(_Pending(rel, size, mtime, duration, emb.astype(np.float16)))
                rows += len(emb)
                embedded, frames, audio_s = embedded + 1, frames + len(emb), audio_s + duration
                if len(pending) >= batch_files or rows >= CHUNK_MAX_ROWS:
                    writer.add_chunk(pending)
                    pending, rows = [], 0
                bar.advance(task)
            writer.add_chunk(pending)
        live_after = writer.live()
        if live_after.empty:
            detail = "; ".join(f"{s['file']}: {s['error']}" for s in skipped[:3])
            raise DataError(f"no audio file under {audio_dir} could be indexed ({detail})")
        writer.finish()
    seconds = time.perf_counter() - started
    return {
        "index_dir": str(index_dir),
        "audio_dir": str(audio_dir),
        "model": model["source"],
        "scanned": len(found),
        "new": len(todo) - changed,
        "changed": changed,
        "unchanged": unchanged,
        "removed": len(removed),
        "embedded": embedded,
        "skipped": skipped,
        "frames_added": frames,
        "audio_s": round(audio_s, 3),
        "chunks_written": writer.chunks_written,
        "files": len(live_after),
        "frames": int(live_after["n_frames"].sum()),
        "search": "pq" if writer.meta["pq"] is not None else "exact",
        "seconds": round(seconds, 3),
        "audio_s_per_s": round(audio_s / seconds, 2) if seconds > 0 else None,
    }


# --- reading and search ---------------------------------------------------------------------------
class SearchIndex:
    """An opened index: memory-mapped embeddings, the live-row mask and the scan structure."""

    def __init__(
        self, index_dir: Path, meta: dict[str, Any], files: pd.DataFrame, rerank: int = RERANK
    ) -> None:
        if isinstance(rerank, bool) or not isinstance(rerank, int) or rerank < 1:
            raise ConfigError(f"rerank must be a positive integer, got {rerank!r}")
        self.dir, self.meta, self.rerank = index_dir, meta, rerank
        self.model: dict[str, Any] = meta["model"]
        self.dim = int(self.model["embed_dim"])
        self.frame_hop_s = float(self.model["frame_hop_s"])
        self.n_rows = int(meta["rows"])
        self.chunks: list[np.ndarray] = []
        for chunk in meta["chunks"]:
            path = index_dir / "chunks" / f"{chunk['name']}.npy"
            if not path.is_file():
                raise DataError(f"{index_dir}: chunk file {path.name} is missing")
            array = np.load(path, mmap_mode="c")  # copy-on-write: torch can view it; never written
            if array.shape != (chunk["rows"], self.dim) or array.dtype != np.float16:
                raise DataError(
                    f"{path} holds {array.dtype} {array.shape}, "
                    f"index.json says float16 {(chunk['rows'], self.dim)}"
                )
            self.chunks.append(array)
        self.chunk_start = np.array([c["first_row"] for c in meta["chunks"]] + [self.n_rows], dtype=np.int64)
        files = files.sort_values("first_row", ignore_index=True)
        self.files = files
        self.paths = files["path"].to_numpy(object)
        self.first_row = files["first_row"].to_numpy(np.int64)
        self.n_frames = files["n_frames"].to_numpy(np.int64)
        self.duration_s = files["duration_s"].to_numpy(np.float64)
        self.live = np.zeros(self.n_rows, dtype=bool)
        for first, n in zip(
            self.first_row[~files["deleted"].to_numpy()],
            self.n_frames[~files["deleted"].to_numpy()],
            strict=True,
        ):
            self.live[first : first + n] = True
        self.n_live = int(self.live.sum())
        self._checked: weakref.WeakSet = weakref.WeakSet()
        self._pq: Any = None
        self._exact: np.ndarray | None = None
        if meta["pq"] is not None:
            self._pq = self._load_pq()
        else:
            self._exact = (
                np.concatenate([np.asarray(c, dtype=np.float32) for c in self.chunks])
                if self.chunks
                else np.zeros((0, self.dim), np.float32)
            )

    @classmethod
    def open(cls, index_dir: Path | str, rerank: int = RERANK) -> SearchIndex:
        """Open an index for searching. `rerank`: PQ-scan candidates re-scored exactly per query."""
        importlib.import_module("flam_core.postprocess")
        index_dir = Path(index_dir)
        meta = _read_meta(index_dir)
        if meta is None:
            raise DataError(
                f"{index_dir} is not a search index (no index.json): run `flam index AUDIO_DIR` first"
            )
        return cls(index_dir, meta, _read_files(index_dir, meta), rerank)

    def _load_pq(self) -> Any:
        faiss = _faiss()
        info = self.meta["pq"]
        centroids = np.load(self.dir / info["centroids"])
        if (
            centroids.ndim != 3
            or centroids.shape[0] != int(info["subquantizers"])
            or centroids.shape[0] * centroids.shape[2] not in (self.dim, _pq_dim(self.dim))
        ):
            raise DataError(
                f"{self.dir / info['centroids']}: codebook {centroids.shape} does not fit "
                f"{info['subquantizers']} subquantizers over {self.dim} dimensions"
            )
        index = _pq_from_centroids(faiss, centroids, int(info["bits"]))
        for chunk in self.meta["chunks"]:
            path = self.dir / "chunks" / f"{chunk['name']}.codes.npy"
            if not chunk["codes"] or not path.is_file():
                raise DataError(
                    f"{self.dir}: chunk {chunk['name']} has no PQ codes; run `flam index` again to add them"
                )
            codes = np.load(path)
            if codes.shape != (chunk["rows"], index.pq.code_size):
                raise DataError(
                    f"{path} holds codes {codes.shape}, expected {(chunk['rows'], index.pq.code_size)}"
                )
            index.add_sa_codes(np.ascontiguousarray(codes))
        return faiss.IndexPQFastScan(index)

    # -- facts ----------------------------------------------------------------------------------
    @property
    def method(self) -> str:
        return "pq" if self._pq is not None else "exact"

    @property
    def n_files(self) -> int:
        return int((~self.files["deleted"]).sum())

    def check_model(self, detector: Any) -> None:
        """Refuse a detector whose frame embeddings are not those of the index (ConfigError)."""
        if detector in self._checked:
            return
        _check_model(self.dir, self.model, model_reference(detector))
        self._checked.add(detector)

    # -- embeddings -----------------------------------------------------------------------------
    def gather(self, rows: np.ndarray) -> np.ndarray:
        """float32 embeddings of global `rows` (any order)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), np.float16)
        which = np.searchsorted(self.chunk_start, rows, side="right") - 1
        for c in np.unique(which):
            mine = np.flatnonzero(which == c)
            local = rows[mine] - self.chunk_start[c]
            order = np.argsort(local, kind="stable")
            out[mine[order]] = self.chunks[c][local[order]]
        return _to_float32(out)

    def file_rows(self, file: int, start: int, stop: int) -> np.ndarray:
        """float32 embeddings of frames `start:stop` of table row `file` (one chunk holds a file)."""
        first = int(self.first_row[file])
        c = int(np.searchsorted(self.chunk_start, first, side="right") - 1)
        local = first - int(self.chunk_start[c])
        return _to_float32(self.chunks[c][local + start : local + stop])

    def file_of(self, rows: np.ndarray) -> np.ndarray:
        """Files-table row of each global row."""
        return np.searchsorted(self.first_row, rows, side="right") - 1

    def top_frames(self, vector: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The `n` live frames with the highest inner product with `vector`: (rows, float32 embeddings).

        Exact on a small index; with PQ codes, the best `max(n, self.rerank)` candidates by the
        quantized scan are re-scored exactly, widening the scan while deleted rows crowd it.
        """
        q = np.ascontiguousarray(vector, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.dim:
            raise DataError(f"query vector has {q.shape[0]} dimensions, the index {self.dim}")
        n = min(int(n), self.n_live)
        if n <= 0:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        if self._pq is None:
            assert self._exact is not None
            cos = (torch.from_numpy(self._exact) @ torch.from_numpy(q)).numpy()
            cos[~self.live] = -np.inf
            rows = np.argpartition(-cos, n - 1)[:n] if n < len(cos) else np.arange(len(cos))
            rows = rows[np.argsort(-cos[rows], kind="stable")]
            return rows, self._exact[rows]
        wanted = max(n, self.rerank)
        while True:
            with _faiss_threads(1):
                _, found = self._pq.search(_pq_padded(q[None], self._pq.d), min(wanted, self.n_rows))
            rows = found[0][found[0] >= 0]
            rows = rows[self.live[rows]]
            if len(rows) >= min(max(n, self.rerank // 2), self.n_live) or wanted >= self.n_rows:
                break
            wanted *= 4
        emb = self.gather(rows)
        order = np.argsort(-(torch.from_numpy(emb) @ torch.from_numpy(q)).numpy(), kind="stable")[:n]
        return rows[order], emb[order]


def _window_segments(
    index: SearchIndex,
    detector: Any,
    query: str,
    file: int,
    hits: np.ndarray,
    cut: float,
) -> list[tuple[float, float, float]]:
    """(onset, offset, score) segments of one file around its hit frames (all of a short file).

    Each window's scores are median-filtered with `median_frames // 2` frames of context on
    both sides, so the filtered values inside it are those of the whole file; a window grows (by
    doubling steps) while an active frame touches one of its inner edges. The segments are
    therefore exactly those `segments_from_frames` finds in the whole file's scores (the runs of
    frames whose median-filtered score is above the threshold, scored by their highest
    unfiltered score).
    """
    from flam_core.postprocess import active_runs, median_filter_frames

    n = int(index.n_frames[file])
    half = detector.median_frames // 2
    hop, duration = index.frame_hop_s, float(index.duration_s[file])
    out: list[tuple[float, float, float]] = []
    covered = 0  # frames before this are settled; the frame just before it is inactive
    for t in np.sort(hits):
        if t < covered:
            continue
        if n <= WHOLE_FILE_FRAMES:
            lo, hi = 0, n
        else:
            lo, hi = max(covered, int(t) - REGION_FRAMES), min(n, int(t) + REGION_FRAMES + 1)
        step = REGION_FRAMES
        while True:
            ext_lo, ext_hi = max(0, lo - half), min(n, hi + half)
            probs = detector.score(index.file_rows(file, ext_lo, ext_hi), [query])[0]
            active = median_filter_frames(probs, detector.median_frames) > cut
            grow_lo = lo > covered and active[lo - ext_lo]
            grow_hi = hi < n and active[hi - 1 - ext_lo]
            if not (grow_lo or grow_hi):
                break
            if grow_lo:
                lo = max(covered, lo - step)
            if grow_hi:
                hi = min(n, hi + step)
            step *= 2
        window = slice(lo - ext_lo, hi - ext_lo)
        starts, stops, peaks = active_runs(active[window], probs[window])
        onsets = (lo + starts) * hop
        offsets = np.minimum((lo + stops) * hop, duration)
        out += zip(onsets.tolist(), offsets.tolist(), peaks.astype(float).tolist(), strict=True)
        covered = hi
    return out


def search(
    index: SearchIndex,
    detector: Any,
    query: str,
    top: int = 10,
    threshold: float | None = None,
) -> list[dict[str, Any]]:
    """The `top` best segments of the corpus for a text query: `{"file", "onset", "offset", "score"}`.

    `file` is the path relative to the indexed folder (an object's URI for an S3 prefix); `score`
    the segment's highest frame score. `threshold` defaults to the detector's calibrated
    threshold for the query. When no frame passes it, the best frames come back as one-frame
    segments (scores below threshold).
    """
    if not isinstance(query, str) or not query.strip():
        raise DataError(f"the query must be a non-empty text, got {query!r}")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise DataError(f"top must be a positive integer, got {top!r}")
    if threshold is not None and (
        isinstance(threshold, bool) or not isinstance(threshold, int | float) or not math.isfinite(threshold)
    ):
        raise DataError(f"threshold must be a finite number, got {threshold!r}")
    index.check_model(detector)
    if index.n_live == 0:
        return []
    with _torch_threads(1):
        return _search(index, detector, query, top, threshold)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """torch with `n` intra-op threads. A query scores many small windows; on a busy machine waking
    torch's thread pool for each costs milliseconds, far more than the work itself."""
    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if before != n:
            torch.set_num_threads(before)


def _search(
    index: SearchIndex, detector: Any, query: str, top: int, threshold: float | None
) -> list[dict[str, Any]]:
    from flam_core.postprocess import median_filter_frames

    cut = float(threshold) if threshold is not None else float(detector.threshold_for(query))
    rows, emb = index.top_frames(detector.ranking_vector(query), max(top, index.rerank))
    scores = detector.score(emb, [query])[0]
    order = np.argsort(-scores, kind="stable")
    rows, scores = rows[order], scores[order]
    files = index.file_of(rows)
    hop = index.frame_hop_s
    # A segment's best frame is active (its median-filtered score passes the threshold): only
    # active candidates start a file visit. Activity is checked in blocks, as the visits need it.
    above = np.flatnonzero(scores > cut)
    active = np.full(len(rows), -1, dtype=np.int8)  # -1: not checked yet
    half = detector.median_frames // 2

    def check(which: np.ndarray) -> None:
        which = which[active[which] < 0]
        if len(which):
            first, length = index.first_row[files[which]], index.n_frames[files[which]]
            local = (rows[which] - first)[:, None] + np.arange(-half, half + 1)
            around = first[:, None] + np.clip(local, 0, length[:, None] - 1)  # the filter's "nearest" edge
            probs = detector.score(index.gather(around.ravel()), [query])[0].reshape(len(which), -1)
            active[which] = median_filter_frames(probs, detector.median_frames)[:, half] > cut

    segments: list[tuple[float, int, float, float]] = []  # (score, file, onset, offset)
    best: list[float] = []  # the `top` highest segment scores so far, a min-heap
    visited: set[int] = set()
    for position, j in enumerate(above):
        if position % ACTIVITY_BLOCK == 0:
            check(above[position : position + ACTIVITY_BLOCK])
        if not active[j]:
            continue
        if len(best) >= top and best[0] >= scores[j]:
            break  # no unvisited file holds an active frame scoring above the `top`-th segment
        file = int(files[j])
        if file in visited:
            continue
        visited.add(file)
        mine = above[files[above] == file]
        check(mine)
        hits = rows[mine[active[mine] == 1]] - index.first_row[file]
        for onset, offset, score in _window_segments(index, detector, query, file, hits, cut):
            segments.append((score, file, onset, offset))
            if len(best) < top:
                heapq.heappush(best, score)
            elif score > best[0]:
                heapq.heapreplace(best, score)
    if not segments:
        for j in range(min(top, len(rows))):
            file = int(files[j])
            t = int(rows[j] - index.first_row[file])
            segments.append(
                (float(scores[j]), file, t * hop, min((t + 1) * hop, float(index.duration_s[file])))
            )
    ranked = heapq.nsmallest(top, segments, key=lambda s: (-s[0], s[1], s[2]))
    return [
        {"file": str(index.paths[f]), "onset": float(onset), "offset": float(offset), "score": float(score)}
        for score, f, onset, offset in ranked
    ]
