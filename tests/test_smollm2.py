"""The real SmolLM2-135M-Instruct GGUF: tokenizer, logits and greedy output against transformers on the same file."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from anllm_jax import checkpoints

os.environ["HF_HUB_OFFLINE"] = "1"

TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after "
    "the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. Locally nicknamed "
    '"La dame de fer" (French for "Iron Lady"), it was constructed as the centrepiece of the 1889 World\'s Fair.'
)


T = 64  # every forward in this module has this length, so it compiles once


@nnx.jit
def forward(model, tokens_BT):
    return model(tokens_BT)


@pytest.fixture(scope="module")
def ours():
    return checkpoints.load(checkpoints.smollm2_gguf_path(), dtype="float32")


@pytest.fixture(scope="module")
def reference():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = checkpoints.smollm2_gguf_path()
    directory, name = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    return model, tok


def test_config_from_metadata(ours):
    model, tok = ours
    c = model.cfg
    assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim) == (30, 576, 9, 3, 64, 1536)
    assert (c.vocab_size, c.rope_theta, c.tie_embeddings) == (49152, 100000.0, True)
    assert tok.kind == "bpe" and tok.vocab_size == 49152
    assert tok.anchor_ids("ep") == (tok.token_to_id("."),)


def test_tokenizer_matches_transformers(ours, reference):
    _, tok = ours
    _, hf_tok = reference
    for text in (TEXT, "Hello,  world!\n\nTwo spaces\tand a tab; 3.14 and 2024.", "<|im_start|>user\nHi<|im_end|>"):
        ids = tok.encode(text)
        assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text


def test_logits_match_transformers(ours, reference):
    import torch

    model, tok = ours
    hf_model, _ = reference
    ids = tok.encode(TEXT)[:T]
    assert len(ids) == T
    got = np.asarray(forward(model, jnp.asarray([ids])))
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits.float().numpy()
    diff = np.abs(got - ref).max()
    print(f"SmolLM2 GGUF float32 logits, 64 tokens: max abs diff vs transformers {diff:.2e}")
    assert diff <= 1e-3


def test_greedy_capital_of_france(ours):
    model, tok = ours
    ids = tok.encode("The capital of France is")
    n = len(ids)
    for _ in range(3):
        # Causal: the filler after the last real token does not change the logits at that token.
        padded = ids + [tok.eos_id] * (T - len(ids))
        logits = forward(model, jnp.asarray([padded]))
        ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
    continuation = tok.decode(ids[n:])
    assert continuation.startswith(" Paris"), continuation
