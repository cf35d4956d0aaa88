"""Attention policies: every mask against a brute-force loop of its written rule, every KV cache against one
forward under its mask (ragged batches, chunk sizes, left/right padding, decoding), eviction exactly when no later
query can attend an entry, the caches' bounds, and the switches of training, eval and generate."""

from __future__ import annotations

import functools
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from anllm_jax import generate as gen_lib
from anllm_jax import kvcache, masks
from anllm_jax.config import preset
from anllm_jax.masks import Policy
from anllm_jax.model import init_model

ANCHOR, SEP, BOTH, PAD = 7, 9, 11, 0
ANCHOR_IDS, SEP_IDS = (ANCHOR, BOTH), (SEP, BOTH)  # BOTH is an anchor and a separator, like "." under EP + SepLLM

POLICIES = [
    Policy("full"),
    Policy("ansan"),
    Policy("ansan-bounded", anchors=2),
    Policy("ansan-bounded", anchors=1, sinks=2, window=3),
    Policy("streaming", sinks=2, window=3),
    Policy("sepllm", sinks=1, window=2, separator_ids=SEP_IDS),
    Policy("sepllm", sinks=2, window=1, separators=2, separator_ids=SEP_IDS),
    Policy("window", window=4),
]
IDS = [str(p) for p in POLICIES]


# ------------------------------------------------------------------------------------------------------------
# The written rules, one (i, j) pair at a time


def brute_force_mask(policy: Policy, tokens, pad_id=None, segment_ids=None) -> np.ndarray:
    """docs/policies.md, rule by rule, over plain Python lists."""
    T = len(tokens)
    doc = list(segment_ids) if segment_ids is not None else [1] * T
    real = [(pad_id is None or t != pad_id) and d != 0 for t, d in zip(tokens, doc, strict=True)]
    is_a = [t in ANCHOR_IDS and r for t, r in zip(tokens, real, strict=True)]
    is_s = [t in policy.separator_ids and r for t, r in zip(tokens, real, strict=True)]
    seg = lambda t: sum(is_a[:t])
    pos = lambda t: sum(real[u] and doc[u] == doc[t] for u in range(t))  # real tokens of its document before it
    between = lambda flags, j, i: sum(flags[j + 1 : i])  # flags strictly between key j and query i
    p = policy

    def rule(i, j):
        near = p.window is None or pos(i) - pos(j) <= p.window
        sink = pos(j) < (p.sinks or 0)
        if p.name == "full":
            return True
        if p.name == "ansan":
            return seg(i) == seg(j) or (is_a[j] and not is_a[i])
        if p.name == "ansan-bounded":
            recent_anchor = is_a[j] and not is_a[i] and between(is_a, j, i) < p.anchors
            return sink or (seg(i) == seg(j) and near) or recent_anchor
        if p.name == "streaming":
            return sink or near
        if p.name == "sepllm":
            return sink or near or (is_s[j] and (p.separators is None or between(is_s, j, i) < p.separators))
        assert p.name == "window"
        return near

    out = np.zeros((T, T), bool)
    for i, j in itertools.product(range(T), range(T)):
        out[i, j] = j <= i and real[i] and real[j] and doc[i] == doc[j] and rule(i, j)
    return out


def random_tokens(rng, B: int, T: int) -> np.ndarray:
    toks = rng.integers(12, 40, size=(B, T))
    for token, rate in ((ANCHOR, 0.15), (SEP, 0.15), (BOTH, 0.05)):
        toks[rng.random((B, T)) < rate] = token
    return toks


