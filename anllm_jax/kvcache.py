"""Preallocated KV cache for policy-masked inference, and its compaction.

Each row of the cache holds its entries in slots [0, length); later slots are empty (`info.valid` False).
Every slot carries the `masks.TokenInfo` of the token it stores: `order` and `pos` are the token's true absolute
position (RoPE positions are never re-numbered), `seg` and `nsep` the anchors and separators before it in its
row's stream, `anchor`, `sep` and `valid` flags, and `doc` (constant: one stream per row). New queries attend the
cache under the cache's policy (`rule`), with these attributes exactly as one forward over the whole row would.

Cache policies:
- "full": keep every entry (an ordinary KV cache); it serves any mask, by default the model's own.
- a `masks.Policy` ("anchor" names ansan): after every forward, each row keeps exactly the entries that some later
  query can still attend under the policy's mask (`masks.reachable`); for ansan these are [anchors, tokens after
  the last anchor]. Policies with a bound (`Policy.bound`) never hold more entries than it between forwards.
- "none": no cache; every step recomputes the whole prefix (the timing baseline, handled in generate.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from anllm_jax import masks
from anllm_jax.config import ModelConfig
from anllm_jax.model import mask_policy, write_rows

POLICIES = ("full", "anchor", "none", *masks.POLICY_NAMES[1:])


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """k, v: [L, B, S, K, H] in the compute dtype; info: TokenInfo [B, S] of every slot.

    length: int32 [B], occupied slots per row. n_anchors, n_seps: int32 [B], anchors and separators seen so far in
    the row's stream (the `seg` and `nsep` of its next token). next_pos: int32 [B], absolute position of the row's
    next token. rule, evict and anchor_ids are static: the policy new queries attend under, whether entries no
    later query can attend are dropped (False: the full cache), and what counts as an anchor.
    """

    k: jax.Array
    v: jax.Array
    info: masks.TokenInfo
    length: jax.Array
    n_anchors: jax.Array
    next_pos: jax.Array
    n_seps: jax.Array
    rule: masks.Policy = dataclasses.field(metadata={"static": True})
    evict: bool = dataclasses.field(metadata={"static": True})
    anchor_ids: tuple[int, ...] = dataclasses.field(metadata={"static": True})

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def policy(self) -> str:
        """ "full" or the spec of the evicting policy."""
        return str(self.rule) if self.evict else "full"

    def bytes_per_entry(self) -> int:
        """Bytes of keys plus values of one token over all layers."""
        L, _, _, K, H = self.k.shape
        return 2 * L * K * H * self.k.dtype.itemsize

    def stats(self) -> dict[str, int | float]:
        """Host-side summary: entries kept versus a full cache of the same tokens, and bytes."""
        entries = int(np.sum(jax.device_get(self.length)))
        full = int(np.sum(jax.device_get(self.next_pos)))
        per = self.bytes_per_entry()
        return {
            "cache_entries": entries,
            "full_cache_entries": full,
            "cache_bytes": entries * per,
            "full_cache_bytes": full * per,
            "allocated_bytes": self.batch * self.capacity * per,
            "reduction": 1.0 - entries / full if full else 0.0,
        }


def bytes_per_entry(cfg: ModelConfig) -> int:
    """Bytes of keys plus values of one token over all layers, in the model's compute dtype."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize


def cache_rule(cfg: ModelConfig, policy: str | masks.Policy, mask: str | masks.Policy = "model") -> masks.Policy:
    """The policy new queries attend under with cache policy `policy`: the model's `mask` for the full cache,
    else the policy itself (checked against the model by `model.mask_policy`)."""
    if policy == "none":
        raise ValueError("cache policy 'none' keeps no cache; use generate(..., policy='none') instead")
    if policy == "full":
        return mask_policy(cfg, mask)
    rule = mask_policy(cfg, masks.parse_policy(policy))
    if mask != "model" and mask_policy(cfg, mask) != rule:
        raise ValueError(f"cache policy {rule} attends under its own mask; mask={mask!r} applies to the full cache")
    return rule


