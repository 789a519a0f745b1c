"""A frozen BERT text encoder (MiniLM is one) without `transformers`: its tokenizer read by the
`tokenizers` library from the folder's `tokenizer.json`, its weights from `model.safetensors`,
its forward pass written here in plain torch.

Why by hand: importing `transformers`' model code pulls in torch._dynamo, sympy, scipy.optimize
and torch.distributed.tensor, about 2.1 s on 2 cores, more than the rest of a `flam detect`
(BENCHMARKS "Start-up time"). A detection with a new prompt needs one forward pass of a six-layer
encoder, which is a page of torch. `tokenizers` is the library `transformers`' fast tokenizers
run on, so the token ids are the same by construction. Only a frozen, standard BERT is read this
way (`readable`: absolute positions, GELU, a `tokenizer.json`, safetensors weights); anything
else, and every fine-tuned encoder, loads through `transformers`. Its output equals
`transformers.BertModel`'s (tests/test_text_encoder.py).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from flam_core.errors import ConfigError

FILES = ("config.json", "tokenizer.json", "model.safetensors")


def readable(source: str) -> bool:
    """Whether `source` is a local folder holding a BERT this module reads."""
    folder = Path(source)
    if not all((folder / name).is_file() for name in FILES):
        return False
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(config, dict)
        and config.get("model_type") == "bert"
        and config.get("position_embedding_type", "absolute") == "absolute"
        and config.get("hidden_act", "gelu") == "gelu"
        and not config.get("is_decoder", False)
    )


@dataclass(frozen=True)
class BertConfig:
    """The fields of a BERT `config.json` the forward pass reads."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def read(cls, path: Path) -> BertConfig:
        stated = json.loads(path.read_text())
        try:
            return cls(**{name: stated[name] for name in cls.__dataclass_fields__ if name in stated})
        except TypeError as exc:
            raise ConfigError(f"{path}: not a BERT configuration ({exc})") from exc


class Encoding(dict):
    """`input_ids`, `token_type_ids`, `attention_mask`, as the tokenizer of `transformers` returns them."""

    def to(self, device: torch.device | str) -> Encoding:
        return Encoding({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()})


class Tokenizer:
    """The folder's `tokenizer.json` through `tokenizers`, called like a `transformers` tokenizer:
    `tokenizer(texts, padding=True, truncation=True, max_length=N, return_tensors="pt")`.

    One configured `tokenizers.Tokenizer` per truncation length, made once: configuring one is
    not safe while other threads encode with it, encoding is."""

    def __init__(self, source: str) -> None:
        self.path = Path(source) / "tokenizer.json"
        self._lock = threading.Lock()
        self._by_length: dict[int | None, Any] = {}
        untruncated = self._configured(None)
        pad = untruncated.token_to_id("[PAD]")
        self.pad_token_id = 0 if pad is None else pad
        stated = Path(source) / "tokenizer_config.json"
        settings = json.loads(stated.read_text()) if stated.is_file() else {}
        self.model_max_length = int(settings.get("model_max_length") or int(1e30))  # transformers' "unknown"

    def _configured(self, max_length: int | None) -> Any:
        """The `tokenizers.Tokenizer` that cuts at `max_length` (None: never), made on first use."""
        from tokenizers import Tokenizer as RustTokenizer

        with self._lock:
            if max_length not in self._by_length:
                tokenizer = RustTokenizer.from_file(str(self.path))
                tokenizer.no_padding()
                if max_length is None:
                    tokenizer.no_truncation()
                else:
                    tokenizer.enable_truncation(max_length)
                self._by_length[max_length] = tokenizer
            return self._by_length[max_length]

    def __call__(
        self,
        texts: str | list[str],
        padding: bool = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        add_special_tokens: bool = True,
    ) -> Encoding:
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        encoded = self._configured(max_length if truncation else None).encode_batch(
            batch, add_special_tokens=add_special_tokens
        )
        rows = {
            "input_ids": [e.ids for e in encoded],
            "token_type_ids": [e.type_ids for e in encoded],
            "attention_mask": [e.attention_mask for e in encoded],
        }
        if return_tensors is None:
            return Encoding({k: v[0] if single else v for k, v in rows.items()})
        if return_tensors != "pt":
            raise ConfigError(f"return_tensors={return_tensors!r}: only 'pt' is supported")
        width = max(len(row) for row in rows["input_ids"])
        if not padding and any(len(row) != width for row in rows["input_ids"]):
            raise ConfigError("texts of different lengths need padding=True")
        out = Encoding()
        for key, pad in (("input_ids", self.pad_token_id), ("token_type_ids", 0), ("attention_mask", 0)):
            table = np.full((len(batch), width), pad, dtype=np.int64)
            for i, row in enumerate(rows[key]):
                table[i, : len(row)] = row
            out[key] = torch.from_numpy(table)
        return out


