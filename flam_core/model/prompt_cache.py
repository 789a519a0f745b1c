"""Prompt embeddings kept on disk: detection with prompts seen before loads no text encoder.

What is kept, per prompt: what the detector scores with (`FlamDetector.prompt_embeddings`), the
unit-norm text embedding after the model's text projection `[D]`, its scale alpha and its bias
beta, as float32. The projection and the scale and bias MLPs are trained in every FLAM model (the
text encoder too with `model.train_text_encoder`), so an entry belongs to one model, never to its
text encoder alone: the key of a model hashes its `model.pt` and `config.json` and the identity of
its text encoder (`TextEncoder.identity`: name, the files of its folder, window, `transformers` and
`torch` versions). Caching after the head also spares the head's text MLPs.

Where: `$FLAM_PROMPT_CACHE` when it names a folder, else `<$FLAM_CACHE_DIR or ~/.cache/flam>/prompts`.
`FLAM_PROMPT_CACHE=off` (or `0`, `false`, `no`) turns the cache off: every prompt is encoded.

    <root>/<model key>/<text key>.f32    4 * (D + 2) bytes: embedding, alpha, beta (float32,
                                         little-endian), then a 16-byte BLAKE2b digest of the
                                         model key, the text and those bytes

Entries are written through a temporary file and an atomic rename (`utils.atomic_path`), so
processes sharing the cache see an entry whole or not at all, and two writing the same entry write
the same bytes. An entry that does not check out (damaged, truncated, of another size) counts as
missing: the prompt is encoded again and the entry rewritten. A cache that cannot be written
(read-only, disk full) is passed over: detection never depends on it.

Size: an entry is 2 KB (D = 512), one per distinct prompt of a model. The `MAX_MODELS` model
folders used last are kept: opening the cache of a model not in it removes the oldest beyond them.

Exactness: a hit returns, bit for bit, what the model computed when the prompt was first encoded.
A frozen encoder encodes the prompts missing in one call as a batch, and padding changes float32
rounding (about 1e-6), so a prompt encoded among other prompts can differ in its last bits from the
same prompt encoded alone, as within one process, where the encoder keeps its embeddings too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from flam_core.utils import atomic_path, file_sha256, flam_cache_dir

if TYPE_CHECKING:
    from flam_core.model.flam import FlamModel

ENV = "FLAM_PROMPT_CACHE"
OFF = frozenset({"off", "0", "false", "no"})
MAX_MODELS = 32  # model folders kept in the cache (the ones used last)
SUFFIX = ".f32"
_DIGEST = 16
log = logging.getLogger("flam.prompt_cache")

# What the detector keeps per prompt: (prompt vector [D], alpha [], beta []), float32 on the CPU;
# D is `FlamModel.vector_dim` (the text embedding, then the class weights when fused).
PromptRow = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def cache_root() -> Path | None:
    """The prompt cache's folder: `$FLAM_PROMPT_CACHE`, else `<flam cache>/prompts`; None when off."""
    setting = os.environ.get(ENV, "").strip()
    if setting.lower() in OFF:
        return None
    return Path(setting).expanduser() if setting else flam_cache_dir() / "prompts"


def model_key(model_dir: Path, model: FlamModel) -> str:
    """What a model's prompt embeddings depend on, hashed: its weights, its config and its text encoder."""
    identity = {
        "model.pt": file_sha256(Path(model_dir) / "model.pt"),
        "config.json": file_sha256(Path(model_dir) / "config.json"),
        "text_encoder": model.text_encoder.identity(),
        "vector_dim": model.vector_dim,  # fused with the classifier: its class weights follow
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


class PromptCache:
    """The entries of one model: `get` the prompts kept, `put` new ones."""

    def __init__(self, folder: Path, key: str, dim: int) -> None:
        self.folder, self.key, self.dim = Path(folder), key, dim

    @classmethod
    def open(cls, model_dir: Path | str, model: FlamModel, root: Path | None = None) -> PromptCache | None:
        """The cache of the model loaded from `model_dir` under `root` (default `cache_root()`);
        None when the cache is turned off. Marks the model's folder as used and, when it is new,
        removes the folders of the models used longest ago beyond `MAX_MODELS`."""
        root = cache_root() if root is None else Path(root)
        if root is None:
            return None
        key = model_key(Path(model_dir), model)
        folder = root / key
        if folder.is_dir():
            with contextlib.suppress(OSError):
                os.utime(folder)
        else:
            _prune(root, keep=MAX_MODELS - 1)
        return cls(folder, key, int(model.vector_dim))

    def _path(self, text: str) -> Path:
        return self.folder / (hashlib.blake2b(text.encode(), digest_size=16).hexdigest() + SUFFIX)

    def _digest(self, text: str, payload: bytes) -> bytes:
        signed = hashlib.blake2b(digest_size=_DIGEST)
        for part in (self.key.encode(), text.encode(), payload):
            signed.update(len(part).to_bytes(8, "little"))
            signed.update(part)
        return signed.digest()

    def get(self, texts: Iterable[str]) -> dict[str, PromptRow]:
        """The kept (embedding, alpha, beta) of those `texts` that have a sound entry."""
        size = 4 * (self.dim + 2)
        found: dict[str, PromptRow] = {}
        for text in texts:
            try:
                data = self._path(text).read_bytes()
            except OSError:
                continue
            payload, digest = data[:size], data[size:]
            if len(payload) != size or digest != self._digest(text, payload):
                log.debug("prompt cache entry of %r is damaged: it will be rewritten", text)
                continue
            row = torch.from_numpy(np.frombuffer(payload, dtype="<f4").astype(np.float32))
            found[text] = (row[: self.dim], row[self.dim], row[self.dim + 1])
        return found

    def put(self, rows: Mapping[str, PromptRow]) -> None:
        """Keep (embedding `[D]`, alpha, beta) of each text; a failed write is passed over."""
        for text, (emb, alpha, beta) in rows.items():
            values = torch.cat([emb.reshape(-1), alpha.reshape(1), beta.reshape(1)])
            payload = values.to("cpu", torch.float32).numpy().astype("<f4").tobytes()
            try:
                with atomic_path(self._path(text)) as tmp:
                    tmp.write_bytes(payload + self._digest(text, payload))
            except OSError as exc:
                log.debug("prompt cache %s not written (%s)", self.folder, exc)
                return


def _prune(root: Path, keep: int) -> None:
    """Remove the model folders of `root` beyond the `keep` used last (by modification time)."""
    try:
        folders = [p for p in root.iterdir() if p.is_dir()]
    except OSError:
        return
    if len(folders) <= keep:
        return

    def used(folder: Path) -> int:
        try:
            return folder.stat().st_mtime_ns
        except OSError:  # removed meanwhile by another process
            return 0

    for folder in sorted(folders, key=used, reverse=True)[keep:]:
        shutil.rmtree(folder, ignore_errors=True)
