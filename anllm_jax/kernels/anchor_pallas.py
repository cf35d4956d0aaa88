"""Pallas (Triton-style GPU) kernels of the sparse AnSAN attention, for the one-previous-block window tier.

Forward: one program per (query block, row, head) attends the C queries, with an online softmax, to their
window (previous and own key block, same-sentence keys) and then to the gathered anchors in blocks of
`ANCHOR_BLOCK`, stopping after the last anchor that precedes the query block; it returns the output and the
log-sum-exp. Backward: dq per query block, dk/dv per key block and per anchor block, recomputing the
probabilities from the log-sum-exp. Masks come from `masks.allowed` on the loaded blocks, split by `seg`
equality as in `anchor_attention`, which selects these kernels only where the tier is exact. Runs on CPU
with `interpret=True`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.custom_partitioning import custom_partitioning
from jax.experimental.pallas import triton as pl_triton
from jax.sharding import NamedSharding, PartitionSpec

from anllm_jax import anchor_rows, masks

ANCHOR_BLOCK = 64
# Query/key tile lengths (each divides the block length C): the forward tiles like flash attention's forward,
# the backward ones are smaller because each program holds two float32 accumulators.
FWD_TILE = 128
BWD_TILE = 64
# Finite: rows with nothing allowed yet keep finite running maxima (no inf - inf).
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def _info(refs, idx=...) -> masks.TokenInfo:
    """TokenInfo [1, L] from five int32 refs (order, seg, anchor, valid, doc) at `idx`."""
    order, seg, anchor, valid, doc = (r[idx][None] for r in refs)
    # The kernels run AnSAN, which reads only these five; the stream attributes repeat `order` and `seg`.
    return masks.TokenInfo(
        order=order, seg=seg, anchor=anchor != 0, valid=valid != 0, doc=doc, pos=order, sep=anchor < 0, nsep=seg
    )


def _mask(qi: masks.TokenInfo, ki: masks.TokenInfo, same_seg: bool) -> jax.Array:
    """bool [Lq, Lk]: `masks.allowed`, restricted to same-sentence keys (window) or other-sentence keys (anchors)."""
    seg_eq = qi.seg[0][:, None] == ki.seg[0][None, :]
    return masks.allowed(qi, ki).reshape(seg_eq.shape) & (seg_eq if same_seg else ~seg_eq)


def _window_tiles(qt, C: int, tile: int):
    """(first key tile in front-padded coordinates, number of tiles) of query tile qt's window, up to the tile's end."""
    per_block = C // tile
    first = (qt // per_block) * per_block  # padded tile of the previous block's start
    return first, qt - first + per_block + 1


def _fold_keys(update, carry, qt, n_anchor_tiles, C: int, tile: int, kf_ref, vf_ref, f_refs, ka_ref, va_ref, a_refs):
    """Fold `update(carry, k, v, key_info, same_seg)` over query tile qt's window key tiles (same-sentence keys),
    then over its first `n_anchor_tiles` tiles of gathered anchors (other-sentence keys)."""
    first, n_window = _window_tiles(qt, C, tile)

    def window_tile(j, carry):
        sl = pl.ds((first + j) * tile, tile)
        return update(carry, kf_ref[sl, :], vf_ref[sl, :], _info(f_refs, sl), True)

    def anchor_tile(j, carry):
        sl = pl.ds(j * ANCHOR_BLOCK, ANCHOR_BLOCK)
        return update(carry, ka_ref[sl, :], va_ref[sl, :], _info(a_refs, sl), False)

    carry = jax.lax.fori_loop(0, n_window, window_tile, carry)
    return jax.lax.fori_loop(0, n_anchor_tiles, anchor_tile, carry)


def _fwd_kernel(n_blocks_ref, q_ref, kf_ref, vf_ref, ka_ref, va_ref, *refs, C: int, tile: int, scale: float):
    q_refs, f_refs, a_refs = refs[0:5], refs[5:10], refs[10:15]
    o_ref, lse_ref = refs[15:]
    qt, b = pl.program_id(0), pl.program_id(1)
    q = q_ref[...]  # [tile, H]
    qi = _info(q_refs)

    def update(carry, k, v, ki, same_seg):
        acc, m, denom = carry
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
        mask = _mask(qi, ki, same_seg)
        m_new = jnp.maximum(m, jnp.max(jnp.where(mask, s, _MASKED), axis=-1))
        corr = jnp.exp(m - m_new)
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        acc = acc * corr[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return acc, m_new, denom * corr + jnp.sum(p, axis=-1)

    carry = (jnp.zeros(q.shape, jnp.float32), jnp.full((tile,), _MASKED), jnp.zeros((tile,), jnp.float32))
    keys = (kf_ref, vf_ref, f_refs, ka_ref, va_ref, a_refs)
    acc, m, denom = _fold_keys(update, carry, qt, n_blocks_ref[b, qt], C, tile, *keys)
    denom = jnp.where(denom > 0, denom, 1.0)
    o_ref[...] = (acc / denom[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(denom)


def _int_fields(info: masks.TokenInfo) -> list[jax.Array]:
    return [x.astype(jnp.int32) for x in (info.order, info.seg, info.anchor, info.valid, info.doc)]


def _setup(k, v, info: masks.TokenInfo, C: int, capacity: int, tile: int):
    """Gathered anchors, front-padded keys, and the anchor tiles each query tile needs (those before its end)."""
    slots = -(-capacity // ANCHOR_BLOCK) * ANCHOR_BLOCK
    ka, va, ia, idx_BA = anchor_rows.gather_anchors(k, v, info, slots)
    kf, vf, info_f = anchor_rows.front(k, C), anchor_rows.front(v, C), anchor_rows.front_info(info, C)
    is_a = (info.anchor & info.valid).astype(jnp.int32)
    before_end = jnp.cumsum(is_a, axis=1)[:, tile - 1 :: tile]
    n_blocks = (-(-jnp.minimum(before_end, slots) // ANCHOR_BLOCK)).astype(jnp.int32)
    return slots, ka, va, ia, idx_BA, kf, vf, info_f, n_blocks


def _specs(B: int, n_tiles: int, G: int, H: int):
    """BlockSpec makers over a (tiles, rows, heads) grid."""

    def row(length):
        return pl.BlockSpec((None, length), lambda j, b, n: (b, 0))

    def tile_of_row(length):
        return pl.BlockSpec((None, length), lambda j, b, n: (b, j))

    def per_head(length, heads_per_kv):
        return pl.BlockSpec((None, length, None, H), lambda j, b, n: (b, 0, n // heads_per_kv, 0))

    def tile_of(length, heads_per_kv):
        return pl.BlockSpec((None, length, None, H), lambda j, b, n: (b, j, n // heads_per_kv, 0))

    scalars = pl.BlockSpec((B, n_tiles), lambda j, b, n: (0, 0))
    return row, tile_of_row, per_head, tile_of, scalars


def _check_tiles(C: int, H: int, *tiles: int) -> None:
    if any(C % t for t in tiles) or H & (H - 1):
        raise ValueError(f"Pallas kernels need block={C} divisible by tiles {tiles} and a power-of-two head_dim={H}")


def _batch_parallel(call_for_rows, *arrays: jax.Array):
    """`call_for_rows(B)(*arrays)` for arrays that all lead with the batch: under a sharded batch each device runs
    it on its own rows (a Pallas call is otherwise not partitioned: its inputs would be gathered everywhere)."""

    def run(*arrays):
        return call_for_rows(arrays[0].shape[0])(*arrays)

    out_ndims = [len(o.shape) for o in jax.eval_shape(run, *arrays)]
    per_row = custom_partitioning(run)

    def batch_only(sharding, ndim):
        return NamedSharding(
            sharding.mesh, PartitionSpec(sharding.spec[0] if sharding.spec else None, *[None] * (ndim - 1))
        )

    def infer(mesh, arg_shapes, result_shape):
        return tuple(batch_only(arg_shapes[0].sharding, len(r.shape)) for r in result_shape)

    def partition(mesh, arg_shapes, result_shape):
        lead = arg_shapes[0].sharding
        outs = tuple(batch_only(lead, len(r.shape)) for r in result_shape)
        return mesh, run, outs, tuple(batch_only(lead, len(a.shape)) for a in arg_shapes)

    other_dims = []

    def dims(ndim, tag):
        rest = [f"{tag}{d}" for d in range(1, ndim)]
        other_dims.extend(rest)
        return " ".join(["b", *rest])

    rule = ", ".join(dims(a.ndim, f"i{i}_") for i, a in enumerate(arrays))
    rule += " -> " + ", ".join(dims(n, f"o{i}_") for i, n in enumerate(out_ndims))
    per_row.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer,
        sharding_rule=rule,
        need_replication_factors=tuple(other_dims),
    )
    return per_row(*arrays)


@functools.partial(jax.jit, static_argnames=("C", "capacity", "interpret"))
def windowed_fwd(q, k, v, info: masks.TokenInfo, *, C: int, capacity: int, interpret: bool = False):
    """o [B, Tp, N, H] and log-sum-exp [B, Tp, K, G] for Tp a multiple of C, under `masks.allowed`.

    Exact when every valid query's sentence starts in its window (previous or own block) and each row has at
    most `capacity` anchors: `anchor_attention.select_path(...) == 0` with tiers (1, ...).
    """
    B, Tp, N, H = q.shape
    K = k.shape[2]
    G = N // K
    tile = min(FWD_TILE, C)
    _check_tiles(C, H, tile)
    n_tiles = Tp // tile
    slots, ka, va, ia, _, kf, vf, info_f, n_blocks = _setup(k, v, info, C, capacity, tile)

    def call(rows):
        row, tile_of_row, per_head, tile_of, scalars = _specs(rows, n_tiles, G, H)
        return pl.pallas_call(
            functools.partial(_fwd_kernel, C=C, tile=tile, scale=H**-0.5),
            grid=(n_tiles, rows, N),
            in_specs=[
                scalars,
                tile_of(tile, 1),
                per_head(Tp + C, G),
                per_head(Tp + C, G),
                per_head(slots, G),
                per_head(slots, G),
                *[tile_of_row(tile)] * 5,
                *[row(Tp + C)] * 5,
                *[row(slots)] * 5,
            ],
            out_specs=[tile_of(tile, 1), pl.BlockSpec((None, None, tile), lambda j, b, n: (b, n, j))],
            out_shape=[
                jax.ShapeDtypeStruct((rows, Tp, N, H), q.dtype),
                jax.ShapeDtypeStruct((rows, N, Tp), jnp.float32),
            ],
            compiler_params=pl_triton.CompilerParams(num_warps=8 if H > 64 else 4, num_stages=2),
            interpret=interpret,
            name="anchor_attention_fwd",
        )

    o, lse_BNT = _batch_parallel(
        call, n_blocks, q, kf, vf, ka, va, *_int_fields(info), *_int_fields(info_f), *_int_fields(ia)
    )
    return o, jnp.swapaxes(lse_BNT, 1, 2).reshape(B, Tp, K, G)


def _probs(q, qi, k, ki, lse, same_seg: bool, scale: float):
    """Probabilities [Lq, Lk] of a query tile against a key tile, recomputed from the log-sum-exp."""
    s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
    return jnp.where(_mask(qi, ki, same_seg), jnp.exp(s - lse[:, None]), 0.0)


def _dq_kernel(n_blocks_ref, q_ref, do_ref, lse_ref, delta_ref, kf_ref, vf_ref, ka_ref, va_ref, *refs, C, tile, scale):
    q_refs, f_refs, a_refs = refs[0:5], refs[5:10], refs[10:15]
    (dq_ref,) = refs[15:]
    qt, b = pl.program_id(0), pl.program_id(1)
    q, do, lse, delta, qi = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...], _info(q_refs)

    def update(dq, k, v, ki, same_seg):
        p = _probs(q, qi, k, ki, lse, same_seg, scale)
        dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[:, None]) * scale).astype(k.dtype)
        return dq + jnp.dot(ds, k, preferred_element_type=jnp.float32)

    keys = (kf_ref, vf_ref, f_refs, ka_ref, va_ref, a_refs)
    dq_ref[...] = _fold_keys(update, jnp.zeros(q.shape, jnp.float32), qt, n_blocks_ref[b, qt], C, tile, *keys)


def _dkv_kernel(q_lo_ref, q_hi_ref, k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref, *refs, tile, same_seg, scale):
    """dk, dv of one key tile (window keys, or anchors) from the query tiles q_lo..q_hi-1 that may see it."""
    q_refs, k_refs = refs[0:5], refs[5:10]
    dk_ref, dv_ref = refs[10:]
    j, b = pl.program_id(0), pl.program_id(1)
    k, v, ki = k_ref[...], v_ref[...], _info(k_refs)

    def query_tile(i, carry):
        dk, dv = carry
        sl = pl.ds(i * tile, tile)
        q, do, lse, delta = q_ref[sl, :], do_ref[sl, :], lse_ref[sl], delta_ref[sl]
        p = _probs(q, _info(q_refs, sl), k, ki, lse, same_seg, scale)
        dv = dv + jnp.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[:, None]) * scale).astype(q.dtype)
        return dk + jnp.dot(ds.T, q, preferred_element_type=jnp.float32), dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(q_lo_ref[b, j], q_hi_ref[b, j], query_tile, (zeros, zeros))
    dk_ref[...], dv_ref[...] = dk, dv


@functools.partial(jax.jit, static_argnames=("C", "capacity", "interpret"))
def windowed_bwd(q, k, v, info: masks.TokenInfo, o, lse, do, *, C: int, capacity: int, interpret: bool = False):
    """dq, dk, dv (float32) of `windowed_fwd` given its output `o`, log-sum-exp [B, Tp, K, G] and cotangent `do`.

    Three kernels: dq per query tile (window and anchors), dk/dv per window key tile (from the query tiles of
    the windows that hold it, at or after it), dk/dv per anchor tile (from every query tile at or after its
    first anchor). Key gradients are computed per query head and summed over each group of heads.
    """
    B, Tp, N, H = q.shape
    K = k.shape[2]
    G = N // K
    tile = min(BWD_TILE, C)
    _check_tiles(C, H, tile)
    n_tiles = Tp // tile
    slots, ka, va, ia, idx_BA, kf, vf, info_f, n_blocks = _setup(k, v, info, C, capacity, tile)
    na = slots // ANCHOR_BLOCK
    lse_BNT = jnp.swapaxes(lse.reshape(B, Tp, N), 1, 2)
    delta_BNT = jnp.swapaxes(jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1), 1, 2)
    q_info, f_info, a_info = _int_fields(info), _int_fields(info_f), _int_fields(ia)
    params = pl_triton.CompilerParams(num_warps=4, num_stages=2)
    lse_tile = pl.BlockSpec((None, None, tile), lambda j, b, n: (b, n, j))
    lse_full = pl.BlockSpec((None, None, Tp), lambda j, b, n: (b, n, 0))
    f32 = jnp.float32

    def dq_call(rows):
        row, tile_of_row, per_head, tile_of, scalars = _specs(rows, n_tiles, G, H)
        return pl.pallas_call(
            functools.partial(_dq_kernel, C=C, tile=tile, scale=H**-0.5),
            grid=(n_tiles, rows, N),
            in_specs=[
                scalars,
                tile_of(tile, 1),
                tile_of(tile, 1),
                lse_tile,
                lse_tile,
                per_head(Tp + C, G),
                per_head(Tp + C, G),
                per_head(slots, G),
                per_head(slots, G),
                *[tile_of_row(tile)] * 5,
                *[row(Tp + C)] * 5,
                *[row(slots)] * 5,
            ],
            out_specs=[tile_of(tile, 1)],
            out_shape=[jax.ShapeDtypeStruct((rows, Tp, N, H), f32)],
            compiler_params=params,
            interpret=interpret,
            name="anchor_attention_dq",
        )

    (dq,) = _batch_parallel(dq_call, n_blocks, q, do, lse_BNT, delta_BNT, kf, vf, ka, va, *q_info, *f_info, *a_info)

    def dkv(q_lo, q_hi, kk, vv, k_info, key_len, same_seg, name):
        n_key_tiles = kk.shape[1] // key_len

        def call(rows):
            row, tile_of_row, per_head, tile_of, _ = _specs(rows, n_tiles, G, H)
            key_scalars = pl.BlockSpec((rows, n_key_tiles), lambda j, b, n: (0, 0))
            out = jax.ShapeDtypeStruct((rows, kk.shape[1], N, H), f32)
            return pl.pallas_call(
                functools.partial(_dkv_kernel, tile=tile, same_seg=same_seg, scale=H**-0.5),
                grid=(n_key_tiles, rows, N),
                in_specs=[
                    key_scalars,
                    key_scalars,
                    tile_of(key_len, G),
                    tile_of(key_len, G),
                    per_head(Tp, 1),
                    per_head(Tp, 1),
                    lse_full,
                    lse_full,
                    *[row(Tp)] * 5,
                    *[tile_of_row(key_len)] * 5,
                ],
                out_specs=[tile_of(key_len, 1)] * 2,
                out_shape=[out, out],
                compiler_params=params,
                interpret=interpret,
                name=name,
            )

        dk_BSNH, dv_BSNH = _batch_parallel(
            call, q_lo.astype(jnp.int32), q_hi.astype(jnp.int32), kk, vv, q, do, lse_BNT, delta_BNT, *q_info, *k_info
        )
        shape = (B, kk.shape[1], K, G, H)
        return dk_BSNH.reshape(shape).sum(3), dv_BSNH.reshape(shape).sum(3)

    # Window keys: key tile t is seen from itself on, up to the end of the block after its own.
    per_block = C // tile
    key_tiles = jnp.broadcast_to(jnp.arange(n_tiles, dtype=jnp.int32), (B, n_tiles))
    q_hi = jnp.minimum((key_tiles // per_block + 2) * per_block, n_tiles)
    dk, dv = dkv(key_tiles, q_hi, k, v, q_info, tile, True, "anchor_attention_dkv_window")
    # Anchors: seen from the query tile of the anchor tile's first anchor on (empty tiles: from none).
    first = idx_BA[:, ::ANCHOR_BLOCK] // tile
    last = jnp.full((B, na), n_tiles)
    dka, dva = dkv(first, last, ka, va, a_info, ANCHOR_BLOCK, False, "anchor_attention_dkv_anchors")
    return dq, anchor_rows.scatter_add_rows(dk, idx_BA, dka), anchor_rows.scatter_add_rows(dv, idx_BA, dva)
