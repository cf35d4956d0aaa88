"""Policy-masked inference with a KV cache: jitted prefill, one-loop decode, prefix scoring, sampling, and a CLI.

Every path computes the same function as one forward over the whole row under the cache's mask (AnSAN for the
"anchor" policy): new tokens carry their true absolute positions and anchor counts (`masks.TokenInfo`) and
attend to the cached entries under that mask; a policy only drops entries no later query can see (kvcache.py).

    cache, last_logits = prefill(model, prompts, policy="anchor")           # chunked, bucketed, jitted
    result = generate(model, prompts, policy="anchor", max_new_tokens=32)   # prefill + one lax.while_loop
    logprobs, greedy = score_continuations(model, cache, last_logits, continuations)

CLI: python -m anllm_jax.generate --checkpoint smollm2 --prompt "..." [--cache anchor|full|none|POLICY] [--json]
     python -m anllm_jax.generate --checkpoint DIR --prompt-file prompts.jsonl --batch-size 8   # JSON lines out
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from anllm_jax import cli_args, kvcache, masks, sampling
from anllm_jax.cli_args import read_prompts
from anllm_jax.config import ModelConfig
from anllm_jax.kvcache import KVCache
from anllm_jax.model import Llama, mask_policy, policy_anchor_ids

_MIN_BUCKET = 16
_CAPACITY_MULTIPLE = 64
# Prompts are prefilled in chunks of at most this many tokens, so that a prompt of any length that fits the cache
# needs the memory of one chunk's attention over the cache, not of its whole length squared.
DEFAULT_PREFILL_CHUNK = 512


@dataclasses.dataclass
class Generation:
    """Per-row results: generated token ids (a stop token included), their log-probs, why each row ended
    ("stop", "length" or "cache_full"), decoded text (with a tokenizer), the final cache, statistics."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    finish_reason: list[str]
    text: list[str] | None
    cache: KVCache | None
    stats: dict[str, float]


def bucket(n: int) -> int:
    """Padded length for n tokens: the next power of two, at least 16 (bounds the number of compilations)."""
    return max(_MIN_BUCKET, 1 << max(n - 1, 0).bit_length())


def _as_batch(
    tokens: Sequence[Sequence[int]] | np.ndarray, lengths: Sequence[int] | np.ndarray | None, padding_side: str
) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded int32 [B, T] tokens and [B] lengths from lists of ids or a padded array."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side={padding_side!r} must be 'right' or 'left'")
    if isinstance(tokens, np.ndarray | jax.Array):
        tokens_BT = np.asarray(tokens, np.int32)
        if tokens_BT.ndim != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tokens_BT.shape}")
        lengths_B = np.full((tokens_BT.shape[0],), tokens_BT.shape[1]) if lengths is None else np.asarray(lengths)
    else:
        rows = [list(r) for r in tokens]
        lengths_B = np.asarray([len(r) for r in rows])
        tokens_BT = np.zeros((len(rows), max(lengths_B, default=0)), np.int32)
        for b, r in enumerate(rows):
            tokens_BT[b, : len(r)] = r
        padding_side = "right"
    lengths_B = lengths_B.astype(np.int32)
    if tokens_BT.shape[0] == 0 or lengths_B.shape != (tokens_BT.shape[0],):
        raise ValueError(f"need one length per row: tokens {tokens_BT.shape}, lengths {lengths_B.shape}")
    if (lengths_B < 1).any() or (lengths_B > tokens_BT.shape[1]).any():
        raise ValueError(f"every row needs 1..{tokens_BT.shape[1]} tokens, got lengths {lengths_B.tolist()}")
    if padding_side == "left":
        tokens_BT = np.stack([np.roll(r, n - len(r)) for r, n in zip(tokens_BT, lengths_B, strict=True)])
    return tokens_BT, lengths_B


