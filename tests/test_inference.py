"""Anchor-cache inference computes the same function as one forward under the AnSAN mask.

References: `Llama.__call__` (one masked forward over the whole row, no cache) and brute-force Python loops.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from anllm_jax import generate as gen_lib
from anllm_jax import kvcache, sampling
from anllm_jax.config import preset
from anllm_jax.model import init_model

AC_IDS = (7,)
# ep: several ordinary tokens are anchors (a random model generates them often, so decode compacts).
EP_IDS = tuple(range(0, 256, 5))
ATOL = 1e-4


@functools.cache
def tiny(mode: str):
    ids = {"ac": AC_IDS, "ep": EP_IDS, "full": ()}[mode]
    return init_model(preset("tiny", anchor_mode=mode, anchor_ids=ids, dtype="float32"), seed=1)


def rows_with_anchors(seed: int, lengths: tuple[int, ...], anchor: int, rate: float) -> list[list[int]]:
    """Random rows of non-anchor ids (8..255 minus EP anchors) with `anchor` sprinkled in."""
    rng = np.random.default_rng(seed)
    plain = np.array([t for t in range(8, 256) if t not in EP_IDS])
    rows = []
    for n in lengths:
        r = rng.choice(plain, n)
        r[rng.random(n) < rate] = anchor
        rows.append(r.tolist())
    return rows


REF_WIDTH = 48


@functools.partial(jax.jit, static_argnums=(0,))
def _masked_forward(graphdef, state, tokens_BT, segment_ids_BT):
    return nnx.merge(graphdef, state)(tokens_BT, segment_ids_BT=segment_ids_BT)


def reference_logits(model, row: list[int]) -> np.ndarray:
    """Logits [len(row), V] of one forward over the row under the model's own mask (padded to a fixed width: one
    compilation)."""
    tokens = np.zeros((1, REF_WIDTH), np.int32)
    tokens[0, : len(row)] = row
    segment_ids = (np.arange(REF_WIDTH) < len(row)).astype(np.int32)[None]
    logits = _masked_forward(*nnx.split(model), jnp.asarray(tokens), jnp.asarray(segment_ids))
    return np.asarray(logits[0, : len(row)])


def kept_positions(row: list[int], anchor_ids: tuple[int, ...]) -> list[int]:
    """Brute force: the anchors plus every token after the last anchor."""
    last = max((i for i, t in enumerate(row) if t in anchor_ids), default=-1)
    return [i for i, t in enumerate(row) if t in anchor_ids or i > last]


# Row lengths differ; row 2 has no anchor (rate 0 on its own), rows hold adjacent anchors and a leading anchor.
def prompt_rows(anchor: int) -> list[list[int]]:
    rows = rows_with_anchors(0, (19, 11, 6), anchor, 0.25)
    rows[0][0] = rows[0][5] = rows[0][6] = anchor
    rows[2] = [t for t in rows[2] if t != anchor] or [9]
    return rows


@pytest.mark.parametrize(("mode", "chunk"), [("ac", None), ("ac", 4), ("ep", 3)])
def test_chunked_cache_forward_equals_masked_forward(mode, chunk):
    """Every position's logits through the anchor cache, in chunks, equal the one masked forward."""
    model = tiny(mode)
    anchor = AC_IDS[0] if mode == "ac" else EP_IDS[3]
    rows = prompt_rows(anchor)
    tokens_BT, lengths_B = gen_lib._as_batch(rows, None, "right")
    T = tokens_BT.shape[1]
    chunk = chunk or T
    cap = gen_lib.prefill_capacity(
        np.pad(tokens_BT, ((0, 0), (0, -T % chunk))), lengths_B, model.cfg.anchor_ids, "anchor", chunk
    )
    cache = kvcache.init(model.cfg, len(rows), cap, "anchor", model.cfg.anchor_ids)
    got = np.zeros((len(rows), T, model.cfg.vocab_size), np.float32)
    for start in range(0, T, chunk):
        part = np.pad(tokens_BT[:, start : start + chunk], ((0, 0), (0, max(0, start + chunk - T))))
        logits, cache = gen_lib.extend(model, cache, part, np.clip(lengths_B - start, 0, chunk))
        got[:, start : start + chunk] = np.asarray(logits)[:, : min(chunk, T - start)]
    for b, row in enumerate(rows):
        np.testing.assert_allclose(got[b, : len(row)], reference_logits(model, row), atol=ATOL, rtol=0)
    assert int(np.sum(np.asarray(cache.length))) < sum(map(len, rows))  # something was dropped