def init(
    cfg: ModelConfig,
    batch: int,
    capacity: int,
    policy: str | masks.Policy,
    anchor_ids: tuple[int, ...],
    rule: masks.Policy | None = None,
) -> KVCache:
    """An empty cache of `capacity` slots per row. Without `rule`, a full cache attends under AnSAN over
    `anchor_ids` (plain causal when there are none)."""
    evict = policy != "full"
    if rule is None:
        rule = masks.parse_policy(policy) if evict else masks.ANSAN_POLICY if anchor_ids else masks.FULL
    if evict:
        masks.check_reachable(rule.mask)
    if rule.reads_anchors and not anchor_ids:
        raise ValueError(
            f"cache policy {'anchor' if rule.name == 'ansan' else rule} needs anchor ids, but the anchor mode is "
            "'full'; use an ep/ac model (or anchor_mode='ep'/'ac') or cache policy 'full'"
        )
    shape = (cfg.n_layers, batch, capacity, cfg.n_kv_heads, cfg.head_dim)
    # Separate buffers for every leaf: the cache is donated, and a buffer may be donated only once.
    zeros_BS = lambda dtype: jnp.zeros((batch, capacity), dtype)
    zeros_B = lambda: jnp.zeros((batch,), jnp.int32)
    info = masks.TokenInfo(
        **{f.name: zeros_BS(bool if f.name in ("anchor", "valid", "sep") else jnp.int32) for f in _INFO_FIELDS}
    )
    return KVCache(
        k=jnp.zeros(shape, cfg.dtype),
        v=jnp.zeros(shape, cfg.dtype),
        info=info,
        length=zeros_B(),
        n_anchors=zeros_B(),
        next_pos=zeros_B(),
        n_seps=zeros_B(),
        rule=rule,
        evict=evict and rule.evicts,
        anchor_ids=tuple(anchor_ids),
    )


_INFO_FIELDS = dataclasses.fields(masks.TokenInfo)


def new_entries(cache: KVCache, tokens_BT: jax.Array, n_new_B: jax.Array) -> tuple[masks.TokenInfo, masks.TokenInfo]:
    """(TokenInfo [B, T] of the new tokens, TokenInfo [B, S] of every slot once they are written): each row's
    first n_new_B[b] tokens continue its stream at its next position, after the anchors it has seen."""
    B, T = tokens_BT.shape
    t_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    valid_BT = t_BT < n_new_B[:, None]
    anchor_BT = masks.is_anchor(tokens_BT, jnp.asarray(cache.anchor_ids, jnp.int32)) & valid_BT
    sep_BT = masks.is_anchor(tokens_BT, jnp.asarray(cache.rule.separator_ids, jnp.int32)) & valid_BT
    count_before = lambda start_B, flags_BT: start_B[:, None] + jnp.cumsum(flags_BT, axis=1, dtype=jnp.int32) - flags_BT
    q_info = masks.TokenInfo(
        order=cache.next_pos[:, None] + t_BT,
        seg=count_before(cache.n_anchors, anchor_BT.astype(jnp.int32)),
        anchor=anchor_BT,
        valid=valid_BT,
        doc=jnp.zeros((B, T), jnp.int32),
        pos=cache.next_pos[:, None] + t_BT,
        sep=sep_BT,
        nsep=count_before(cache.n_seps, sep_BT.astype(jnp.int32)),
    )
    return q_info, jax.tree.map(lambda buf, new: write_rows(buf, new, cache.length), cache.info, q_info)


def advance(
    cache: KVCache, k: jax.Array, v: jax.Array, k_info: masks.TokenInfo, q_info: masks.TokenInfo, n_new_B: jax.Array
) -> KVCache:
    """The cache once the forward wrote the new entries (`k`, `v`, `k_info` from `new_entries`): counters moved
    on and, for an evicting policy, compacted when an entry became unreachable."""
    cache = dataclasses.replace(
        cache,
        k=k,
        v=v,
        info=k_info,
        length=cache.length + n_new_B,
        n_anchors=cache.n_anchors + jnp.sum(q_info.anchor, axis=1, dtype=jnp.int32),
        next_pos=cache.next_pos + n_new_B,
        n_seps=cache.n_seps + jnp.sum(q_info.sep, axis=1, dtype=jnp.int32),
    )
    if cache.evict:
        keep_BS = reachable(cache)
        cache = jax.lax.cond(jnp.any(cache.info.valid & ~keep_BS), compact, lambda c, _: c, cache, keep_BS)
    return cache


def reachable(cache: KVCache) -> jax.Array:
    """bool[B, S]: entries some later query of the row can still attend under the cache's policy."""
    next_q = masks.next_queries(cache.next_pos, cache.n_anchors, cache.n_seps, bool(cache.anchor_ids))
    return masks.reachable(cache.rule.mask, cache.info, next_q)


