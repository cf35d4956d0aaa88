"""Tokenizer: sentencepiece and byte-level BPE behind one interface, anchors, added tokens, save/load."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from anllm_jax.tokenizer import Tokenizer

TEXTS = [
    "Hello world. The cat sat on the mat.",
    "  Leading spaces, digits 3.14159 and 2024; ünïcödé and 漢字!",
    "line one\nline two\ttabbed",
]


@pytest.fixture(scope="module")
def sp_path() -> str:
    package = os.path.dirname(importlib.util.find_spec("mistral_common").origin)
    return os.path.join(package, "data", "tokenizer.model.v1")


@pytest.fixture(scope="module")
def bpe() -> tokenizers.Tokenizer:
    """A small byte-level BPE trained on the fly (GPT-2 style: ByteLevel split, no prefix space)."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["The quick brown fox jumps over the lazy dog. " * 3, "Sentences end with a full stop. Then more."] * 20
    tok.train_from_iterator(corpus, trainer)
    return tok


def test_sentencepiece_matches_library(sp_path):
    sp = spm.SentencePieceProcessor(model_file=sp_path)
    tok = Tokenizer.from_sentencepiece(sp_path)
    assert tok.kind == "sentencepiece" and tok.vocab_size == sp.get_piece_size()
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (sp.bos_id(), sp.eos_id(), None)
    for text in TEXTS:
        assert tok.encode(text) == sp.encode(text)
        assert tok.encode(text, add_bos=True) == [sp.bos_id(), *sp.encode(text)]
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))
    assert tok.id_to_token(tok.token_to_id("▁the")) == "▁the"


def test_sentencepiece_anchor_ids(sp_path):
    sp = spm.SentencePieceProcessor(model_file=sp_path)
    tok = Tokenizer.from_sentencepiece(sp_path)
    assert tok.anchor_ids("full") == ()
    # The paper's EP anchor is the "." piece without the word-start marker, which is what sentences end with.
    dot = sp.piece_to_id(".")
    assert tok.anchor_ids("ep") == (dot,) and dot != sp.piece_to_id("▁.")
    assert sp.encode("It ends here.")[-1] == dot
    assert tok.anchor_ids("ep", (".", "?", ".")) == (dot, sp.piece_to_id("?"))
    with pytest.raises(ValueError, match="anchor string 'full stop' is not a single token"):
        tok.anchor_ids("ep", ("full stop",))
    with pytest.raises(ValueError, match="needs the <AC> token.*set_anchor_mode"):
        tok.anchor_ids("ac")
    with pytest.raises(ValueError, match="anchor mode 'xx' is not one of"):
        tok.anchor_ids("xx")
    with pytest.raises(ValueError, match="'no-such-piece' is not in the vocabulary"):
        tok.token_to_id("no-such-piece")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.id_to_token(tok.vocab_size)


def test_sentencepiece_add_token_and_round_trip(sp_path, tmp_path):
    sp = spm.SentencePieceProcessor(model_file=sp_path)
    tok = Tokenizer.from_sentencepiece(sp_path)
    n = tok.vocab_size
    ac = tok.add_token("<AC>")
    assert ac == n and tok.vocab_size == n + 1 and tok.add_token("<AC>") == ac
    assert tok.anchor_ids("ac") == (ac,)
    ids = tok.encode("First one.<AC> Second one.<AC>")
    assert ids == sp.encode("First one.") + [ac] + sp.encode("Second one.") + [ac]
    assert tok.decode(ids) == "First one.<AC> Second one.<AC>"
    # Text that never spells <AC> encodes exactly as before.
    for text in TEXTS:
        assert tok.encode(text) == sp.encode(text)
    tok.save(str(tmp_path))
    back = Tokenizer.load(str(tmp_path))
    assert back.kind == "sentencepiece" and back.vocab_size == n + 1
    assert back.encode("a.<AC> b") == tok.encode("a.<AC> b")
    assert (back.bos_id, back.eos_id, back.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)


def test_bpe_interface(bpe, tmp_path):
    tok = Tokenizer(bpe=bpe, bos_id=bpe.token_to_id("<s>"), eos_id=bpe.token_to_id("</s>"))
    for text in TEXTS:
        assert tok.encode(text) == bpe.encode(text).ids
        assert tok.decode(tok.encode(text)) == text
    dot = bpe.token_to_id(".")
    assert tok.anchor_ids("ep") == (dot,)
    assert tok.encode("The dog.")[-1] == dot
    with pytest.raises(ValueError, match="anchor string 'lazy dog' is not a single token"):
        tok.anchor_ids("ep", ("lazy dog",))
    n = tok.vocab_size
    ac = tok.add_token("<AC>")
    assert ac == n and tok.vocab_size == n + 1
    ids = tok.encode("The fox.<AC>The dog.<AC>")
    assert ids == bpe.encode("The fox.").ids + [ac] + bpe.encode("The dog.").ids + [ac]
    assert tok.decode(ids) == "The fox.<AC>The dog.<AC>"
    tok.save(str(tmp_path))
    back = Tokenizer.load(str(tmp_path))
    assert back.kind == "bpe" and back.vocab_size == n + 1 and back.anchor_ids("ac") == (ac,)
    assert back.encode("The fox.<AC>") == tok.encode("The fox.<AC>")
    assert (back.bos_id, back.eos_id) == (tok.bos_id, tok.eos_id)


def test_bpe_from_gguf_metadata_matches_source(bpe):
    """The GGUF gpt2 vocabulary (tokens, merges, types) rebuilds the same byte-level BPE."""
    vocab = bpe.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(bpe.to_str())["model"]["merges"]
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": [" ".join(m) if isinstance(m, list) else m for m in merges],
        "tokenizer.ggml.token_type": [3 if t.startswith("<") and t.endswith(">") else 1 for t in tokens],
        "tokenizer.ggml.bos_token_id": vocab["<s>"],
        "tokenizer.ggml.eos_token_id": vocab["</s>"],
    }
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.vocab_size == len(tokens) and (tok.bos_id, tok.eos_id) == (vocab["<s>"], vocab["</s>"])
    for text in [*TEXTS, "<|endoftext|>The end.</s>"]:
        assert tok.encode(text) == bpe.encode(text).ids
    with pytest.raises(ValueError, match="GGUF tokenizer model 'rwkv' is not supported"):
        Tokenizer.from_gguf_metadata(meta | {"tokenizer.ggml.model": "rwkv"})


def test_load_hf_directory_reads_special_ids(bpe, tmp_path):
    bpe.save(str(tmp_path / "tokenizer.json"))
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": [2, 0], "pad_token_id": None}, f)
    tok = Tokenizer.load(str(tmp_path))
    assert (tok.kind, tok.bos_id, tok.eos_id, tok.pad_id) == ("bpe", 1, 2, None)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model in"):
        Tokenizer.load(str(tmp_path / "empty"))