@pytest.mark.parametrize("policy", POLICIES, ids=IDS)
def test_mask_equals_brute_force_of_its_rule(policy):
    """Random rows with anchors, separators, tokens that are both, padding and packed documents; the device
    (jax) and host (numpy) evaluations of the policy's mask both equal the written rule."""
    rng = np.random.default_rng(abs(hash(str(policy))) % 2**32)
    B, T = 4, 22
    toks = random_tokens(rng, B, T)
    toks[0, -3:] = PAD
    seg = np.ones((B, T), np.int32)
    seg[2, 9:] = 2
    seg[3, 5:14], seg[3, 14:], seg[3, -2:] = 2, 3, 0
    for pad_id, segment_ids in ((PAD, None), (None, seg)):
        args = (ANCHOR_IDS, pad_id, segment_ids, policy.separator_ids)
        dev = masks.token_info(jnp.asarray(toks), *args[:2], None if segment_ids is None else jnp.asarray(seg), args[3])
        host = masks.token_info(toks, *args)
        got_dev, got_host = np.asarray(policy.mask(dev, dev)), policy.mask(host, host)
        for b in range(B):
            want = brute_force_mask(policy, list(toks[b]), pad_id, None if segment_ids is None else list(seg[b]))
            np.testing.assert_array_equal(got_dev[b], want, err_msg=f"{policy} row {b}: {list(toks[b])}")
            np.testing.assert_array_equal(got_host[b], want, err_msg=f"{policy} host row {b}")


def test_ansan_is_the_existing_rule():
    rng = np.random.default_rng(0)
    toks = jnp.asarray(random_tokens(rng, 3, 20))
    info = masks.token_info(toks, jnp.asarray(ANCHOR_IDS))
    np.testing.assert_array_equal(masks.allowed(info, info), masks.ANSAN_POLICY.mask(info, info))
    assert masks.BASE & (masks.same_segment | masks.earlier_anchor) == masks.ANSAN


@pytest.mark.parametrize("policy", [p for p in POLICIES if p.evicts], ids=[str(p) for p in POLICIES if p.evicts])
def test_eviction_is_exact_against_every_continuation(policy):
    """An entry is kept exactly when some later query can attend it: brute force over every continuation of up
    to three tokens (plain, anchor, separator, both) with the written rule, against `masks.reachable` on the host."""
    rng = np.random.default_rng(7)
    kinds = (20, ANCHOR, SEP, BOTH)
    for stream in random_tokens(rng, 3, 12):
        stream = list(stream)
        P = len(stream)
        info = masks.token_info(np.asarray([stream]), ANCHOR_IDS, None, None, policy.separator_ids)
        last = lambda x: np.asarray([x[0, -1]])
        next_q = masks.next_queries(
            np.asarray([P]), last(info.seg) + last(info.anchor), last(info.nsep) + last(info.sep), True
        )
        got = masks.reachable(policy.mask, info, next_q)[0]
        want = np.zeros(P, bool)
        for n in (1, 2, 3):
            for cont in itertools.product(kinds, repeat=n):
                m = brute_force_mask(policy, stream + list(cont))
                want |= m[P:, :P].any(axis=0)
        np.testing.assert_array_equal(got, want, err_msg=f"{policy}: {stream}")
        assert kvcache.kept_after(np.asarray(stream), ANCHOR_IDS, policy) == want.sum()


def test_negated_shrinking_predicates_are_refused():
    with pytest.raises(ValueError, match="a cache cannot evict by it"):
        masks.check_reachable(masks.BASE & ~masks.window(4))
    for p in POLICIES:
        masks.check_reachable(p.mask)


# ------------------------------------------------------------------------------------------------------------
# Caches against one forward under the mask


@functools.cache
def tiny_model(attention: str = "xla"):
    cfg = preset("tiny", anchor_mode="ep", anchor_ids=ANCHOR_IDS, dtype="float32", attention=attention)
    return init_model(cfg, seed=3)


WIDTH = 48


@functools.partial(jax.jit, static_argnums=(0, 4))
def _forward(graphdef, state, tokens_BT, segment_ids_BT, policy):
    return nnx.merge(graphdef, state)(tokens_BT, segment_ids_BT=segment_ids_BT, mask=policy)


def reference_logits(model, row: list[int], policy: Policy) -> np.ndarray:
    tokens = np.zeros((1, WIDTH), np.int32)
    tokens[0, : len(row)] = row
    segment_ids = (np.arange(WIDTH) < len(row)).astype(np.int32)[None]
    return np.asarray(_forward(*nnx.split(model), jnp.asarray(tokens), jnp.asarray(segment_ids), policy)[0, : len(row)])


def kept_positions(row: list[int], policy: Policy) -> list[int]:
    """Brute force: positions the next token (an anchor or not) may attend under the written rule."""
    return [j for j in range(len(row)) if any(brute_force_mask(policy, row + [x])[len(row), j] for x in (20, ANCHOR))]


