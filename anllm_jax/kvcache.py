"""Preallocated KV cache for anchor-based inference, and its compaction.

Each row of the cache holds its entries in slots [0, length); later slots are empty (`info.valid` False).
Every slot carries the `masks.TokenInfo` of the token it stores: `order` is the token's true absolute position
(RoPE positions are never re-numbered), `seg` the number of anchors before it in its row's stream, `anchor` and
`valid` flags, and `doc` (constant: one stream per row). With these attributes `masks.allowed` applies the
AnSAN rule between new queries and cached keys exactly as one forward over the whole row would.

Policies:
- "full": keep every entry (an ordinary KV cache).
- "anchor": after a forward whose new tokens hold anchors, each row keeps only [earlier anchors, new anchors,
  tokens after its last new anchor]. No later query can see a dropped entry: it is a non-anchor of a closed
  sentence, and every later query lies in a later sentence.
- "none": no cache; every step recomputes the whole prefix (the timing baseline, handled in generate.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from anllm_jax import masks
from anllm_jax.config import ModelConfig
from anllm_jax.model import write_rows

POLICIES = ("full", "anchor", "none")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """k, v: [L, B, S, K, H] in the compute dtype; info: TokenInfo [B, S] of every slot.

    length: int32 [B], occupied slots per row. n_anchors: int32 [B], anchors seen so far in the row's stream
    (the `seg` of the row's next token). next_pos: int32 [B], absolute position of the row's next token.
    policy and anchor_ids are static: they fix which entries survive and what counts as an anchor.
    """

    k: jax.Array
    v: jax.Array
    info: masks.TokenInfo
    length: jax.Array
    n_anchors: jax.Array
    next_pos: jax.Array
    policy: str = dataclasses.field(metadata={"static": True})
    anchor_ids: tuple[int, ...] = dataclasses.field(metadata={"static": True})

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

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


def check_policy(policy: str, anchor_ids: tuple[int, ...]) -> None:
    if policy not in POLICIES:
        raise ValueError(f"cache policy {policy!r} is not one of {', '.join(POLICIES)}")
    if policy == "anchor" and not anchor_ids:
        raise ValueError(
            "cache policy 'anchor' needs anchor ids, but the anchor mode is 'full'; "
            "use an ep/ac model (or anchor_mode='ep'/'ac') or cache policy 'full'"
        )


def init(cfg: ModelConfig, batch: int, capacity: int, policy: str, anchor_ids: tuple[int, ...]) -> KVCache:
    """An empty cache of `capacity` slots per row."""
    check_policy(policy, anchor_ids)
    if policy == "none":
        raise ValueError("cache policy 'none' keeps no cache; use generate(..., policy='none') instead")
    shape = (cfg.n_layers, batch, capacity, cfg.n_kv_heads, cfg.head_dim)
    # Separate buffers for every leaf: the cache is donated, and a buffer may be donated only once.
    zeros_BS = lambda dtype: jnp.zeros((batch, capacity), dtype)
    zeros_B = lambda: jnp.zeros((batch,), jnp.int32)
    info = masks.TokenInfo(
        order=zeros_BS(jnp.int32),
        seg=zeros_BS(jnp.int32),
        anchor=zeros_BS(bool),
        valid=zeros_BS(bool),
        doc=zeros_BS(jnp.int32),
    )
    return KVCache(
        k=jnp.zeros(shape, cfg.dtype),
        v=jnp.zeros(shape, cfg.dtype),
        info=info,
        length=zeros_B(),
        n_anchors=zeros_B(),
        next_pos=zeros_B(),
        policy=policy,
        anchor_ids=tuple(anchor_ids),
    )


def new_entries(cache: KVCache, tokens_BT: jax.Array, n_new_B: jax.Array) -> tuple[masks.TokenInfo, masks.TokenInfo]:
    """(TokenInfo [B, T] of the new tokens, TokenInfo [B, S] of every slot once they are written): each row's
    first n_new_B[b] tokens continue its stream at its next position, after the anchors it has seen."""
    B, T = tokens_BT.shape
    t_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    valid_BT = t_BT < n_new_B[:, None]
    anchor_BT = masks.is_anchor(tokens_BT, jnp.asarray(cache.anchor_ids, jnp.int32)) & valid_BT
    a_BT = anchor_BT.astype(jnp.int32)
    q_info = masks.TokenInfo(
        order=cache.next_pos[:, None] + t_BT,
        seg=cache.n_anchors[:, None] + jnp.cumsum(a_BT, axis=1) - a_BT,
        anchor=anchor_BT,
        valid=valid_BT,
        doc=jnp.zeros((B, T), jnp.int32),
    )
    return q_info, jax.tree.map(lambda buf, new: write_rows(buf, new, cache.length), cache.info, q_info)


def advance(
    cache: KVCache, k: jax.Array, v: jax.Array, k_info: masks.TokenInfo, q_info: masks.TokenInfo, n_new_B: jax.Array
) -> KVCache:
    """The cache once the forward wrote the new entries (`k`, `v`, `k_info` from `new_entries`): counters moved
    on and, under the anchor policy, compacted when new anchors arrived."""
    cache = dataclasses.replace(
        cache,
        k=k,
        v=v,
        info=k_info,
        length=cache.length + n_new_B,
        n_anchors=cache.n_anchors + jnp.sum(q_info.anchor, axis=1, dtype=jnp.int32),
        next_pos=cache.next_pos + n_new_B,
    )
    if cache.policy == "anchor":
        cache = jax.lax.cond(jnp.any(q_info.anchor), compact, lambda c: c, cache)
    return cache


def compact(cache: KVCache) -> KVCache:
    """Keep, per row, [anchors, tokens after the last anchor] at the front, in order; static shapes.

    Idempotent: a row whose entries are all anchors or open-sentence tokens is left unchanged.
    """
    info = cache.info
    keep_BS = info.valid & (info.anchor | (info.seg == cache.n_anchors[:, None]))
    # A stable sort of "not kept" moves kept slots to the front in their original order.
    src_BS = jnp.argsort(~keep_BS, axis=1, stable=True)
    new_len_B = jnp.sum(keep_BS, axis=1, dtype=jnp.int32)
    gather_BS = lambda x: jnp.take_along_axis(x, src_BS, axis=1)
    gather_kv = lambda x: jnp.take_along_axis(x, src_BS[None, :, :, None, None], axis=2)
    valid_BS = jnp.arange(cache.capacity)[None, :] < new_len_B[:, None]
    new_info = masks.TokenInfo(
        order=gather_BS(info.order),
        seg=gather_BS(info.seg),
        anchor=gather_BS(info.anchor) & valid_BS,
        valid=valid_BS,
        doc=gather_BS(info.doc),
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
    )


def kept_after(tokens: np.ndarray, anchor_ids: tuple[int, ...], policy: str) -> int:
    """Entries a row holds after its tokens (1-D, real tokens only) went through the cache."""
    if policy == "full" or len(tokens) == 0:
        return len(tokens)
    is_a = np.isin(tokens, np.asarray(anchor_ids, dtype=np.asarray(tokens).dtype))
    if not is_a.any():
        return len(tokens)
    last = int(np.nonzero(is_a)[0][-1])
    return int(is_a.sum()) + len(tokens) - 1 - last