def compact(cache: KVCache, keep_BS: jax.Array | None = None) -> KVCache:
    """Keep, per row, the entries a later query can still attend (`reachable`) at the front, in order; static
    shapes.

    Invariant: afterwards a row holds exactly the entries that some query after its stream so far may attend under
    the cache's policy, so attending the compacted cache equals attending every token the row has seen.
    Idempotent: a row whose entries are all reachable is left unchanged.
    """
    keep_BS = reachable(cache) if keep_BS is None else keep_BS
    # A stable sort of "not kept" moves kept slots to the front in their original order.
    src_BS = jnp.argsort(~keep_BS, axis=1, stable=True)
    new_len_B = jnp.sum(keep_BS, axis=1, dtype=jnp.int32)
    gather_BS = lambda x: jnp.take_along_axis(x, src_BS, axis=1)
    gather_kv = lambda x: jnp.take_along_axis(x, src_BS[None, :, :, None, None], axis=2)
    valid_BS = jnp.arange(cache.capacity)[None, :] < new_len_B[:, None]
    new_info = jax.tree.map(gather_BS, cache.info)
    new_info = dataclasses.replace(
        new_info, valid=valid_BS, anchor=new_info.anchor & valid_BS, sep=new_info.sep & valid_BS
    )
    return dataclasses.replace(cache, k=gather_kv(cache.k), v=gather_kv(cache.v), info=new_info, length=new_len_B)


def resize(cache: KVCache, capacity: int) -> KVCache:
    """The same cache with `capacity` slots per row (empty slots added or dropped at the end)."""
    longest = int(np.max(jax.device_get(cache.length), initial=0))
    if capacity < longest:
        raise ValueError(f"cannot shrink the cache to {capacity} slots: a row holds {longest} entries")
    extra = capacity - cache.capacity
    if extra <= 0:
        cut_kv = lambda x: x[:, :, :capacity]
        cut = lambda x: x[:, :capacity]
        return dataclasses.replace(cache, k=cut_kv(cache.k), v=cut_kv(cache.v), info=jax.tree.map(cut, cache.info))
    pad_kv = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, extra), (0, 0), (0, 0)))
    pad = lambda x: jnp.pad(x, ((0, 0), (0, extra)))
    return dataclasses.replace(cache, k=pad_kv(cache.k), v=pad_kv(cache.v), info=jax.tree.map(pad, cache.info))


def tile(cache: KVCache, batch: int) -> KVCache:
    """Repeat a one-row cache (for example a shared prefix) into `batch` identical rows."""
    if cache.batch != 1:
        raise ValueError(f"tile needs a one-row cache, got {cache.batch} rows; build the shared prefix with batch 1")
    rep_kv = lambda x: jnp.repeat(x, batch, axis=1)
    rep = lambda x: jnp.repeat(x, batch, axis=0)
    return dataclasses.replace(
        cache,
        k=rep_kv(cache.k),
        v=rep_kv(cache.v),
        info=jax.tree.map(rep, cache.info),
        length=rep(cache.length),
        n_anchors=rep(cache.n_anchors),
        next_pos=rep(cache.next_pos),
        n_seps=rep(cache.n_seps),
    )


def kept_after(
    tokens: np.ndarray, anchor_ids: tuple[int, ...], policy: str | masks.Policy, rule: masks.Policy | None = None
) -> int:
    """Entries a row holds after its tokens (1-D, real tokens only) went through a cache of `policy` ("full", or
    an evicting policy, whose rule is itself): the same attributes and `masks.reachable` as the device, on the host."""
    tokens = np.asarray(tokens)
    if policy == "full" or len(tokens) == 0:
        return len(tokens)
    rule = masks.parse_policy(policy) if rule is None else rule
    if not rule.evicts:
        return len(tokens)
    info = masks.token_info(tokens.reshape(1, -1), np.asarray(anchor_ids, np.int64), None, None, rule.separator_ids)
    last = lambda x: np.asarray([x[0, -1]])
    next_q = masks.next_queries(
        np.asarray([len(tokens)]),
        last(info.seg) + last(info.anchor),
        last(info.nsep) + last(info.sep),
        bool(anchor_ids),
    )
    return int(masks.reachable(rule.mask, info, next_q).sum())
