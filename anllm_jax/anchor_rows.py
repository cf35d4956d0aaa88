"""Row-wise tables, gathers and scatters of the sparse AnSAN attention, shared by its pure-JAX path
(anchor_attention.py) and its Pallas kernels (kernels/): where each query's sentence starts (`runs`) and, per
tile of queries, the first key tile of its window and the anchors before its end (`block_tables`); each row's
anchors gathered into a static number of slots, and key/value gradients scattered back; padding in front of a row
for the first blocks' windows. Every op runs per row (vmapped), so it stays on the device that holds the row under
a batch-sharded mesh.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from anllm_jax import masks


def gather_anchors(k, v, info: masks.TokenInfo, capacity: int):
    """The row's valid anchors in order, compacted to `capacity` slots (empty slots are invalid)."""
    B, T = info.order.shape
    is_a = info.anchor & info.valid
    slot = jnp.where(is_a, jnp.cumsum(is_a, axis=1) - 1, capacity)
    t = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    idx_BA = per_row(lambda s, t: jnp.full((capacity,), T, jnp.int32).at[s].set(t, mode="drop"), slot, t)

    def take(x):
        x_pad = jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=1)
        return per_row(lambda x, i: x[i], x_pad, idx_BA)

    return take(k), take(v), jax.tree.map(take, info), idx_BA


def per_row(f, *arrays):
    """`f` on each row: gathers and scatters vmapped over the batch stay local to a batch-sharded device."""
    return jax.vmap(f)(*arrays)


def scatter_add_rows(x_BT, idx_BA, upd_BA):
    """x[b, idx[b, a]] += upd[b, a] for each row; out-of-range indices (empty anchor slots) are dropped."""
    return per_row(lambda x, i, u: x.at[i].add(u, mode="drop"), x_BT, idx_BA, upd_BA)


def front(x, rows: int, value=0):
    return jnp.pad(x, [(0, 0), (rows, 0)] + [(0, 0)] * (x.ndim - 2), constant_values=value)


def front_info(info: masks.TokenInfo, rows: int) -> masks.TokenInfo:
    """Info of `rows` invalid positions before the row (the window of the first blocks reaches there)."""
    return jax.tree.map(lambda x: front(x, rows, False if x.dtype == jnp.bool_ else -1), info)


def runs(info: masks.TokenInfo) -> tuple[jax.Array, jax.Array]:
    """(ordered: bool [], run_start: int32 [B, T]): where each valid query's same-sentence keys begin.

    Among valid tokens, with `order` strictly increasing and `seg` non-decreasing (`ordered`), the same-seg keys a
    query may see are the valid tokens from the start of its (seg, doc) run up to itself (runs split at doc changes
    only where doc ids are also non-decreasing). `run_start` is non-decreasing along each row. Where `ordered` is
    false the runs say nothing and only a path that reads every key is exact.
    """
    B, T = info.order.shape
    t = jnp.arange(T, dtype=jnp.int32)
    valid = info.valid
    last_valid = jax.lax.cummax(jnp.where(valid, t, -1), axis=1)
    prev = jnp.concatenate([jnp.full((B, 1), -1, jnp.int32), last_valid[:, :-1]], axis=1)
    has_prev = prev >= 0

    def at_prev(x):
        return per_row(lambda x, i: x[i], x, jnp.maximum(prev, 0))

    seg_prev, doc_prev = at_prev(info.seg), at_prev(info.doc)
    follows = ~valid | ~has_prev
    ordered = jnp.all(follows | ((info.order > at_prev(info.order)) & (info.seg >= seg_prev)))
    doc_sorted = jnp.all(follows | (info.doc >= doc_prev), axis=1, keepdims=True)
    new_run = valid & (~has_prev | (info.seg != seg_prev) | (doc_sorted & (info.doc != doc_prev)))
    return ordered, jax.lax.cummax(jnp.where(new_run, t, 0), axis=1)


class BlockTables(NamedTuple):
    """Per-tile key ranges of the sparse AnSAN attention over rows cut into tiles of `tile` positions.

    Exact when `ordered`: query tile i needs same-sentence keys only from key tile `first_key_tile[b, i]` up to i,
    and anchors only among the row's first `anchors_through[b, i]` (those before the tile's end); key tile j is
    read by the query tiles j .. `last_query_tile[b, j]` (j - 1 when none) as same-sentence keys.
    """

    ordered: jax.Array  # bool []
    first_key_tile: jax.Array  # int32 [B, n_tiles], non-decreasing along the row
    last_query_tile: jax.Array  # int32 [B, n_tiles]
    anchors_through: jax.Array  # int32 [B, n_tiles]


def block_tables(info: masks.TokenInfo, tile: int) -> BlockTables:
    """`BlockTables` of `info` [B, T] (T a multiple of `tile`), computed in O(T + n_tiles^2) per row."""
    B, T = info.order.shape
    if T % tile:
        raise ValueError(f"block_tables needs T={T} to be a multiple of the tile {tile}")
    nt = T // tile
    ordered, run_start = runs(info)
    t = jnp.arange(T, dtype=jnp.int32)
    # A tile without valid queries needs no keys: it takes its own tile, then the suffix minimum keeps the table
    # non-decreasing (a later tile's run can start before an empty tile).
    start = jnp.min(jnp.where(info.valid, run_start, t).reshape(B, nt, tile), axis=2) // tile
    first = jax.lax.cummin(start, axis=1, reverse=True).astype(jnp.int32)
    tiles = jnp.arange(nt, dtype=jnp.int32)
    reads = (first[:, None, :] <= tiles[None, :, None]) & (tiles[None, None, :] >= tiles[None, :, None])
    last = jnp.max(jnp.where(reads, tiles[None, None, :], -1), axis=2)
    last = jnp.where(last >= 0, last, tiles - 1).astype(jnp.int32)
    anchors = jnp.cumsum((info.anchor & info.valid).astype(jnp.int32), axis=1)[:, tile - 1 :: tile]
    return BlockTables(ordered, first, last, anchors)