def _warn_past_context(model: Llama, positions: int, what: str) -> None:
    """Anchor caches keep true positions, so long streams may pass the context the model was trained on."""
    if positions > model.cfg.max_seq_len:
        warnings.warn(
            f"{what} reach position {positions}, past the model's max_seq_len={model.cfg.max_seq_len}; "
            "RoPE positions beyond it were never trained, so quality may drop",
            stacklevel=3,
        )


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _free_memory() -> int | None:
    """Bytes free on the device (its allocator's limit less what it holds), else the host's available memory."""
    stats = jax.local_devices()[0].memory_stats()
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def _check_memory(cfg: ModelConfig, batch: int, chunk: int, keys: int, cache_slots: int, fix: str) -> None:
    """Refuse, before any work, a prefill whose cache plus one chunk's float32 attention scores (and their
    softmax) over `keys` keys and its activations would not fit the free memory."""
    per_chunk = chunk * (2 * cfg.n_heads * keys + 4 * cfg.d_model + 3 * cfg.ffn_dim) * 4
    need = batch * (cache_slots * kvcache.bytes_per_entry(cfg) + per_chunk)
    free = _free_memory()
    if free is not None and need > free:
        raise ValueError(
            f"the prefill of {batch} prompt(s) needs about {need / 2**30:.2f} GiB (a cache of {cache_slots} entries "
            f"per row and the attention of {chunk}-token chunks over {keys} keys) but {free / 2**30:.2f} GiB are "
            f"free; {fix}"
        )


# ----------------------------------------------------------------------------------------------------------
# Jitted steps. The model travels as (graphdef, state) so that jit sees a static graph and array leaves.


def _extend(
    model: Llama, cache: KVCache, tokens_BT: jax.Array, n_new_B: jax.Array, logits_at_BK: jax.Array | None = None
) -> tuple[jax.Array, KVCache]:
    """Append each row's first n_new_B[b] tokens to its cache; logits float32 [B, T, V] of all T slots (or
    [B, K, V] at the slots `logits_at_BK`)."""
    q_info, k_info = kvcache.new_entries(cache, tokens_BT, n_new_B)
    logits_BTV, (k, v) = model.forward(
        tokens_BT, q_info.order, q_info, (cache.k, cache.v), k_info, cache.length, logits_at_BK, cache.rule
    )
    return logits_BTV, kvcache.advance(cache, k, v, k_info, q_info, n_new_B)


@functools.partial(jax.jit, static_argnums=(0, 5), donate_argnames=("cache",))
def _extend_jit(graphdef, state, cache, tokens_BT, n_new_B, output: str):
    last_B1 = jnp.maximum(n_new_B - 1, 0)[:, None] if output == "last" else None
    logits, cache = _extend(nnx.merge(graphdef, state), cache, tokens_BT, n_new_B, last_B1)
    return (logits[:, 0] if output == "last" else logits), cache


@functools.partial(jax.jit, static_argnums=(0,))
def _score_jit(graphdef, state, cache, tokens_BT, n_new_B, first_logits_BV):
    """Log-probs [B, T] of every token given everything before it, and whether it was the argmax."""
    logits_BTV, _ = _extend(nnx.merge(graphdef, state), cache, tokens_BT, n_new_B)
    pred_BTV = jnp.concatenate([first_logits_BV[:, None], logits_BTV[:, :-1]], axis=1)
    logp_BT = jnp.take_along_axis(jax.nn.log_softmax(pred_BTV, axis=-1), tokens_BT[..., None], axis=-1)[..., 0]
    greedy_BT = jnp.argmax(pred_BTV, axis=-1) == tokens_BT
    return logp_BT, greedy_BT


def _masked_last_logits(
    model: Llama, buf_BW: jax.Array, len_B: jax.Array, anchor_ids: tuple[int, ...], rule: masks.Policy
):
    """One forward over each row's first len_B[b] tokens under `rule`; logits of each row's last token [B, V]."""
    B, W = buf_BW.shape
    in_row_BW = (jnp.arange(W)[None, :] < len_B[:, None]).astype(jnp.int32)
    info = masks.token_info(buf_BW, jnp.asarray(anchor_ids, jnp.int32), None, in_row_BW, rule.separator_ids)
    positions_BW = jnp.broadcast_to(jnp.arange(W, dtype=jnp.int32), (B, W))
    logits_B1V, _ = model.forward(buf_BW, positions_BW, info, logits_at_BK=(len_B - 1)[:, None], policy=rule)
    return logits_B1V[:, 0]


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _recompute_prefill_jit(graphdef, state, buf_BW, len_B, anchor_ids, rule):
    return _masked_last_logits(nnx.merge(graphdef, state), buf_BW, len_B, anchor_ids, rule)


