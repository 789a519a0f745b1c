"""The text encoder reads prompts up to its window, says when it cuts one, encodes missing texts in
fixed batches of their sorted set, and loads without a progress bar."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from flam_core.errors import ConfigError
from flam_core.model import bert
from flam_core.model import text_encoder as text_module
from flam_core.model.text_encoder import ENCODE_BATCH, TextEncoder

# Two prompts that differ only in their last words, past token 40.
HEAD = " ".join(["a dog barks in the yard while a car passes slowly on the wet road outside"] * 3)
LONG_A, LONG_B = f"{HEAD} and then a bell rings", f"{HEAD} and then glass breaks"


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder()


def n_tokens(encoder: TextEncoder, text: str) -> int:
    return len(encoder.tokenizer(text)["input_ids"])


def test_the_default_window_is_the_encoders_own(encoder):
    # MiniLM was trained on 256 tokens (sentence_bert_config.json), though its tokenizer says 512.
    assert encoder.window == 256 and encoder.max_length == 256
    with pytest.raises(ConfigError, match="exceeds the 512 positions"):
        TextEncoder(max_length=600)


def test_prompts_differing_after_token_40_get_different_embeddings(encoder, caplog, monkeypatch):
    monkeypatch.setattr(text_module, "_cut_warned", False)
    prefix = len(encoder.tokenizer(HEAD, add_special_tokens=False)["input_ids"])
    assert prefix > 40 and n_tokens(encoder, LONG_A) < encoder.window
    with caplog.at_level(logging.WARNING, logger="flam.text"):
        a, b = encoder([LONG_A, LONG_B])
    assert not torch.allclose(a, b, atol=1e-3)
    assert not caplog.records  # nothing was cut


def test_a_shorter_configured_window_cuts_and_says_so_once(caplog, monkeypatch):
    monkeypatch.setattr(text_module, "_cut_warned", False)
    short = TextEncoder(max_length=32)
    with caplog.at_level(logging.WARNING, logger="flam.text"):
        a, b = short([LONG_A, LONG_B])
        short([f"{HEAD} and a third ending"])
    assert torch.equal(a, b)  # the endings were cut away
    (record,) = caplog.records  # once per process, not once per text
    message = record.getMessage()
    assert repr(LONG_A) in message and "longer than the 32 tokens of model.text_max_length" in message
    assert "reads up to 256" in message


def test_missing_texts_are_encoded_in_fixed_batches_of_the_sorted_set(encoder, monkeypatch):
    texts = [f"sound number {i} of the corpus" for i in range(2 * ENCODE_BATCH + 5)]
    calls: list[list[str]] = []
    original = TextEncoder.encode

    def counted(self: TextEncoder, chunk: list[str]) -> torch.Tensor:
        calls.append(list(chunk))
        return original(self, chunk)

    monkeypatch.setattr(TextEncoder, "encode", counted)
    encoder._cache.clear()
    shuffled = texts[::-1]
    out = encoder(shuffled + shuffled[:3])  # repeats are encoded once
    assert [len(c) for c in calls] == [ENCODE_BATCH, ENCODE_BATCH, 5]
    assert [t for chunk in calls for t in chunk] == sorted(texts)
    assert out.shape == (len(texts) + 3, encoder.dim) and out.dtype == torch.float32
    # An embedding depends on the set of texts encoded together, not on their order or the call.
    encoder._cache.clear()
    encoder.precompute(texts)
    assert torch.equal(torch.stack([encoder._cache[t] for t in shuffled]), out[: len(texts)])
    calls.clear()
    encoder(texts[:10])
    assert calls == []  # all cached


def test_loading_prints_nothing_and_restores_the_progress_bar_setting(capfd):
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    TextEncoder()
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
    assert hf_logging.is_progress_bar_enabled() == before


def test_a_lazy_encoder_loads_on_first_use_as_it_was_moved(encoder):
    """Nothing is loaded until a text is encoded; conversions made before then (dtype, eval) reach
    the transformer when it loads, so the lazy encoder gives what an eager one moved alike gives."""
    lazy = TextEncoder(lazy=True)
    identity = lazy.identity()
    lazy.to(torch.float64).eval()
    assert lazy.dim == encoder.dim == 384 and not lazy.loaded
    eager = TextEncoder().to(torch.float64).eval()
    texts = ["a dog barks", "glass breaks on a stone floor"]
    with torch.no_grad():
        got = lazy.encode(texts)
    assert lazy.loaded and not lazy.model.training
    assert {p.dtype for p in lazy.model.parameters()} == {torch.float64}
    assert not any(p.requires_grad for p in lazy.model.parameters())
    with torch.no_grad():
        assert torch.equal(got, eager.encode(texts))
    assert lazy.identity() == identity  # what keys a prompt cache does not change with loading
    assert lazy.window == 256 and lazy.max_length == 256


def test_a_trainable_encoder_is_never_lazy():
    tuned = TextEncoder(trainable=True, lazy=True)
    assert tuned.loaded and all(p.requires_grad for p in tuned.model.parameters())


def test_threads_reaching_a_lazy_encoder_at_once_all_get_the_embedding():
    """A served model's first requests arrive together: every thread must get the embedding, not
    a half-imported `transformers`. A fresh interpreter, so that the first import races too."""
    script = """
