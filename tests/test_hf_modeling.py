"""HF exports of AnSAN models carry modeling_anllm.py: transformers (trust_remote_code) then runs the AnSAN mask and
keeps only the anchors in its KV cache, computing what `anllm_jax.generate --cache anchor` computes."""

from __future__ import annotations

import importlib.util
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from anllm_jax import checkpoints, convert, formats, generate, kvcache
from anllm_jax.config import preset
from anllm_jax.model import init_model
from anllm_jax.tokenizer import Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ANCHORS = (5, 17, 33, 40)  # 1 token in 16 is an anchor: prompts and greedy continuations both hold some
NEW = 12


def _hf(path: str, **kw):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()


@pytest.fixture(scope="module")
def ep(tmp_path_factory):
    model = init_model(preset("tiny", vocab_size=64, anchor_mode="ep", anchor_ids=ANCHORS, max_seq_len=256), seed=0)
    path = str(tmp_path_factory.mktemp("hf") / "ep")
    formats.export_hf(model, None, path)
    return model, path


def test_greedy_generation_equals_the_anchor_cache(ep):
    """10 prompts of 5-39 tokens, one left-padded batch through transformers' generate: the same greedy tokens as
    anllm_jax's anchor cache, every step's logits within 1e-4 of one AnSAN forward over the row, and a cache that
    holds exactly the entries anllm_jax keeps (the anchors and the tokens after the last), with their bytes."""
    model, path = ep
    hf = _hf(path, trust_remote_code=True)
    assert type(hf).__name__ == "AnLLMForCausalLM"
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 64, size=n).tolist() for n in rng.integers(5, 40, size=10)]
    ours = generate.generate(model, prompts, policy="anchor", max_new_tokens=NEW)
    width = max(map(len, prompts))
    ids, pad = torch.zeros(10, width, dtype=torch.long), torch.zeros(10, width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :], pad[b, width - len(p) :] = torch.tensor(p), 1
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids,
            attention_mask=pad,
            max_new_tokens=NEW,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    cache = out.cache if "cache" in out else out.past_key_values
    kept = cache.valid.sum(1).tolist()
    rows = [p + t for p, t in zip(prompts, ours.tokens, strict=True)]
    tokens, segments = np.zeros((10, width + NEW), np.int32), np.zeros((10, width + NEW), np.int32)
    for b, row in enumerate(rows):  # every row in one AnSAN forward, right-padded (segment 0 is padding)
        tokens[b, : len(row)], segments[b, : len(row)] = row, 1
    masked = np.asarray(model(jnp.asarray(tokens), segment_ids_BT=jnp.asarray(segments), mask="anchor"))
    decoded_anchors = 0
    for b, (p, row) in enumerate(zip(prompts, rows, strict=True)):
        assert out.sequences[b, width:].tolist() == ours.tokens[b]
        for t in range(NEW):
            np.testing.assert_allclose(out.logits[t][b].numpy(), masked[b, len(p) - 1 + t], atol=1e-4, rtol=0)
        # The last token is never fed back, so the cache holds the row but that one.
        assert kept[b] == kvcache.kept_after(np.asarray(row[:-1]), ANCHORS, "anchor") == int(ours.cache.length[b])
        decoded_anchors += any(t in ANCHORS for t in ours.tokens[b][:-1])
    assert decoded_anchors >= 3  # the cache also dropped entries while decoding, not only after the prompt
    stats = cache.stats()
    assert stats["cache_entries"] == sum(kept) < stats["full_cache_entries"] == sum(map(len, prompts)) + 10 * (NEW - 1)
    assert stats["cache_bytes"] == sum(kept) * kvcache.bytes_per_entry(model.cfg)


