"""Row-wise gathers and scatters of the sparse AnSAN attention, shared by its pure-JAX path
(anchor_attention.py) and its Pallas kernels (kernels/anchor_pallas.py): each row's anchors gathered into a
static number of slots, and key/value gradients scattered back; padding in front of a row for the first blocks'
windows. Every op runs per row (vmapped), so it stays on the device that holds the row under a batch-sharded mesh.
"""

from __future__ import annotations

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