class _Layer(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        d, eps = config.hidden_size, config.layer_norm_eps
        self.heads = config.num_attention_heads
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.attention_out, self.attention_norm = nn.Linear(d, d), nn.LayerNorm(d, eps=eps)
        self.intermediate = nn.Linear(d, config.intermediate_size)
        self.out, self.out_norm = nn.Linear(config.intermediate_size, d), nn.LayerNorm(d, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, heads, T, D / heads]
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        attended = F.scaled_dot_product_attention(
            split(self.query(x)), split(self.key(x)), split(self.value(x)), attn_mask=mask
        )
        x = self.attention_norm(x + self.attention_out(attended.transpose(1, 2).reshape(b, t, d)))
        return self.out_norm(x + self.out(F.gelu(self.intermediate(x))))


@dataclass
class BertOutput:
    last_hidden_state: torch.Tensor  # [B, T, D]


class Bert(nn.Module):
    """BERT's embeddings and encoder layers (no pooler): `model(input_ids, attention_mask,
    token_type_ids).last_hidden_state`, as `transformers.BertModel` gives it."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, d)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, d)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, d)
        self.embedding_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(_Layer(config) for _ in range(config.num_hidden_layers))

    @classmethod
    def from_folder(cls, source: str) -> Bert:
        """The model of a folder `readable` accepts, weights from its `model.safetensors`."""
        from safetensors.torch import load_file

        folder = Path(source)
        model = cls(BertConfig.read(folder / "config.json"))
        weights = {
            k.removeprefix("bert."): v for k, v in load_file(str(folder / "model.safetensors")).items()
        }
        names = {
            "embeddings.word_embeddings": "word_embeddings",
            "embeddings.position_embeddings": "position_embeddings",
            "embeddings.token_type_embeddings": "token_type_embeddings",
            "embeddings.LayerNorm": "embedding_norm",
        }
        for i in range(model.config.num_hidden_layers):
            stem = f"encoder.layer.{i}"
            names |= {
                f"{stem}.attention.self.query": f"layers.{i}.query",
                f"{stem}.attention.self.key": f"layers.{i}.key",
                f"{stem}.attention.self.value": f"layers.{i}.value",
                f"{stem}.attention.output.dense": f"layers.{i}.attention_out",
                f"{stem}.attention.output.LayerNorm": f"layers.{i}.attention_norm",
                f"{stem}.intermediate.dense": f"layers.{i}.intermediate",
                f"{stem}.output.dense": f"layers.{i}.out",
                f"{stem}.output.LayerNorm": f"layers.{i}.out_norm",
            }
        state = {}
        for theirs, ours in names.items():
            for kind in ("weight", "bias"):
                # Old checkpoints name LayerNorm parameters gamma and beta.
                old = {"weight": "gamma", "bias": "beta"}[kind]
                tensor = weights.get(f"{theirs}.{kind}", weights.get(f"{theirs}.{old}"))
                if tensor is not None:
                    state[f"{ours}.{kind}"] = tensor
        missing, _ = model.load_state_dict(state, strict=False)
        if missing:
            raise ConfigError(f"{folder / 'model.safetensors'}: no weights for {missing[:3]}")
        return model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> BertOutput:
        t = input_ids.shape[1]
        if t > self.config.max_position_embeddings:
            raise ConfigError(f"{t} tokens: the encoder has {self.config.max_position_embeddings} positions")
        positions = torch.arange(t, device=input_ids.device)
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        x = (
            self.word_embeddings(input_ids)
            + self.token_type_embeddings(types)
            + self.position_embeddings(positions)
        )
        x = self.embedding_norm(x)
        keep = (
            torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        )
        mask = keep[:, None, None, :]  # [B, 1, 1, T]: every query attends to the real tokens
        for layer in self.layers:
            x = layer(x, mask)
        return BertOutput(last_hidden_state=x)
