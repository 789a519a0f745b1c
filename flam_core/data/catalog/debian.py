"""Debian sound packages -> labelled clips, through reviewed mapping files.

A package is fetched with `apt-get download` (no dependencies, nothing installed) and unpacked
with `dpkg-deb -x` into the cache; both steps are skipped when their result is there.
`mappings/<package>.yaml` says which files are which sound (first matching pattern wins);
files matching `exclude` were reviewed and left out; the rest are counted as unmapped.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flam_core.data.catalog.base import BuildReport, ClipKind, RawClip
from flam_core.errors import DataError, ExternalToolError
from flam_core.utils import atomic_dir, run_tool, stable_seed

MAPPINGS_DIR = Path(__file__).parent / "mappings"
AUDIO_SUFFIXES = (".wav", ".ogg", ".oga", ".flac")
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
        (staging / ".complete").write_text(found[-1].name + "\n")
    return target


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