ROWS = [list(r) for r in random_tokens(np.random.default_rng(11), 3, 19)]
ROWS[1], ROWS[2] = ROWS[1][:11], ROWS[2][:6]


@pytest.mark.parametrize("policy", POLICIES[1:], ids=IDS[1:])
def test_prefill_chunks_then_decode_equal_the_masked_forward(policy):
    """Ragged rows prefilled in chunks of 5, then fed token by token (anchors and separators among them): every
    logit equals one forward over the whole row under the policy's mask; after every step each row holds exactly
    the entries the next token could attend, never more than the policy's bound."""
    model = tiny_model()
    follow = [list(r) for r in random_tokens(np.random.default_rng(12), 3, 6)]
    cache, last = gen_lib.prefill(model, ROWS, policy=policy, chunk_size=5, reserve=len(follow[0]))
    assert cache.evict and cache.rule == policy
    refs = [reference_logits(model, r + f, policy) for r, f in zip(ROWS, follow, strict=True)]
    for b, row in enumerate(ROWS):
        np.testing.assert_allclose(np.asarray(last)[b], refs[b][len(row) - 1], atol=1e-4, rtol=0)
    for t in range(len(follow[0]) + 1):
        c = jax.device_get(cache)
        for b, row in enumerate(ROWS):
            fed = row + follow[b][:t]
            n = int(c.length[b])
            np.testing.assert_array_equal(c.info.order[b, :n], kept_positions(fed, policy), err_msg=f"row {b}")
            assert policy.bound is None or n <= policy.bound
        if t == len(follow[0]):
            break
        logits, cache = gen_lib.extend(model, cache, np.array([[f[t]] for f in follow]))
        for b, row in enumerate(ROWS):
            np.testing.assert_allclose(np.asarray(logits)[b, 0], refs[b][len(row) + t], atol=1e-4, rtol=0)


@pytest.mark.parametrize("policy", [POLICIES[4], POLICIES[6]], ids=[IDS[4], IDS[6]])
def test_left_padding_and_one_chunk_equal_right_padding_in_chunks(policy):
    model = tiny_model()
    T = max(map(len, ROWS))
    left = np.array([[0] * (T - len(r)) + r for r in ROWS])
    _, right = gen_lib.prefill(model, ROWS, policy=policy, chunk_size=3)
    _, lefts = gen_lib.prefill(model, left, [len(r) for r in ROWS], policy=policy, padding_side="left")
    np.testing.assert_allclose(np.asarray(lefts), np.asarray(right), atol=1e-4, rtol=0)


def test_bounded_generation_equals_recompute_and_stays_within_its_bound():
    """Greedy decoding with a streaming cache far past its bound equals decoding by recomputing the masked forward
    (policy "none" under the same mask); the decode cache is allocated from the bound, not the length."""
    model = tiny_model()
    policy = Policy("streaming", sinks=2, window=5)
    gen = gen_lib.generate(model, ROWS, policy=policy, max_new_tokens=30)
    ref = gen_lib.generate(model, ROWS, policy="none", mask=policy, max_new_tokens=30)
    assert gen.tokens == ref.tokens
    np.testing.assert_allclose(sum(gen.logprobs, []), sum(ref.logprobs, []), atol=1e-4)
    assert int(np.max(jax.device_get(gen.cache.length))) <= policy.bound
    assert gen.cache.capacity == 64 < len(ROWS[0]) + 30 + 64


