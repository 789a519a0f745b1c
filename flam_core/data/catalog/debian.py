"""Debian sound packages -> labelled clips, through reviewed mapping files.

A package is fetched with `apt-get download` (no dependencies, nothing installed) and unpacked
with `dpkg-deb -x` into the cache; both steps are skipped when their result is there. Audio
packed in bundles is unpacked next to the bundle, so mappings address it like any other file:
Qt resource bundles (`*.rcc`, gcompris-qt-data) into `<bundle>.rcc.d/<resource path>`, OpenTTD
sound catalogues (`*.cat`, openttd-opensfx) into `<bundle>.cat.d/<NN>_<title>.wav`, OpenClonk
C4Group archives (`*.ocg`/`*.ocd`/..., openclonk-data; any file with their gzip magic 1e 8c)
into `<bundle>.d/<path inside>`, nested groups as folders, and zip archives (`*.zip`, Quake 3
`*.pk3`, Warzone 2100 `*.wz`; checked with `zipfile.is_zipfile`) into `<bundle>.d/<member path>`.
`mappings/<package>.yaml` says which files are which sound (first matching pattern wins);
files matching `exclude` were reviewed and left out; the rest are counted as unmapped.
"""

from __future__ import annotations

import fnmatch
import gzip
import re
import struct
import zipfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flam_core.data.catalog.base import BuildReport, ClipKind, RawClip
from flam_core.errors import DataError, ExternalToolError
from flam_core.utils import atomic_dir, run_tool, stable_seed

MAPPINGS_DIR = Path(__file__).parent / "mappings"
AUDIO_SUFFIXES = (".wav", ".ogg", ".oga", ".flac")
ZIP_SUFFIXES = (".zip", ".pk3", ".wz")
_APT_HINT = "Run `make deps` (it runs apt-get update and installs the Debian tools)."


class MappingRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    pattern: str
    label: str = Field(min_length=1)
    kind: ClipKind = "event"
    sample: int | None = Field(None, ge=1)
    captions: tuple[str, ...] = ()