def _decode_loop(
    step: Callable, room: Callable, carry, last_logits_BV: jax.Array, key: jax.Array, s: sampling.Sampling
):
    """Sample max_new_tokens tokens per row in one while_loop.

    step(carry, tok_B, active_B) -> (logits_BV, carry) feeds each active row its latest token; room(carry)
    -> bool[B] says whether a row can take one more entry. A row that runs out of room stops ("cache_full").
    """
    B, N = last_logits_BV.shape[0], s.max_new_tokens
    is_stop = lambda t_B: jnp.any(t_B[:, None] == s.stop_ids, axis=-1)
    tok_B, lp_B = sampling.sample(last_logits_BV, jax.random.fold_in(key, 0), s)
    out_tok_BN = jnp.full((B, N), -1, jnp.int32).at[:, 0].set(tok_B)
    out_lp_BN = jnp.zeros((B, N), jnp.float32).at[:, 0].set(lp_B)
    init = (jnp.int32(0), carry, tok_B, is_stop(tok_B), jnp.zeros((B,), bool), out_tok_BN, out_lp_BN)

    def cond(st):
        i, _, _, done_B, *_ = st
        return (i + 1 < N) & ~jnp.all(done_B)

    def body(st):
        i, carry, tok_B, done_B, full_B, out_tok_BN, out_lp_BN = st
        no_room_B = ~done_B & ~room(carry)
        full_B, done_B = full_B | no_room_B, done_B | no_room_B
        active_B = ~done_B
        logits_BV, carry = step(carry, tok_B, active_B)
        new_B, lp_B = sampling.sample(logits_BV, jax.random.fold_in(key, i + 1), s)
        out_tok_BN = out_tok_BN.at[:, i + 1].set(jnp.where(active_B, new_B, -1))
        out_lp_BN = out_lp_BN.at[:, i + 1].set(jnp.where(active_B, lp_B, 0.0))
        done_B = done_B | (active_B & is_stop(new_B))
        return i + 1, carry, jnp.where(active_B, new_B, tok_B), done_B, full_B, out_tok_BN, out_lp_BN

    _, carry, _, _, full_B, out_tok_BN, out_lp_BN = jax.lax.while_loop(cond, body, init)
    return carry, out_tok_BN, out_lp_BN, full_B


@functools.partial(jax.jit, static_argnums=(0,), donate_argnames=("cache",))
def _decode_cached_jit(graphdef, state, cache, last_logits_BV, key, s: sampling.Sampling):
    model = nnx.merge(graphdef, state)

    def step(cache, tok_B, active_B):
        logits_B1V, cache = _extend(model, cache, tok_B[:, None], active_B.astype(jnp.int32))
        return logits_B1V[:, 0], cache

    # Every step writes one slot per row (inactive rows an empty one), so a row keeps its last slot free.
    room = lambda c: c.length < c.capacity - 1
    return _decode_loop(step, room, cache, last_logits_BV, key, s)


@functools.partial(jax.jit, static_argnums=(0, 7, 8))
def _decode_recompute_jit(graphdef, state, buf_BW, len_B, last_logits_BV, key, s: sampling.Sampling, anchor_ids, rule):
    model = nnx.merge(graphdef, state)

    def step(carry, tok_B, active_B):
        buf_BW, len_B = carry
        row_B = jnp.arange(buf_BW.shape[0])
        buf_BW = buf_BW.at[row_B, len_B].set(jnp.where(active_B, tok_B, buf_BW[row_B, len_B]))
        len_B = len_B + active_B.astype(jnp.int32)
        return _masked_last_logits(model, buf_BW, len_B, anchor_ids, rule), (buf_BW, len_B)

    room = lambda c: c[1] < c[0].shape[1]
    return _decode_loop(step, room, (buf_BW, len_B), last_logits_BV, key, s)