@pytest.mark.parametrize(
    ("mode", "policy", "chunk"), [("ac", "anchor", None), ("ep", "anchor", 5), ("full", "full", 4)]
)
def test_prefill_then_decode_equals_masked_forward(mode, policy, chunk):
    """Prefill plus token-by-token decode (anchors among the fed tokens) equals one forward over the row.

    mode "full" with the full cache is the plain causal forward.
    """
    model = tiny(mode)
    anchor = AC_IDS[0] if mode != "ep" else EP_IDS[2]
    rows = prompt_rows(anchor)
    follow = rows_with_anchors(1, (6, 6, 6), anchor, 0.4)
    cache, last = gen_lib.prefill(model, rows, policy=policy, chunk_size=chunk, reserve=len(follow[0]))
    refs = [reference_logits(model, r + f) for r, f in zip(rows, follow, strict=True)]
    last = np.asarray(last)
    for b, row in enumerate(rows):
        np.testing.assert_allclose(last[b], refs[b][len(row) - 1], atol=ATOL, rtol=0)
    for t in range(len(follow[0])):
        logits, cache = gen_lib.extend(model, cache, np.array([[f[t]] for f in follow]))
        logits = np.asarray(logits)
        for b, row in enumerate(rows):
            np.testing.assert_allclose(logits[b, 0], refs[b][len(row) + t], atol=ATOL, rtol=0)
    full = [len(r) + len(f) for r, f in zip(rows, follow, strict=True)]
    np.testing.assert_array_equal(np.asarray(cache.next_pos), full)
    if policy == "full":
        np.testing.assert_array_equal(np.asarray(cache.length), full)


def layer0_keys(model, row: list[int], positions: list[int]) -> np.ndarray:
    """Float64 numpy keys [T, K, H] of layer 0 for row[positions], rotated at those absolute positions."""
    cfg = model.cfg
    x = np.asarray(model.embed[...], np.float64)[np.asarray(row)[positions]]
    h = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + cfg.rms_eps) * np.asarray(model.blocks.attn_norm[0])
    k = np.einsum("td,dkh->tkh", h, np.asarray(model.blocks.wk[0], np.float64))
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
    ang = np.asarray(positions, np.float64)[:, None] * inv
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    k1, k2 = np.split(k, 2, axis=-1)
    return np.concatenate([k1 * cos - k2 * sin, k2 * cos + k1 * sin], axis=-1)


def test_cache_holds_exactly_anchors_and_open_sentence():
    """After a chunked prompt, each row's slots hold its anchors plus its open-sentence tokens, in order, with
    their true absolute positions, anchor counts, and the keys of those tokens at those positions."""
    model = tiny("ac")
    rows = prompt_rows(AC_IDS[0])
    cache, _ = gen_lib.prefill(model, rows, policy="anchor", chunk_size=4)
    c = jax.device_get(cache)
    for b, row in enumerate(rows):
        want = kept_positions(row, AC_IDS)
        n = int(c.length[b])
        assert n == len(want)
        np.testing.assert_array_equal(c.info.order[b, :n], want)
        assert not c.info.valid[b, n:].any()
        np.testing.assert_array_equal(c.info.anchor[b, :n], [row[i] in AC_IDS for i in want])
        np.testing.assert_array_equal(c.info.seg[b, :n], [sum(t in AC_IDS for t in row[:i]) for i in want])
        assert c.n_anchors[b] == sum(t in AC_IDS for t in row)
        assert c.next_pos[b] == len(row)
        np.testing.assert_allclose(c.k[0, b, :n], layer0_keys(model, row, want), atol=1e-5, rtol=0)


def test_left_padding_equals_right_padding():
    model = tiny("ac")
    rows = prompt_rows(AC_IDS[0])
    T = max(map(len, rows))
    left = np.array([[0] * (T - len(r)) + r for r in rows])
    _, last_right = gen_lib.prefill(model, rows, policy="anchor")
    _, last_left = gen_lib.prefill(model, left, [len(r) for r in rows], policy="anchor", padding_side="left")
    np.testing.assert_allclose(np.asarray(last_left), np.asarray(last_right), atol=ATOL, rtol=0)


def greedy_by_recompute(model, row: list[int], n: int, mode: str) -> tuple[list[int], list[float]]:
    """Reference: re-run the masked forward over the whole sequence for every new token."""
    row, out, lps = list(row), [], []
    for _ in range(n):
        logits = jnp.asarray(reference_logits(model, row)[-1])
        tok = int(jnp.argmax(logits))
        lps.append(float(jax.nn.log_softmax(logits)[tok]))
        out.append(tok)
        row.append(tok)
    return out, lps


