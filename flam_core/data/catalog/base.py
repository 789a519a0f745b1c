"""What every catalog builder hands to the source-library builder."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

ClipKind = Literal["event", "background"]


@dataclass(frozen=True)
class RawClip:
    """One labelled recording before conditioning (resampling, trimming, normalisation).

    Exactly one of `path` (a file to decode) or `samples` (mono float32 at `sample_rate`)
    is set. `origin` names the recording uniquely within its package (a relative path, or a
    render description) and determines the clip id.
    """

    source_package: str
    origin: str
    label: str
    kind: ClipKind
    licence: str
    path: Path | None = None
    samples: np.ndarray | None = field(default=None, repr=False, compare=False)
    sample_rate: int | None = None
    captions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.path is None) == (self.samples is None):
            raise ValueError(f"{self.origin}: give exactly one of path or samples")
        if self.samples is not None and not self.sample_rate:
            raise ValueError(f"{self.origin}: samples need a sample_rate")
        if not self.label.strip():
            raise ValueError(f"{self.origin}: empty label")

    @property
    def clip_id(self) -> str:
        digest = hashlib.sha1(f"{self.source_package}/{self.origin}".encode()).hexdigest()[:12]
        return f"{self.source_package}-{digest}"


@dataclass
class BuildReport:
    """Per-package accounting: how many files were mapped, excluded, unmapped or bad."""

    package: str
    mapped: int = 0
    excluded: int = 0
    unmapped: int = 0
    sampled_out: int = 0
    unmapped_examples: list[str] = field(default_factory=list)