# ----------------------------------------------------------------------------------------------------------
# Public API


def prefill_capacity(
    tokens_BT: np.ndarray,
    lengths_B: np.ndarray,
    anchor_ids: tuple[int, ...],
    policy: str | masks.Policy,
    chunk: int,
    rule: masks.Policy | None = None,
) -> int:
    """KV slots per row that a prefill in chunks of `chunk` tokens needs (each chunk writes `chunk` slots)."""
    need = 0
    for row, n in zip(tokens_BT, lengths_B, strict=True):
        for start in range(0, tokens_BT.shape[1], chunk):
            need = max(need, kvcache.kept_after(row[: min(start, n)], anchor_ids, policy, rule) + chunk)
    return need


def prefill(
    model: Llama,
    tokens: Sequence[Sequence[int]] | np.ndarray,
    lengths: Sequence[int] | np.ndarray | None = None,
    policy: str | masks.Policy = "anchor",
    capacity: int | None = None,
    *,
    chunk_size: int | None = None,
    padding_side: str = "right",
    mask: str | masks.Policy = "model",
    reserve: int = 0,
) -> tuple[KVCache, jax.Array]:
    """Run prompts through a fresh cache. Returns (cache, float32 [B, V] logits of each row's last token).

    tokens: lists of ids, or a padded [B, T] array with `lengths` (padding on `padding_side`). Prompts are
    padded to a power-of-two bucket, or cut into chunks of `chunk_size` tokens (default DEFAULT_PREFILL_CHUNK;
    exact: each chunk attends to the cache left by the previous ones). A prefill that would not fit the free
    memory is refused before any work. capacity: slots per row (default: what the prompts need plus
    `reserve`, rounded up to a multiple of 64); too small a capacity is an error, never a silent overwrite.
    policy: "full" (keep every entry), or an evicting policy ("anchor" or a `masks.Policy`, kvcache.py), which
    attends under its own mask. mask: the full cache's attention mask (see `model.mask_policy`).
    """
    if policy == "none":
        raise ValueError("cache policy 'none' keeps no cache to prefill; use generate(..., policy='none')")
    rule = kvcache.cache_rule(model.cfg, policy, mask)
    anchor_ids = policy_anchor_ids(model.cfg, rule)
    tokens_BT, lengths_B = _as_batch(tokens, lengths, padding_side)
    longest = int(lengths_B.max())
    _warn_past_context(model, longest, "the prompts")
    chunk = min(DEFAULT_PREFILL_CHUNK if chunk_size is None else chunk_size, bucket(longest))
    if chunk < 1:
        raise ValueError(f"chunk_size={chunk_size} must be at least 1")
    width = _round_up(longest, chunk)
    tokens_BT = np.pad(tokens_BT[:, :width], ((0, 0), (0, width - min(width, tokens_BT.shape[1]))))
    need = prefill_capacity(tokens_BT, lengths_B, anchor_ids, policy, chunk, rule)
    kept = max(kvcache.kept_after(r[:n], anchor_ids, policy, rule) for r, n in zip(tokens_BT, lengths_B, strict=True))
    need = max(need, kept + reserve)
    if capacity is None:
        capacity = _round_up(need, _CAPACITY_MULTIPLE)
    elif capacity < need:
        raise ValueError(
            f"capacity={capacity} KV slots per row is too small: these prompts need {need} "
            f"(chunk {chunk}, policy {str(policy)!r}); pass capacity>={need} or a smaller chunk_size"
        )
    fix = "pass a smaller chunk size (--chunk-size) or fewer prompts at once"
    _check_memory(model.cfg, len(lengths_B), chunk, capacity, capacity, fix)
    cache = kvcache.init(model.cfg, len(lengths_B), capacity, policy, anchor_ids, rule)
    graphdef, state = nnx.split(model)
    last_BV = None
    for start in range(0, width, chunk):
        n_new_B = np.clip(lengths_B - start, 0, chunk).astype(np.int32)
        logits_BV, cache = _extend_jit(
            graphdef, state, cache, jnp.asarray(tokens_BT[:, start : start + chunk]), jnp.asarray(n_new_B), "last"
        )
        last_BV = logits_BV if last_BV is None else jnp.where(jnp.asarray(n_new_B > 0)[:, None], logits_BV, last_BV)
    return cache, last_BV


