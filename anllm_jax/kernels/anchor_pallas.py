"""Pallas (Triton-style GPU) forward kernel of the sparse AnSAN attention, for the one-previous-block window.

One program per (query block, row, head): with an online softmax, it attends the C queries to their window
(previous and own key block, same-sentence keys) and then to the gathered anchors in blocks of
`ANCHOR_BLOCK`, stopping after the last anchor that precedes the query block. Masks come from
`masks.allowed` on the loaded blocks, split by `seg` equality as in `anchor_attention`. Returns the output
and the log-sum-exp that the backward pass of `anchor_attention` recomputes from. Runs on CPU with
`interpret=True`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from anllm_jax import anchor_attention as aa
from anllm_jax import masks

ANCHOR_BLOCK = 64
# Finite: rows with nothing allowed yet keep finite running maxima (no inf - inf).
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def _info(refs, idx=...) -> masks.TokenInfo:
    """TokenInfo [1, L] from five int32 refs (order, seg, anchor, valid, doc) at `idx`."""
    order, seg, anchor, valid, doc = (r[idx][None] for r in refs)
    return masks.TokenInfo(order=order, seg=seg, anchor=anchor != 0, valid=valid != 0, doc=doc)


def _update(carry, q, qi: masks.TokenInfo, k, v, ki: masks.TokenInfo, same_seg: bool, scale: float):
    """One online-softmax step over a key block: same-sentence keys (window) or other-sentence keys (anchors)."""
    acc, m, denom = carry
    s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
    seg_eq = qi.seg[0][:, None] == ki.seg[0][None, :]
    mask = masks.allowed(qi, ki).reshape(s.shape) & (seg_eq if same_seg else ~seg_eq)
    m_new = jnp.maximum(m, jnp.max(jnp.where(mask, s, _MASKED), axis=-1))
    corr = jnp.exp(m - m_new)
    p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
    acc = acc * corr[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return acc, m_new, denom * corr + jnp.sum(p, axis=-1)


def _kernel(n_blocks_ref, q_ref, kf_ref, vf_ref, ka_ref, va_ref, *refs, C: int, scale: float):
    q_refs, f_refs, a_refs = refs[0:5], refs[5:10], refs[10:15]
    o_ref, lse_ref = refs[15:]
    i, b = pl.program_id(0), pl.program_id(1)
    q = q_ref[...]  # [C, H]
    qi = _info(q_refs)
    carry = (
        jnp.zeros(q.shape, jnp.float32),
        jnp.full((C,), _MASKED, jnp.float32),
        jnp.zeros((C,), jnp.float32),
    )
    # The window: previous block, then own block (front-padded coordinates: block i is the previous one).
    for j in range(2):
        sl = pl.ds((i + j) * C, C)
        carry = _update(carry, q, qi, kf_ref[sl, :], vf_ref[sl, :], _info(f_refs, sl), True, scale)

    def anchor_block(j, carry):
        sl = pl.ds(j * ANCHOR_BLOCK, ANCHOR_BLOCK)
        return _update(carry, q, qi, ka_ref[sl, :], va_ref[sl, :], _info(a_refs, sl), False, scale)

    acc, m, denom = jax.lax.fori_loop(0, n_blocks_ref[b, i], anchor_block, carry)
    denom = jnp.where(denom > 0, denom, 1.0)
    o_ref[...] = (acc / denom[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(denom)


def _int_fields(info: masks.TokenInfo) -> list[jax.Array]:
    return [x.astype(jnp.int32) for x in (info.order, info.seg, info.anchor, info.valid, info.doc)]


@functools.partial(jax.jit, static_argnames=("C", "capacity", "interpret"))
def windowed_fwd(q, k, v, info: masks.TokenInfo, *, C: int, capacity: int, interpret: bool = False):
    """o [B, Tp, N, H] and log-sum-exp [B, Tp, K, G] for Tp a multiple of C, under `masks.allowed`.

    Exact when every valid query's sentence starts in its window (previous or own block) and each row has at
    most `capacity` anchors: `anchor_attention.select_path(...) == 0` with tiers (1, ...).
    """
    B, Tp, N, H = q.shape
    K = k.shape[2]
    G = N // K
    nb = Tp // C
    slots = -(-capacity // ANCHOR_BLOCK) * ANCHOR_BLOCK
    ka, va, ia, _ = aa._gather_anchors(k, v, info, slots)
    kf, vf, info_f = aa._front(k, C), aa._front(v, C), aa._front_info(info, C)
    # Anchor blocks each query block needs: those holding anchors before the block's end.
    is_a = (info.anchor & info.valid).astype(jnp.int32)
    before_end = jnp.cumsum(is_a, axis=1)[:, C - 1 :: C]
    n_blocks = -(-jnp.minimum(before_end, slots) // ANCHOR_BLOCK)

    def full(length):
        return pl.BlockSpec((None, length), lambda i, b, n: (b, 0))

    kv_spec = lambda length: pl.BlockSpec((None, length, None, H), lambda i, b, n: (b, 0, n // G, 0))
    in_specs = [
        pl.BlockSpec((B, nb), lambda i, b, n: (0, 0)),
        pl.BlockSpec((None, C, None, H), lambda i, b, n: (b, i, n, 0)),
        kv_spec(Tp + C),
        kv_spec(Tp + C),
        kv_spec(slots),
        kv_spec(slots),
        *[pl.BlockSpec((None, C), lambda i, b, n: (b, i))] * 5,
        *[full(Tp + C)] * 5,
        *[full(slots)] * 5,
    ]
    out_specs = [
        pl.BlockSpec((None, C, None, H), lambda i, b, n: (b, i, n, 0)),
        pl.BlockSpec((None, None, C), lambda i, b, n: (b, n, i)),
    ]
    o, lse_BNT = pl.pallas_call(
        functools.partial(_kernel, C=C, scale=H**-0.5),
        grid=(nb, B, N),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, N, Tp), jnp.float32)],
        compiler_params=pl_triton.CompilerParams(num_warps=8 if H > 64 else 4, num_stages=2),
        interpret=interpret,
        name="anchor_attention_fwd",
    )(n_blocks.astype(jnp.int32), q, kf, vf, ka, va, *_int_fields(info), *_int_fields(info_f), *_int_fields(ia))
    return o, jnp.swapaxes(lse_BNT, 1, 2).reshape(B, Tp, K, G)