def test_greedy_generation_equals_recompute_reference():
    """Greedy decoding through the anchor cache (compacting when an anchor is generated) equals greedy
    decoding by the masked forward without cache; the `none` (recompute) policy agrees."""
    model = tiny("ep")
    rows = prompt_rows(EP_IDS[1])
    n = 10
    gen = gen_lib.generate(model, rows, policy="anchor", max_new_tokens=n)
    generated_anchors = 0
    for b, row in enumerate(rows):
        want, want_lp = greedy_by_recompute(model, row, n, "ep")
        assert gen.tokens[b] == want
        np.testing.assert_allclose(gen.logprobs[b], want_lp, atol=ATOL)
        generated_anchors += sum(t in EP_IDS for t in want[:-1])
        # The final cache holds the kept entries of everything fed (the last token is never fed).
        assert int(jax.device_get(gen.cache.length)[b]) == len(kept_positions(row + want[:-1], EP_IDS))
    assert generated_anchors > 0, "the test needs decode steps that generate anchors"
    assert gen.finish_reason == ["length"] * len(rows)
    assert gen_lib.generate(model, rows, policy="none", max_new_tokens=n).tokens == gen.tokens


def test_score_continuations_equals_masked_forward():
    """Prefix caching: log-probs of continuations after a cached prefix equal those of one forward over
    prefix + continuation."""
    model = tiny("ac")
    prefix = rows_with_anchors(3, (17,), AC_IDS[0], 0.3)[0]
    conts = rows_with_anchors(4, (5, 1, 9), AC_IDS[0], 0.3)
    cache, last = gen_lib.prefill(model, [prefix], policy="anchor")
    assert int(jax.device_get(cache.length)[0]) == len(kept_positions(prefix, AC_IDS)) < len(prefix)
    logprobs, greedy = gen_lib.score_continuations(model, cache, last, conts, batch_size=2)
    for c, lp, g in zip(conts, logprobs, greedy, strict=True):
        seq = prefix + c
        ref = jax.nn.log_softmax(jnp.asarray(reference_logits(model, seq)), axis=-1)
        pred = ref[len(prefix) - 1 : len(seq) - 1]
        np.testing.assert_allclose(lp, np.asarray(pred[np.arange(len(c)), c]), atol=ATOL, rtol=0)
        np.testing.assert_array_equal(g, np.asarray(jnp.argmax(pred, axis=-1)) == np.array(c))
    # The prefix cache is reusable: a second call gives the same numbers.
    again, _ = gen_lib.score_continuations(model, cache, last, conts[:1])
    np.testing.assert_array_equal(again[0], logprobs[0])


def test_capacity_overflow_is_an_error():
    model = tiny("ac")
    rows = prompt_rows(AC_IDS[0])
    with pytest.raises(ValueError, match="capacity=8 KV slots per row is too small"):
        gen_lib.prefill(model, rows, policy="full", capacity=8)
    cache, _ = gen_lib.prefill(model, rows, policy="full")
    with pytest.raises(ValueError, match="cache overflow"):
        gen_lib.extend(model, cache, np.zeros((3, cache.capacity), np.int32))
    cap = 32  # row 0 holds 19 prompt entries: 12 free slots (one is kept free) for 20 new tokens
    with pytest.raises(ValueError, match="KV cache overflow in rows"):
        gen_lib.generate(model, rows, policy="full", max_new_tokens=20, capacity=cap)
    stopped = gen_lib.generate(model, rows, policy="full", max_new_tokens=20, capacity=cap, on_overflow="stop")
    assert stopped.finish_reason == ["cache_full", "length", "length"]
    assert len(stopped.tokens[0]) == cap - 1 - len(rows[0]) + 1
    for b, row in enumerate(rows):
        assert stopped.tokens[b] == greedy_by_recompute(model, row, len(stopped.tokens[b]), "ac")[0]


def test_decode_loop_updates_the_cache_in_place():
    """The donated cache is written slot by slot: the compiled loop holds no second cache (XLA's own memory
    analysis; before the cache rode in the scan carry, every step copied it and temporaries exceeded it)."""
    model = init_model(preset("tiny", anchor_mode="full", n_layers=8, dtype="float32", max_seq_len=8192))
    graphdef, state = nnx.split(model)
    cache, last_BV = gen_lib.prefill(model, [list(range(1, 200))], policy="full", capacity=4096)
    cache_bytes = cache.k.nbytes + cache.v.nbytes
    compiled = gen_lib._decode_cached_jit.lower(
        graphdef, state, cache, last_BV, jax.random.key(0), sampling.settings(8)
    ).compile()
    memory = compiled.memory_analysis()
    assert memory.alias_size_in_bytes >= cache_bytes
    assert memory.temp_size_in_bytes < 0.5 * cache_bytes