class PackageMapping(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    package: str
    licence: str
    root: str
    clips: tuple[MappingRule, ...]
    exclude: tuple[str, ...] = ()


def load_mapping(package: str, mappings_dir: Path = MAPPINGS_DIR) -> PackageMapping:
    path = mappings_dir / f"{package}.yaml"
    if not path.is_file():
        raise DataError(f"no label mapping for package {package!r} (expected {path})")
    try:
        mapping = PackageMapping.model_validate(yaml.safe_load(path.read_text()))
    except (ValidationError, yaml.YAMLError) as exc:
        raise DataError(f"{path}: invalid mapping file: {exc}") from exc
    if mapping.package != package:
        raise DataError(f"{path}: declares package {mapping.package!r}, expected {package!r}")
    return mapping


def fetch_package(package: str, cache_dir: Path) -> Path:
    """Return the folder where `package` is unpacked, downloading/unpacking it if needed."""
    target = cache_dir / "extracted" / package
    if (target / ".complete").is_file():
        return target
    debs = cache_dir / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        run_tool(["apt-get", "download", package], cwd=debs, hint=_APT_HINT)
        found = sorted(debs.glob(f"{package}_*.deb"))
        if not found:
            raise ExternalToolError(f"apt-get download {package} produced no .deb in {debs}")
    with atomic_dir(target) as staging:
        run_tool(["dpkg-deb", "-x", str(found[-1]), str(staging)])
        unpack_bundles(staging)
        (staging / ".complete").write_text(found[-1].name + "\n")
    return target


def qt_resources(bundle: Path) -> dict[str, bytes]:
    """The files of a Qt binary resource bundle (rcc format 1-3), by path, decompressed."""
    blob = bundle.read_bytes()
    try:
        if blob[:4] != b"qres":
            raise ValueError("no 'qres' magic")
        version, tree, data, names = struct.unpack_from(">IIII", blob, 4)
        entry_size = 14 if version == 1 else 22
        files: dict[str, bytes] = {}

        def name_at(offset: int) -> str:
            (length,) = struct.unpack_from(">H", blob, names + offset)
            return blob[names + offset + 6 : names + offset + 6 + 2 * length].decode("utf-16-be")

        def walk(node: int, prefix: str) -> None:
            at = tree + node * entry_size
            name_offset, flags = struct.unpack_from(">IH", blob, at)
            path = f"{prefix}/{name_at(name_offset)}" if node else ""
            if flags & 2:  # directory: children are entries first .. first+count-1
                count, first = struct.unpack_from(">II", blob, at + 6)
                for child in range(first, first + count):
                    walk(child, path)
                return
            (data_offset,) = struct.unpack_from(">I", blob, at + 10)
            (size,) = struct.unpack_from(">I", blob, data + data_offset)
            payload = blob[data + data_offset + 4 : data + data_offset + 4 + size]
            if flags & 4:
                raise ValueError(f"{path}: zstd-compressed resources are not supported")
            files[path.lstrip("/")] = zlib.decompress(payload[4:]) if flags & 1 else payload

        walk(0, "")
    except (ValueError, struct.error, zlib.error, UnicodeDecodeError) as exc:
        raise DataError(f"{bundle}: unreadable Qt resource bundle: {exc}") from exc
    return files


def unpack_bundles(root: Path) -> None:
    """Unpack the audio of every bundle under `root` into `<bundle>.d/` beside it. Unpackers
    write audio files only (never another bundle), so one pass over the files finds them all."""
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        out_dir = path.with_name(path.name + ".d")
        if path.name.endswith(".rcc"):
            unpack_qt_resources(path, out_dir)
        elif path.name.endswith(".cat") and is_openttd_catalogue(path):
            unpack_openttd_catalogue(path, out_dir)
        elif path.suffix.lower() in ZIP_SUFFIXES and zipfile.is_zipfile(path):
            unpack_zip(path, out_dir)
        elif is_c4group(path):
            unpack_c4group(path, out_dir)


def _write_audio(files: dict[str, bytes], out_dir: Path) -> int:
    """Write the audio files of an archive's `{path: bytes}` under `out_dir` (a path with a
    `..` part is skipped); return how many."""
    written = 0
    for path, payload in files.items():
        if Path(path).suffix.lower() in AUDIO_SUFFIXES and ".." not in Path(path).parts:
            target = out_dir / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(payload)
            written += 1
    return written


def unpack_qt_resources(bundle: Path, out_dir: Path) -> int:
    """Write the audio files of a Qt resource bundle under `out_dir`; return how many."""
    return _write_audio(qt_resources(bundle), out_dir)


def map_files(
    mapping: PackageMapping, relpaths: list[str], seed: int
) -> tuple[list[tuple[str, MappingRule]], BuildReport]:
    """Apply first-match-wins rules, exclusions and per-rule sampling to sorted relative paths."""
    report = BuildReport(package=mapping.package)
    by_rule: dict[int, list[str]] = {}
    for rel in sorted(relpaths):
        index = next(
            (i for i, rule in enumerate(mapping.clips) if fnmatch.fnmatchcase(rel, rule.pattern)),
            None,
        )
        if index is not None:
            by_rule.setdefault(index, []).append(rel)
        elif any(fnmatch.fnmatchcase(rel, pattern) for pattern in mapping.exclude):
            report.excluded += 1
        else:
            report.unmapped += 1
            if len(report.unmapped_examples) < 20:
                report.unmapped_examples.append(rel)
    selected: list[tuple[str, MappingRule]] = []
    for index in sorted(by_rule):
        rule, files = mapping.clips[index], by_rule[index]
        if rule.sample is not None and len(files) > rule.sample:
            rng = np.random.default_rng(stable_seed(seed, mapping.package, rule.pattern))
            keep = sorted(rng.choice(len(files), size=rule.sample, replace=False))
            report.sampled_out += len(files) - rule.sample
            files = [files[i] for i in keep]
        selected.extend((rel, rule) for rel in files)
    report.mapped = len(selected)
    return selected, report


def debian_clips(package: str, cache_dir: Path, seed: int) -> tuple[list[RawClip], BuildReport]:
    """All mapped clips of one Debian package, with the accounting of its files."""
    mapping = load_mapping(package)
    root = fetch_package(package, cache_dir) / mapping.root
    if not root.is_dir():
        raise DataError(f"{package}: mapping root {mapping.root!r} is not in the package")
    relpaths = [
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()
    ]
    selected, report = map_files(mapping, relpaths, seed)
    clips = [
        RawClip(
            source_package=package,
            origin=rel,
            label=rule.label,
            kind=rule.kind,
            licence=mapping.licence,
            path=root / rel,
            captions=rule.captions,
        )
        for rel, rule in selected
    ]
    return clips, report


def _catalogue_entries(blob: bytes) -> list[tuple[str, bytes]]:
    """(title, RIFF WAV bytes) of an OpenTTD sound catalogue; ValueError/struct.error if it is not one."""
    (first,) = struct.unpack_from("<I", blob, 0)
    count = (first & 0x7FFFFFFF) // 8
    if not 0 < count <= 4096:
        raise ValueError(f"implausible entry count {count}")
    entries = []
    for index in range(count):
        offset, _ = struct.unpack_from("<II", blob, 8 * index)
        offset &= 0x7FFFFFFF
        name = blob[offset + 1 : offset + 1 + blob[offset]].split(b"\0")[0].decode("utf-8", "replace")
        start = offset + 1 + blob[offset]
        if blob[start : start + 4] != b"RIFF":
            raise ValueError(f"entry {index} is not a RIFF file")
        (riff_size,) = struct.unpack_from("<I", blob, start + 4)
        entries.append((name, blob[start : start + 8 + riff_size]))
    return entries


def is_openttd_catalogue(bundle: Path) -> bool:
    try:
        return bool(_catalogue_entries(bundle.read_bytes()))
    except (ValueError, struct.error, IndexError):
        return False


def unpack_openttd_catalogue(bundle: Path, out_dir: Path) -> int:
    """Write each sound of an OpenTTD catalogue as `<NN>_<title>.wav` (title: the entry's quoted
    name, lower-case, non-alphanumerics as '-'); return how many."""
    try:
        entries = _catalogue_entries(bundle.read_bytes())
    except (ValueError, struct.error, IndexError) as exc:
        raise DataError(f"{bundle}: unreadable OpenTTD sound catalogue: {exc}") from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    for index, (name, wav) in enumerate(entries):
        quoted = re.match(r'\s*"([^"]*)"', name)
        title = re.sub(r"[^a-z0-9]+", "-", (quoted.group(1) if quoted else name).lower()).strip("-")
        (out_dir / f"{index:02d}_{title or 'sound'}.wav").write_bytes(wav)
    return len(entries)


# OpenClonk C4Group (src/c4group/C4Group.{h,cpp}): a gzip stream whose magic 1f 8b is written as
# 1e 8c, holding a 204-byte header (id "RedWolf Design GrpFolder", ver 1.x, entry count; stored
# XOR 237 with every byte triple reversed), then one 316-byte record per entry (name[260], packed,
# child-group flag, size, ...; not scrambled), then the entries' data back to back in record order.
# A child group's data is itself a header + records + data, without a gzip layer of its own.
_C4GROUP_MAGIC = b"\x1e\x8c"
_C4GROUP_ID = b"RedWolf Design GrpFolder"
_C4GROUP_HEADER = 204
_C4GROUP_RECORD = 316


def _c4group_entry_count(header: bytes) -> int:
    """Entry count of a scrambled C4Group header; ValueError if it is not one."""
    if len(header) < _C4GROUP_HEADER:
        raise ValueError("truncated group header")
    plain = np.frombuffer(header[:_C4GROUP_HEADER], np.uint8) ^ 237
    plain = plain.reshape(-1, 3)[:, ::-1].tobytes()  # 204 = 68 whole triples
    ver1, ver2, entries = struct.unpack_from("<iii", plain, 28)
    if plain[:28].split(b"\0")[0] != _C4GROUP_ID or ver1 != 1 or ver2 > 2 or not 0 <= entries < 1 << 20:
        raise ValueError("no C4Group header")
    return entries


def c4group_files(bundle: Path) -> dict[str, bytes]:
    """The files of an OpenClonk C4Group archive by path ('/'-joined through nested groups)."""
    try:
        blob = bundle.read_bytes()
        if blob[:2] not in (_C4GROUP_MAGIC, b"\x1f\x8b"):
            raise ValueError("no gzip magic")
        data = memoryview(gzip.decompress(b"\x1f\x8b" + blob[2:]))
        files: dict[str, bytes] = {}

        def walk(start: int, end: int, prefix: str) -> None:
            count = _c4group_entry_count(bytes(data[start : start + _C4GROUP_HEADER]))
            at = start + _C4GROUP_HEADER + count * _C4GROUP_RECORD
            if at > end:
                raise ValueError(f"the entry records of {prefix or 'the archive'} run past its end")
            for index in range(count):
                record = start + _C4GROUP_HEADER + index * _C4GROUP_RECORD
                raw_name = bytes(data[record : record + 260]).split(b"\0")[0]
                child, size = struct.unpack_from("<ii", data, record + 264)
                name = raw_name.decode("utf-8", "replace")
                if not name or name in (".", "..") or "/" in name or "\\" in name:
                    raise ValueError(f"unsafe entry name {raw_name!r}")
                if size < 0 or at + size > end:
                    raise ValueError(f"entry {prefix}{name} runs past the end of its group")
                if child:  # like the engine, only records flagged as child groups are opened as groups
                    walk(at, at + size, f"{prefix}{name}/")
                else:
                    files[prefix + name] = bytes(data[at : at + size])
                at += size

        walk(0, len(data), "")
    except (OSError, EOFError, ValueError, struct.error, zlib.error) as exc:
        raise DataError(f"{bundle}: unreadable C4Group archive: {exc}") from exc
    return files


def is_c4group(path: Path) -> bool:
    """Whether `path` starts like a packed C4Group: the 1e 8c magic and a valid group header."""
    with path.open("rb") as handle:
        if handle.read(2) != _C4GROUP_MAGIC:
            return False
        head = _C4GROUP_MAGIC + handle.read(1 << 16)
    try:
        plain = zlib.decompressobj(wbits=31).decompress(b"\x1f\x8b" + head[2:], _C4GROUP_HEADER)
        _c4group_entry_count(plain)
    except (ValueError, zlib.error):
        return False
    return True


def unpack_c4group(bundle: Path, out_dir: Path) -> int:
    """Write the audio files of a C4Group archive under `out_dir` (nested groups as folders);
    return how many."""
    return _write_audio(c4group_files(bundle), out_dir)


def unpack_zip(bundle: Path, out_dir: Path) -> int:
    """Write the audio members of a zip archive under `out_dir` at their member paths; return how
    many. An absolute or `..` member path is refused."""
    written = 0
    try:
        with zipfile.ZipFile(bundle) as archive:
            for member in archive.infolist():
                path = PurePosixPath(member.filename)
                if member.is_dir() or path.suffix.lower() not in AUDIO_SUFFIXES:
                    continue
                if path.is_absolute() or ".." in path.parts:
                    raise ValueError(f"unsafe member path {member.filename!r}")
                target = out_dir / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(member))
                written += 1
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, ValueError) as exc:
        raise DataError(f"{bundle}: unreadable zip archive: {exc}") from exc
    return written
