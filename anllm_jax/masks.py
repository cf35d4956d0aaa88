"""The anchor-based self-attention (AnSAN) mask rule: the one place it is defined.

For query i and key j of the same example (REFERENCE section 1):

    seg(t) = number of anchors strictly before t
    allowed(i, j) = j <= i and not pad(i) and not pad(j) and same packed document
                    and (seg(j) == seg(i) or (isA(j) and not isA(i)))

A non-anchor sees its own sentence plus every earlier anchor; an anchor sees only its own sentence.
The rule is written over per-position attributes (`TokenInfo`) so that the same function serves one
forward over a row and a query block against a compacted KV cache, where positions are not contiguous.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TokenInfo:
    """Per-position attributes that decide visibility. All arrays are [B, T].

    order: causal order (index within the row, or absolute position for cache entries).
    seg: number of anchors strictly before the position in its row.
    anchor: the token is an anchor.
    valid: a real token (not padding, not an empty cache slot).
    doc: packed-document id (rows holding one document use a constant).
    """

    order: jax.Array
    seg: jax.Array
    anchor: jax.Array
    valid: jax.Array
    doc: jax.Array


def is_anchor(tokens_BT: jax.Array, anchor_ids: jax.Array) -> jax.Array:
    """bool[B, T]: tokens whose id is in `anchor_ids` (an int array, possibly empty)."""
    anchor_ids = jnp.asarray(anchor_ids, dtype=tokens_BT.dtype).reshape(-1)
    return jnp.any(tokens_BT[..., None] == anchor_ids, axis=-1)


def token_info(
    tokens_BT: jax.Array,
    anchor_ids: jax.Array,
    pad_id: int | jax.Array | None = None,
    segment_ids_BT: jax.Array | None = None,
) -> TokenInfo:
    """Attributes of a row of tokens. `segment_ids_BT` are packed-document ids, 0 marking padding."""
    B, T = tokens_BT.shape
    valid = jnp.ones((B, T), bool)
    if pad_id is not None:
        valid &= tokens_BT != pad_id
    if segment_ids_BT is None:
        doc = jnp.zeros((B, T), jnp.int32)
    else:
        doc = segment_ids_BT.astype(jnp.int32)
        valid &= doc != 0
    anchor = is_anchor(tokens_BT, anchor_ids) & valid
    a = anchor.astype(jnp.int32)
    seg = jnp.cumsum(a, axis=-1) - a
    order = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return TokenInfo(order=order, seg=seg, anchor=anchor, valid=valid, doc=doc)


def allowed(q: TokenInfo, k: TokenInfo) -> jax.Array:
    """bool[B, Tq, Tk]: True where query i may attend key j."""
    qo, ko = q.order[:, :, None], k.order[:, None, :]
    same_seg = q.seg[:, :, None] == k.seg[:, None, :]
    earlier_anchor = k.anchor[:, None, :] & ~q.anchor[:, :, None]
    return (
        (ko <= qo)
        & q.valid[:, :, None]
        & k.valid[:, None, :]
        & (q.doc[:, :, None] == k.doc[:, None, :])
        & (same_seg | earlier_anchor)
    )


def anchor_mask(
    tokens: jax.Array,
    anchor_ids: jax.Array,
    pad_id: int | jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """bool[B, T, T], True where query i may attend key j under AnSAN.

    `anchor_ids` is data (an int array; empty means plain causal). `segment_ids` are packed-document ids,
    0 marking padding. Works under jit.
    """
    info = token_info(tokens, anchor_ids, pad_id, segment_ids)
    return allowed(info, info)