def test_positions_past_the_trained_context_warn():
    model = tiny("ac")  # max_seq_len 512
    row = rows_with_anchors(7, (500,), AC_IDS[0], 0.1)
    with pytest.warns(UserWarning, match="the prompts plus max_new_tokens reach position 520, past the model's"):
        gen_lib.generate(model, row, policy="anchor", max_new_tokens=20)
    with pytest.warns(UserWarning, match="the prompts reach position 530"):
        gen_lib.prefill(model, rows_with_anchors(7, (530,), AC_IDS[0], 0.1), policy="anchor")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gen_lib.generate(model, row, policy="anchor", max_new_tokens=12)


def test_sampling_options():
    model = tiny("ac")
    rows = prompt_rows(AC_IDS[0])
    greedy = gen_lib.generate(model, rows, max_new_tokens=6)
    assert gen_lib.generate(model, rows, max_new_tokens=6, temperature=1.0, top_k=1, seed=3).tokens == greedy.tokens
    assert gen_lib.generate(model, rows, max_new_tokens=6, temperature=1.0, top_p=1e-6, seed=3).tokens == greedy.tokens
    hot = dict(max_new_tokens=6, temperature=5.0, top_k=50, top_p=0.9)
    a = gen_lib.generate(model, rows, seed=1, **hot)
    assert gen_lib.generate(model, rows, seed=1, **hot).tokens == a.tokens
    assert gen_lib.generate(model, rows, seed=2, **hot).tokens != a.tokens
    stop = greedy.tokens[0][2]
    s = gen_lib.generate(model, rows, max_new_tokens=6, stop_ids=[stop])
    assert s.tokens[0] == greedy.tokens[0][: greedy.tokens[0].index(stop) + 1]
    assert s.finish_reason[0] == "stop"
    for b in (1, 2):
        want = greedy.tokens[b]
        assert s.tokens[b] == (want[: want.index(stop) + 1] if stop in want else want)


def test_truncate_keeps_the_brute_force_top_k_and_nucleus():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 40)).astype(np.float32)
    x[1, :5] = x[1, 5]  # ties at the cut are kept
    top_k = np.array([0, 3, 0, 7, 40, 1], np.int32)
    top_p = np.array([0.5, 1.0, 0.9, 0.3, 1e-9, 1.0], np.float32)
    got = np.asarray(sampling.truncate(jnp.asarray(x), jnp.asarray(top_k), jnp.asarray(top_p)))
    for b in range(len(x)):
        order = sorted(range(x.shape[1]), key=lambda v: -float(x[b, v]))
        k = top_k[b] if top_k[b] > 0 else x.shape[1]
        cand = order[:k]
        p = np.exp(np.float64(x[b, cand]) - x[b, cand].max())
        p /= p.sum()
        n, mass = 0, 0.0
        while n == 0 or mass < top_p[b] - 1e-6 and n < len(cand):
            mass += p[n]
            n += 1
        cut = x[b, cand[n - 1]]
        want = np.where(x[b] >= cut, x[b], -np.inf)
        np.testing.assert_array_equal(got[b], want, err_msg=f"row {b}")
    scalar = np.asarray(sampling.truncate(jnp.asarray(x), 3, 0.5))
    np.testing.assert_array_equal(scalar, np.asarray(sampling.truncate(jnp.asarray(x), top_k * 0 + 3, top_p * 0 + 0.5)))


PROMPT = "The cat sat on the mat. The dog ran home. Then a bird"