import sys, threading
sys.setswitchinterval(1e-6)  # threads switch often: a race shows every time
import torch
from flam_core.model.text_encoder import TextEncoder
lazy = TextEncoder(lazy=True)
barrier, results, errors = threading.Barrier(12), {}, []
def first_use(i):
    barrier.wait()
    try:
        with torch.no_grad():
            results[i] = lazy(["a dog barks"])
    except Exception as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=first_use, args=(i,)) for i in range(12)]
for t in threads: t.start()
for t in threads: t.join()
assert not errors, errors[0]
assert all(torch.equal(results[0], r) for r in results.values()) and len(results) == 12
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_the_packaged_encoder_is_read_without_transformers_and_gives_its_output(encoder):
    """A frozen MiniLM is tokenized by `tokenizers` and run by `flam_core.model.bert`: the same
    token ids and the same hidden states as `transformers`' tokenizer and BertModel, cut and
    padded texts included."""
    from transformers import AutoModel, AutoTokenizer

    assert isinstance(encoder.model, bert.Bert) and isinstance(encoder.tokenizer, bert.Tokenizer)
    texts = ["dog barking", "a siren wails while rain falls", "x", LONG_A, "Ça va, naïve café 日本"]
    theirs_tokenizer = AutoTokenizer.from_pretrained(encoder.source)
    theirs = AutoModel.from_pretrained(encoder.source).eval()
    for length in (8, 256):
        ours_tokens = encoder.tokenizer(
            texts, padding=True, truncation=True, max_length=length, return_tensors="pt"
        )
        their_tokens = theirs_tokenizer(
            texts, padding=True, truncation=True, max_length=length, return_tensors="pt"
        )
        assert set(ours_tokens) == set(their_tokens)
        assert all(torch.equal(ours_tokens[k], their_tokens[k]) for k in their_tokens)
        with torch.no_grad():
            ours = encoder.model(**ours_tokens).last_hidden_state
            expected = theirs(**their_tokens).last_hidden_state
        real = their_tokens["attention_mask"].bool()
        torch.testing.assert_close(ours[real], expected[real], atol=1e-5, rtol=1e-5)
    assert (
        encoder.tokenizer(texts[:2], truncation=True, max_length=5)["input_ids"]
        == theirs_tokenizer(texts[:2], truncation=True, max_length=5)["input_ids"]
    )


def test_a_fine_tuned_encoder_is_a_transformers_model():
    from transformers import PreTrainedModel

    assert isinstance(TextEncoder(trainable=True).model, PreTrainedModel)