@pytest.mark.parametrize("search", [{"num_beams": 3}, {"do_sample": True, "top_k": 5}])
def test_beam_search_and_sampling_equal_the_uncached_search(ep, search):
    """Beam search reorders the anchor cache's rows, sampling feeds it sampled anchors: both give the sequences of
    the same search recomputing every step without a cache (one masked forward over the row)."""
    hf = _hf(ep[1], trust_remote_code=True)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 64, size=n).tolist() for n in (7, 23, 31, 12)]
    ids, pad = torch.zeros(4, 31, dtype=torch.long), torch.zeros(4, 31, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, 31 - len(p) :], pad[b, 31 - len(p) :] = torch.tensor(p), 1
    runs = []
    with torch.no_grad():
        for use_cache in (True, False):
            torch.manual_seed(0)
            kw = {"max_new_tokens": 10, "pad_token_id": 0, "use_cache": use_cache, **search}
            runs.append(hf.generate(input_ids=ids, attention_mask=pad, **kw))
    assert torch.equal(runs[0], runs[1])


def test_training_forward_is_the_masked_forward(ep):
    """Without a cache (training, scoring) the logits and the next-token loss are those of the AnSAN forward."""
    model, path = ep
    hf = _hf(path, trust_remote_code=True)
    row = np.random.default_rng(1).integers(0, 64, size=(1, 48))
    with torch.no_grad():
        got = hf(torch.tensor(row), labels=torch.tensor(row), use_cache=False)
    want = np.asarray(model(jnp.asarray(row), mask="anchor"), np.float64)[0]
    np.testing.assert_allclose(got.logits[0].numpy(), want, atol=1e-4, rtol=0)
    top = want.max(-1, keepdims=True)
    logp = want - top - np.log(np.exp(want - top).sum(-1, keepdims=True))
    loss = -np.mean([logp[t, row[0, t + 1]] for t in range(47)])
    assert abs(float(got.loss) - loss) < 1e-5


def test_convert_writes_modeling_for_ac_and_a_plain_llama_on_request(tmp_path):
    """`convert --to hf --anchor-mode ac` writes modeling_anllm.py and auto_map (<AC> the anchor); the export loads
    as AnSAN with trust_remote_code, as a plain Llama without it, and --plain-llama leaves the code out."""
    sp = os.path.join(os.path.dirname(importlib.util.find_spec("mistral_common").origin), "data", "tokenizer.model.v1")
    tok = Tokenizer.from_sentencepiece(sp)
    cfg = preset("tiny", vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id)
    formats.export_hf(init_model(cfg, seed=2), tok, str(tmp_path / "base"))
    assert not (tmp_path / "base" / formats.HF_MODELING).exists()  # a full-attention model stays plain
    for name, extra in (("ac", []), ("plain", ["--plain-llama"])):
        argv = ["--input", str(tmp_path / "base"), "--output", str(tmp_path / name), "--to", "hf"]
        convert.main([*argv, "--anchor-mode", "ac", *extra])
    assert "auto_map" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    assert not (tmp_path / "plain" / formats.HF_MODELING).exists()
    model, tok = checkpoints.load(str(tmp_path / "ac"), dtype="float32")
    ac = tok.token_to_id("<AC>")
    assert model.cfg.anchor_ids == (ac,)
    row = np.asarray([tok.encode("The river rose.<AC> It rained all week.<AC> The town stayed dry")])
    with torch.no_grad():
        anchored = _hf(str(tmp_path / "ac"), trust_remote_code=True)(torch.tensor(row)).logits[0].numpy()
        plain = _hf(str(tmp_path / "ac"))
        causal = plain(torch.tensor(row)).logits[0].numpy()
    assert isinstance(plain, LlamaForCausalLM) and type(plain).__name__ == "LlamaForCausalLM"
    np.testing.assert_allclose(anchored, np.asarray(model(jnp.asarray(row), mask="anchor"))[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(causal, np.asarray(model(jnp.asarray(row), mask="full"))[0], atol=1e-4, rtol=0)
    assert np.abs(anchored - causal).max() > 1e-3  # the mask changes the function


def test_plain_llama_flag_needs_hf_output(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        convert.main(["--input", "smollm2", "--output", str(tmp_path / "x"), "--to", "native", "--plain-llama"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "anllm_jax.convert: error: --plain-llama applies to --to hf only; drop it for --to native"
    )