def _generate_cli(*args: str) -> list[dict]:
    cmd = [sys.executable, "-m", "anllm_jax.generate", "--checkpoint", "smollm2", "--anchor-mode", "ep"]
    cmd += ["--max-new-tokens", "4", "--dtype", "float32", "--json", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def test_cli_json_on_real_smollm2(tmp_path):
    """The CLI on the packaged SmolLM2-135M ('.' as anchors): the anchor cache keeps exactly the anchors and
    the open sentence, and generates what the no-cache policy generates; a prompt file batched with a longer
    prompt gives the same row."""
    (a,), (n,) = (
        _generate_cli("--prompt", PROMPT, "--cache", "anchor"),
        _generate_cli("--prompt", PROMPT, "--cache", "none"),
    )
    assert a["tokens"] == n["tokens"] and len(a["tokens"]) == 4
    np.testing.assert_allclose(a["logprobs"], n["logprobs"], atol=1e-3)
    assert isinstance(a["text"], str) and a["text"]
    fed = a["prompt_ids"] + a["tokens"][:-1]
    assert a["full_cache_entries"] == len(fed)
    assert a["cache_entries"] == len(kept_positions(fed, tuple(a["anchor_ids"]))) < len(fed)
    assert a["cache_bytes"] == a["cache_entries"] * 2 * 30 * 3 * 64 * 4  # layers, kv heads, head_dim, float32
    assert a["cache_bytes"] < a["full_cache_bytes"]
    prompts = tmp_path / "prompts.jsonl"
    longer = "Rain fell all night. The river rose. By morning the bridge was gone and the town"
    prompts.write_text(json.dumps({"prompt": PROMPT, "id": "a"}) + "\n\n" + json.dumps({"prompt": longer, "id": 2}))
    first, second = _generate_cli("--prompt-file", str(prompts), "--cache", "anchor", "--batch-size", "2")
    assert (first["id"], second["id"]) == ("a", 2) and second["prompt_tokens"] > first["prompt_tokens"]
    assert first["tokens"] == a["tokens"] and first["cache_entries"] == a["cache_entries"]
    np.testing.assert_allclose(first["logprobs"], a["logprobs"], atol=1e-4)
    fed = second["prompt_ids"] + second["tokens"][:-1]
    assert second["cache_entries"] == len(kept_positions(fed, tuple(second["anchor_ids"])))


def test_read_prompts_formats_and_errors(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("first prompt\n\n  second {not json}\n")
    assert gen_lib.read_prompts(str(text)) == [{"prompt": "first prompt"}, {"prompt": "  second {not json}"}]
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    with pytest.raises(ValueError, match='line 2 has no string "prompt" key'):
        gen_lib.read_prompts(str(bad))
    bad.write_text('{"prompt": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        gen_lib.read_prompts(str(bad))
    with pytest.raises(ValueError, match="does not exist"):
        gen_lib.read_prompts(str(tmp_path / "missing.txt"))


@pytest.fixture(scope="module")
def tiny_native(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny sentencepiece model saved natively, and a copy whose weights hold a NaN (written with orbax
    directly: checkpoints.save refuses such a model)."""
    import importlib.util

    import orbax.checkpoint as ocp

    from anllm_jax import checkpoints
    from anllm_jax.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("native")
    sp = Path(importlib.util.find_spec("mistral_common").origin).parent / "data" / "tokenizer.model.v1"
    tok = Tokenizer.from_sentencepiece(str(sp))
    model = init_model(preset("tiny", vocab_size=tok.vocab_size, dtype="float32"), seed=0)
    checkpoints.save(model, tok, str(root / "good"))
    shutil.copytree(root / "good", root / "nan", ignore=shutil.ignore_patterns("params"))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params["final_norm"] = params["final_norm"] * np.nan
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(str(root / "nan" / "params"), params)
    ckptr.wait_until_finished()
    ckptr.close()
    return root / "good", root / "nan"


def _gen_error(capsys, *args: str) -> str:
    assert gen_lib.main([*args, "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("anllm_jax.generate: error: ") and len(err.splitlines()) == 1, err
    return err


def test_generate_cli_bad_input_is_one_line(tiny_native, tmp_path, capsys):
    good, nan = tiny_native
    assert "--prompt is empty" in _gen_error(capsys, "--checkpoint", str(good), "--prompt", "")
    assert "not UTF-8 text" in _gen_error(capsys, "--checkpoint", str(good), "--prompt", "caf\udce9")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    assert f"prompt file {latin} is not UTF-8 text (byte 3)" in _gen_error(
        capsys, "--checkpoint", str(good), "--prompt-file", str(latin)
    )
    assert "non-finite (NaN/Inf) parameters" in _gen_error(capsys, "--checkpoint", str(nan), "--prompt", "Hi there")
    (good.parent / "broken").mkdir()
    (good.parent / "broken" / "config.json").write_text('{"vocab_size": 32')
    (good.parent / "broken" / "params").mkdir()
    msg = _gen_error(capsys, "--checkpoint", str(good.parent / "broken"), "--prompt", "Hi")
    assert "broken/config.json is not valid JSON" in msg and "truncated or corrupt" in msg
    assert gen_lib.main(["--checkpoint", str(good), "--prompt", "Hi there", "--max-new-tokens", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert len(out["tokens"]) == 2 and all(isinstance(x, float) for x in out["logprobs"])