def test_full_cache_keeps_every_entry_under_any_mask():
    model = tiny_model()
    policy = POLICIES[4]
    cache, last = gen_lib.prefill(model, ROWS, policy="full", mask=policy, chunk_size=4)
    assert not cache.evict and cache.rule == policy
    np.testing.assert_array_equal(np.asarray(cache.length), [len(r) for r in ROWS])
    for b, row in enumerate(ROWS):
        np.testing.assert_allclose(np.asarray(last)[b], reference_logits(model, row, policy)[-1], atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------------------
# Switches: training config, attention paths, eval, generate; bad input


def test_model_policy_is_the_training_mask():
    """ModelConfig.policy (model.overrides.policy in a training config) is what the model's own mask means."""
    spec = "ansan-bounded:anchors=1,window=3"
    model = init_model(tiny_model().cfg.replace(policy=spec), seed=3)
    toks = jnp.asarray(random_tokens(np.random.default_rng(1), 2, 24))
    own = np.asarray(model(toks))
    np.testing.assert_array_equal(own, np.asarray(model(toks, mask=masks.parse_policy(spec))))
    assert np.abs(own - np.asarray(model(toks, mask="anchor"))).max() > 1e-4
    with pytest.raises(ValueError, match="policy 'nope' is not one of full, ansan"):
        init_model(tiny_model().cfg.replace(policy="nope"))


def test_sparse_attention_runs_ansan_shaped_policies_and_refuses_others():
    toks = jnp.asarray(random_tokens(np.random.default_rng(2), 2, 40))
    for policy in (POLICIES[2], masks.ANSAN_POLICY):
        np.testing.assert_allclose(
            np.asarray(tiny_model("anchor")(toks, mask=policy)), np.asarray(tiny_model()(toks, mask=policy)), atol=1e-4
        )
    with pytest.raises(ValueError, match="attention=anchor computes AnSAN-shaped masks only, not policy streaming"):
        tiny_model("anchor")(toks, mask=POLICIES[4])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "streaming:anchors=3",
            "policy spec 'streaming:anchors=3': 'anchors=3' is not KEY=VALUE with KEY one of sinks",
        ),
        ("window:window=-1", "window=-1 must be an integer >= 0"),
        ("window:window=x", "window='x' must be an integer"),
        ("lru", "policy 'lru' is not one of"),
    ],
)
def test_bad_policy_specs_are_one_line_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        masks.parse_policy(spec)


