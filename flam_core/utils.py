"""Small shared helpers: atomic outputs, stable seeds, content hashes, external commands."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from flam_core.errors import ExternalToolError


def stable_seed(*parts: object) -> int:
    """A 63-bit seed derived from the parts' text (stable across runs and platforms)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def json_sha256(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `target`, on error it vanishes.

    Readers never see a half-written `target`: either the old one or the complete new one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        staging.chmod(0o755)  # mkdtemp makes it owner-only; outputs are for everyone to read
        if target.exists():
            retired = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(retired)
            staging.rename(target)
            shutil.rmtree(retired)
        else:
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: Path | str, suffix: str = ".part") -> Iterator[Path]:
    """A temporary path beside `path` to write; on success it replaces `path` atomically
    (readable by all, as a normal file), on any error it is removed and `path` is left as it was.

        with atomic_path(out / "model.pt") as tmp:
            torch.save(state, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o644)  # mkstemp makes it owner-only
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def flam_cache_dir() -> Path:
    """The user's cache of downloads, converted weights and prompt embeddings: $FLAM_CACHE_DIR,
    else ~/.cache/flam."""
    return Path(os.environ.get("FLAM_CACHE_DIR") or "~/.cache/flam").expanduser()


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write `text` to `path` through a temporary file and an atomic rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def interactive() -> bool:
    """Whether progress bars should show: a terminal on stderr, and not CI."""
    return os.environ.get("CI") is None and os.isatty(2)


def run_tool(args: Sequence[str], *, cwd: Path | None = None, hint: str = "") -> str:
    """Run an external program; raise `ExternalToolError` with its stderr when it fails."""
    if shutil.which(args[0]) is None:
        raise ExternalToolError(f"'{args[0]}' is not installed. {hint}".strip())
    proc = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise ExternalToolError(f"{' '.join(args)} failed ({proc.returncode}): {detail} {hint}".strip())
    return proc.stdout


AUDIO_EXTENSIONS = ("wav", "flac", "ogg", "mp3")  # what `flam index` and `flam detect` look for in folders


def scan_audio_files(
    folder: Path, extensions: Sequence[str] = AUDIO_EXTENSIONS, skip: Path | None = None
) -> list[tuple[str, Path, int, int]]:
    """(path relative to `folder`, path, size in bytes, mtime in ns) of every file under `folder`
    (recursively) with one of `extensions`, sorted by path; files inside `skip` are left out."""
    suffixes = {"." + e.lower().lstrip(".") for e in extensions}
    found = []
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in suffixes or not path.is_file():
            continue
        if skip is not None and skip in path.resolve().parents:
            continue
        stat = path.stat()
        found.append((path.relative_to(folder).as_posix(), path, stat.st_size, stat.st_mtime_ns))
    return found