def extend(
    model: Llama, cache: KVCache, tokens: np.ndarray | jax.Array, lengths: Sequence[int] | np.ndarray | None = None
) -> tuple[jax.Array, KVCache]:
    """Append right-padded tokens [B, T] (row b: its first lengths[b]) to `cache` (donated: use the returned one).

    Returns float32 logits [B, T, V] (slots past a row's length are meaningless) and the new cache.
    """
    tokens_BT = jnp.asarray(tokens, jnp.int32)
    B, T = tokens_BT.shape
    n_new_B = np.full((B,), T, np.int32) if lengths is None else np.asarray(lengths, np.int32)
    longest = int(np.max(jax.device_get(cache.length)))
    if longest + T > cache.capacity:
        raise ValueError(
            f"cache overflow: a row holds {longest} entries and {T} more slots are written, but capacity is "
            f"{cache.capacity}; grow it with kvcache.resize(cache, {longest + T}) first"
        )
    graphdef, state = nnx.split(model)
    return _extend_jit(graphdef, state, cache, tokens_BT, jnp.asarray(n_new_B), "all")


def score_continuations(
    model: Llama,
    prefix_cache: KVCache,
    prefix_logits: jax.Array,
    continuations: Sequence[Sequence[int]],
    *,
    batch_size: int = 16,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Log-probs of each continuation's tokens after a shared prefix, exactly as the masked forward over
    prefix + continuation gives them.

    prefix_cache, prefix_logits: one row, from `prefill(model, [prefix_ids], policy=...)` (not modified).
    Returns, per continuation, float32 log p(c[t] | prefix, c[:t]) and whether c[t] was the argmax.
    """
    if prefix_cache.batch != 1:
        raise ValueError(f"the prefix cache must hold one row, got {prefix_cache.batch}; prefill the prefix alone")
    rows = [list(c) for c in continuations]
    if any(len(r) == 0 for r in rows):
        raise ValueError("every continuation needs at least one token")
    graphdef, state = nnx.split(model)
    first_BV = jnp.broadcast_to(
        jnp.reshape(prefix_logits, (1, -1)), (min(batch_size, len(rows)), prefix_logits.shape[-1])
    )
    prefix_len = int(jax.device_get(prefix_cache.length)[0])
    logprobs, greedy = [], []
    for lo in range(0, len(rows), batch_size):
        part = rows[lo : lo + batch_size]
        B = first_BV.shape[0]
        tokens_BT, lengths_B = _as_batch(part, None, "right")
        T = bucket(tokens_BT.shape[1])
        tokens_BT = np.pad(tokens_BT, ((0, B - len(part)), (0, T - tokens_BT.shape[1])))
        lengths_B = np.pad(lengths_B, (0, B - len(part)))
        cache = kvcache.tile(kvcache.resize(prefix_cache, _round_up(prefix_len + T, _CAPACITY_MULTIPLE)), B)
        lp_BT, g_BT = jax.device_get(
            _score_jit(graphdef, state, cache, jnp.asarray(tokens_BT), jnp.asarray(lengths_B), first_BV)
        )
        logprobs += [lp_BT[b, :n] for b, n in enumerate(lengths_B[: len(part)])]
        greedy += [g_BT[b, :n] for b, n in enumerate(lengths_B[: len(part)])]
    return logprobs, greedy


def _generate_recompute(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens_BT: np.ndarray,
    lengths_B: np.ndarray,
    W: int,
    key: jax.Array,
    settings: sampling.Sampling,
    anchor_ids: tuple[int, ...],
    rule: masks.Policy,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Policy "none": every step recomputes the whole buffer of W tokens under the mask. Returns the decode
    loop's outputs and the time prefill ended."""
    longest = int(lengths_B.max())
    if longest >= W:
        raise ValueError(f"capacity={W} cannot hold the prompts ({longest} tokens) plus one more; raise it")
    buf_BW = jnp.asarray(np.pad(tokens_BT[:, :W], ((0, 0), (0, max(0, W - tokens_BT.shape[1])))))
    len_B = jnp.asarray(lengths_B)
    last_BV = jax.block_until_ready(_recompute_prefill_jit(graphdef, state, buf_BW, len_B, anchor_ids, rule))
    t1 = time.perf_counter()
    out = _decode_recompute_jit(graphdef, state, buf_BW, len_B, last_BV, key, settings, anchor_ids, rule)
    return (*jax.device_get(out[1:]), t1)


def _shrink_for_decode(cache: KVCache, rule: masks.Policy, max_new_tokens: int) -> KVCache:
    """Prefill needed room for a whole chunk; decoding needs only the kept entries plus the new tokens, and a
    bounded policy never keeps more than its bound (plus the slot written and the one kept free)."""
    need = int(np.max(jax.device_get(cache.length))) + max_new_tokens + 1
    if rule.bound is not None:
        need = min(need, rule.bound + 2)
    return kvcache.resize(cache, min(cache.capacity, _round_up(need, _CAPACITY_MULTIPLE)))


def _outputs(
    out_tok_BN: np.ndarray,
    out_lp_BN: np.ndarray,
    full_B: np.ndarray,
    stop_ids: Sequence[int],
    stop_strings: Sequence[str],
    tokenizer,
) -> tuple[list[list[int]], list[list[float]], list[str], list[str] | None]:
    """Per-row tokens, log-probs and finish reasons of a decode loop's -1-padded outputs, and the text cut at the
    first stop string when a tokenizer is given."""
    stop_set = set(stop_ids)
    tokens, logprobs, reasons = [], [], []
    for b in range(out_tok_BN.shape[0]):
        n = int(np.sum(out_tok_BN[b] >= 0))
        tokens.append(out_tok_BN[b, :n].tolist())
        logprobs.append(out_lp_BN[b, :n].tolist())
        stopped = n > 0 and tokens[-1][-1] in stop_set
        reasons.append("cache_full" if full_B[b] else "stop" if stopped else "length")
    if tokenizer is None:
        return tokens, logprobs, reasons, None
    text = []
    for b, ids in enumerate(tokens):
        t = tokenizer.decode([i for i in ids if i not in stop_set])
        cuts = [t.index(s) for s in stop_strings if s in t]
        if cuts:
            t, reasons[b] = t[: min(cuts)], "stop"
        text.append(t)
    return tokens, logprobs, reasons, text


def generate(
    model: Llama,
    prompts: Sequence[Sequence[int]] | np.ndarray,
    lengths: Sequence[int] | np.ndarray | None = None,
    *,
    policy: str | masks.Policy = "anchor",
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    capacity: int | None = None,
    chunk_size: int | None = None,
    padding_side: str = "right",
    mask: str | masks.Policy = "model",
    on_overflow: str = "error",
) -> Generation:
    """Generate for a batch of prompts with the "anchor", "full", "none" (recompute) or another cache policy.

    Decoding is one jitted while_loop with the cache donated; an evicting policy compacts a row's cache when an
    entry becomes unreachable (policy "anchor": when the row generates an anchor). Rows stop at a stop id, after
    max_new_tokens, or when their cache is full:
    on_overflow="error" raises then, "stop" returns the row with finish_reason "cache_full". Stop strings
    need a tokenizer: one-token stop strings stop decoding, longer ones cut the text afterwards.
    """
    if on_overflow not in ("error", "stop"):
        raise ValueError(f"on_overflow={on_overflow!r} must be 'error' or 'stop'")
    stop_ids = list(stop_ids)
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the text; pass tokenizer=")
    for s in stop_strings:
        ids = tokenizer.encode(s)
        if len(ids) == 1:
            stop_ids.append(ids[0])
    settings = sampling.settings(max_new_tokens, temperature, top_k, top_p, stop_ids)
    rule = mask_policy(model.cfg, mask) if policy == "none" else kvcache.cache_rule(model.cfg, policy, mask)
    anchor_ids = policy_anchor_ids(model.cfg, rule)
    tokens_BT, lengths_B = _as_batch(prompts, lengths, padding_side)  # right-padded from here on
    longest = int(lengths_B.max())
    if policy == "none" or longest <= model.cfg.max_seq_len:  # else prefill warns about the prompts themselves
        _warn_past_context(model, longest + max_new_tokens, "the prompts plus max_new_tokens")
    key = jax.random.key(seed)
    graphdef, state = nnx.split(model)
    t0 = time.perf_counter()
    if policy == "none":
        cache = None
        W = capacity or _round_up(longest + max_new_tokens, _MIN_BUCKET)
        _check_memory(model.cfg, len(lengths_B), W, W, 0, "pass a cache policy, whose prefill goes in chunks")
        out_tok_BN, out_lp_BN, full_B, t1 = _generate_recompute(
            graphdef, state, tokens_BT, lengths_B, W, key, settings, anchor_ids, rule
        )
    else:
        cache, last_BV = prefill(
            model,
            tokens_BT,
            lengths_B,
            policy,
            capacity,
            chunk_size=chunk_size,
            mask=mask,
            reserve=max_new_tokens + 1 if capacity is None else 0,
        )
        if cache.evict and capacity is None:
            cache = _shrink_for_decode(cache, rule, max_new_tokens)
        jax.block_until_ready(last_BV)
        t1 = time.perf_counter()
        cache, out_tok_BN, out_lp_BN, full_B = _decode_cached_jit(graphdef, state, cache, last_BV, key, settings)
        out_tok_BN, out_lp_BN, full_B = jax.device_get((out_tok_BN, out_lp_BN, full_B))
    t2 = time.perf_counter()
    if on_overflow == "error" and full_B.any():
        rows = np.nonzero(full_B)[0].tolist()
        raise ValueError(
            f"KV cache overflow in rows {rows}: capacity {capacity} slots is too small for this generation; "
            "pass a larger capacity, fewer max_new_tokens, or on_overflow='stop'"
        )
    tokens, logprobs, reasons, text = _outputs(out_tok_BN, out_lp_BN, full_B, stop_ids, stop_strings, tokenizer)
    n_gen = sum(len(t) for t in tokens)
    stats = {"prefill_s": t1 - t0, "decode_s": t2 - t1, "generated_tokens": n_gen}
    if cache is not None:
        stats |= cache.stats()
    return Generation(tokens, logprobs, reasons, text, cache, stats)


# ----------------------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m anllm_jax.generate", description=__doc__.split("\n")[0])
    p.add_argument(
        "--checkpoint",
        default="smollm2",
        help="HF dir, GGUF file, native dir, or 'smollm2' (the packaged SmolLM2-135M-Instruct)",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt")
    source.add_argument(
        "--prompt-file",
        help='many prompts: JSONL with a "prompt" key per line (.jsonl), else one prompt per line; '
        "prints one JSON line per prompt, in order",
    )
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (--prompt-file)")
    p.add_argument(
        "--cache",
        choices=kvcache.POLICIES,
        default=None,
        help="full, none, or a policy (anchor = ansan); default: the model's own (anchor for ep/ac models)",
    )
    p.add_argument("--anchor-mode", choices=("ep", "ac", "full"), default=None, help="default: the model's own")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--add-bos", action="store_true", help="prepend the tokenizer's BOS token")
    p.add_argument(
        "--chunk-size", type=int, default=None, help=f"prefill chunk length (default {DEFAULT_PREFILL_CHUNK})"
    )
    p.add_argument("--dtype", default=None, help="compute dtype override, e.g. float32 (default: the model's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    cli_args.add_arguments(p)
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size={args.batch_size} must be at least 1")
    try:
        return _cli(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"anllm_jax.generate: error: {e}", file=sys.stderr)
        return 2


def _cli(args: argparse.Namespace) -> int:
    if args.prompt is not None:
        try:
            args.prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("--prompt holds bytes that are not UTF-8 text; pass UTF-8 text") from None
    requests = read_prompts(args.prompt_file) if args.prompt_file else [{"prompt": args.prompt}]
    if not requests:
        raise ValueError(f"{args.prompt_file} holds no prompts")

    from anllm_jax import anchors, checkpoints

    model, tokenizer = checkpoints.load_for_inference(args.checkpoint, args.dtype, args.anchor_mode)
    anchor_mode = model.cfg.anchor_mode
    policy = cli_args.cache_policy(args.cache, model.cfg, args, tokenizer)
    rule = mask_policy(model.cfg) if policy == "none" else kvcache.cache_rule(model.cfg, policy)
    stop_ids = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    per = kvcache.bytes_per_entry(model.cfg)
    anchor_ids = list(policy_anchor_ids(model.cfg, rule))
    kept = full = 0
    for lo in range(0, len(requests), args.batch_size):
        batch = requests[lo : lo + args.batch_size]
        prompts = [anchors.encode_prompt(r["prompt"], tokenizer, anchor_mode, add_bos=args.add_bos) for r in batch]
        for i, prompt in enumerate(prompts):
            if not prompt:
                where = "--prompt" if args.prompt is not None else f"prompt {lo + i + 1} of {args.prompt_file}"
                raise ValueError(f"{where} is empty; give it some text (or --add-bos to start from BOS alone)")
        gen = generate(
            model,
            prompts,
            policy=policy,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed + lo,
            stop_ids=stop_ids,
            stop_strings=args.stop,
            tokenizer=tokenizer,
            chunk_size=args.chunk_size,
        )
        lengths = np.zeros(len(batch), int) if gen.cache is None else np.asarray(jax.device_get(gen.cache.length))
        for b, (record, prompt) in enumerate(zip(batch, prompts, strict=True)):
            out = _record(record, prompt, gen, b, int(lengths[b]), per) | {"cache": str(policy)}
            out |= {"anchor_mode": anchor_mode, "anchor_ids": anchor_ids}
            kept, full = kept + out["cache_entries"], full + out["full_cache_entries"]
            print(json.dumps(out, allow_nan=False) if args.json or args.prompt_file else out["text"], flush=True)
    print(
        f"\n[cache {policy}, anchor mode {anchor_mode}, {len(requests)} prompt(s)] entries kept {kept} of {full} "
        f"({kept * per:,} of {full * per:,} bytes, reduction {1.0 - kept / full:.1%})"
        + ("" if args.prompt_file else f"; prefill {out['prefill_s']:.2f}s, decode {out['decode_s']:.2f}s"),
        file=sys.stderr,
    )
    return 0


def _record(request: dict, prompt: list[int], gen: Generation, b: int, entries: int, per: int) -> dict:
    """The JSON line of row b: the request's fields, the generation, and its cache against a full one."""
    # Entries of the tokens fed to the model: the prompt and every generated token but the last.
    full_entries = len(prompt) + len(gen.tokens[b]) - 1
    return {
        **request,
        "text": gen.text[b],
        "tokens": gen.tokens[b],
        "logprobs": [lp if math.isfinite(lp) else None for lp in gen.logprobs[b]],
        "finish_reason": gen.finish_reason[b],
        "prompt_ids": prompt,
        "prompt_tokens": len(prompt),
        "cache_entries": entries,
        "full_cache_entries": full_entries,
        "cache_bytes": entries * per,
        "full_cache_bytes": full_entries * per,
        "reduction": 1.0 - entries / full_entries,
        "prefill_s": gen.stats["prefill_s"],
        "decode_s": gen.stats["decode_s"],
    }


if __name__ == "__main__":
    sys.exit(main())