def test_policies_a_model_cannot_run():
    with pytest.raises(ValueError, match="needs separator ids"):
        gen_lib.prefill(tiny_model(), ROWS, policy="sepllm")
    full_model = init_model(preset("tiny", dtype="float32"))
    with pytest.raises(ValueError, match="the ansan-bounded mask needs anchor ids"):
        gen_lib.prefill(full_model, ROWS, policy=POLICIES[2])
    gen_lib.prefill(full_model, ROWS, policy=POLICIES[4])  # streaming reads no anchors
    with pytest.raises(ValueError, match="attends under its own mask"):
        gen_lib.prefill(tiny_model(), ROWS, policy=POLICIES[4], mask="full")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny model saved natively with a 32k sentencepiece tokenizer (no anchors of its own)."""
    import importlib.util
    from pathlib import Path

    from anllm_jax import checkpoints
    from anllm_jax.tokenizer import Tokenizer

    sp = Path(importlib.util.find_spec("mistral_common").origin).parent / "data" / "tokenizer.model.v1"
    tok = Tokenizer.from_sentencepiece(str(sp))
    path = tmp_path_factory.mktemp("policies") / "tiny"
    checkpoints.save(init_model(preset("tiny", vocab_size=tok.vocab_size, dtype="float32"), seed=0), tok, str(path))
    return str(path)


PROMPT = "The cat sat on the mat. The dog ran home, and then it slept. A bird sang; the sun rose. Then a fox"


def test_generate_cli_runs_every_policy(tiny_checkpoint, capsys):
    """Every cache policy from the command line, with its parameters; bounded caches stay within their bound."""
    runs = [
        ("full", [], None),
        ("none", [], None),
        ("anchor", [], None),
        ("ansan-bounded", ["--anchors-kept", "1", "--window", "4"], 5),
        ("streaming", ["--sinks", "2", "--window", "6"], 8),
        ("sepllm", ["--window", "4", "--separators-kept", "2", "--separators", ".", ",", ";"], 4 + 2 + 4),
        ("window", ["--window", "5"], 5),
    ]
    base = ["--checkpoint", tiny_checkpoint, "--prompt", PROMPT, "--anchor-mode", "ep", "--max-new-tokens", "3"]
    for cache, extra, bound in runs:
        assert gen_lib.main([*base, "--cache", cache, *extra, "--json"]) == 0, capsys.readouterr().err
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert out["cache"].split(":")[0] == cache and len(out["tokens"]) == 3
        fed = len(out["prompt_ids"]) + 2
        assert out["full_cache_entries"] == fed
        if cache == "full":
            assert out["cache_entries"] == fed
        if bound is not None:
            assert 0 < out["cache_entries"] <= bound < fed, (cache, out["cache_entries"])
    assert gen_lib.main([*base, "--cache", "anchor", "--window", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("anllm_jax.generate: error: --window applies to none of the chosen policies (ansan)")
    assert len(err.splitlines()) == 1


class ByteTokenizer:
    """UTF-8 bytes as token ids; id 256 is <AC>."""

    def encode(self, text, add_bos=False):
        return list(text.encode("utf-8"))

    def anchor_ids(self, mode, strings):
        assert mode == "ep" and all(len(s.encode()) == 1 for s in strings)
        return tuple(ord(s) for s in strings)


def test_eval_runs_policies_and_their_caches(tmp_path, monkeypatch, capsys):
    """The eval CLI's policy modes: the masked forward and the cache of each policy give the same scores, the
    results name the policies, and a flag no chosen policy takes is a one-line error."""
    from anllm_jax import eval as ev

    model = init_model(preset("tiny", vocab_size=257, anchor_mode="ep", anchor_ids=(ord("."),), max_seq_len=4096))
    monkeypatch.setattr(ev, "_load", lambda checkpoint, dtype: (model, ByteTokenizer()))
    out = tmp_path / "out"
    argv = ["--checkpoint", "tiny", "--tasks", "arc_easy", "--shots", "1", "--limit", "2", "--no-progress"]
    modes = "streaming,streaming-cache,sepllm,sepllm-cache,ansan-bounded-cache"
    flags = ["--sinks", "2", "--window", "24", "--anchors-kept", "1", "--separators", ".", ","]
    assert ev.main([*argv, "--mode", modes, *flags, "--output", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["policies"]["streaming-cache"] == "streaming:sinks=2,window=24"
    assert results["policies"]["sepllm"] == "sepllm:sinks=2,window=24,separator_ids=46+44"
    r = results["results"]["1"]["arc_easy"]["modes"]
    lls = json.loads((out / "loglikelihoods.json").read_text())["1"]["arc_easy"]
    for name in ("streaming", "sepllm"):
        np.testing.assert_allclose(lls[name], lls[f"{name}-cache"], atol=1e-3)
        assert r[name]["kv_kept"] == r[f"{name}-cache"]["kv_kept"] < r[name]["kv_full"]
        assert r[f"{name}-cache"]["prefix_entries_kept"] < r[f"{name}-cache"]["prefix_tokens"]
    capsys.readouterr()
    assert ev.main([*argv, "--mode", "full", "--window", "8", "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("anllm_jax.eval: error: --window applies to none") and len(err.splitlines()) == 1


def test_specs_round_trip_and_defaults():
    for p in POLICIES:
        assert masks.parse_policy(str(p)) == p and hash(masks.parse_policy(str(p))) == hash(p)
    assert masks.parse_policy("anchor") == masks.ANSAN_POLICY
    assert masks.parse_policy("streaming") == Policy("streaming", sinks=4, window=1020)
    assert masks.parse_policy("ansan-bounded:anchors=8,window=none").bound is None
    assert [p.bound for p in POLICIES] == [None, None, None, 6, 5, None, 5, 4]


def test_training_config_sets_the_policy(tmp_path):
    """model.overrides.policy in a training config is the mask of the model that trains (and of its export)."""
    from anllm_jax import config, train

    raw = {
        "run_name": "x",
        "output_dir": str(tmp_path),
        "dataset_type": "synthetic",
        "model": {"preset": "tiny", "overrides": {"policy": "streaming:sinks=4,window=8"}},
        "data": {"anchor_mode": "full", "seq_len": 32},
    }
    mcfg, _, _ = train.build_model(config.train_config_from_dict(raw))
    assert masks.parse_policy(mcfg.policy) == Policy("streaming", sinks=4, window=8)
    assert mcfg.from_dict(mcfg.to_dict()).policy == mcfg.policy
