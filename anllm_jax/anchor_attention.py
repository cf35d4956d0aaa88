"""Exact AnSAN self-attention in O(T x (window + anchors)) work and O(T) extra memory.

Under `masks.allowed` (AnSAN), or any mask whose keys are all in the query's sentence or anchors (`rule`, e.g.
ansan-bounded), a query sees two disjoint sets of keys:
  - keys of its own sentence (same `seg`), which lie in the query's block of C tokens or the previous
    `n_prev` blocks whenever the sentence began no earlier than that;
  - anchors of other sentences, which are few: they are gathered per row into `capacity` slots.
Each query block attends to a key window (its own block plus the `n_prev` previous ones, masked to same-seg
keys) and to the gathered anchors (masked to other-seg keys), with one softmax over both. Both masks are
the rule on the small gathered sets, split by `seg` equality, so the rule is not restated here.

Exactness is checked at run time on the TokenInfo (O(T)): the first tier whose window holds every query's
sentence and whose anchor slots hold every anchor runs; when none does (very long sentences, too many
anchors, positions out of order) the same code attends each query block to all keys (exact, O(T^2) work,
still O(T) memory). Queries are processed in chunks by `lax.scan`, and the backward pass (`jax.custom_vjp`)
recomputes probabilities from the saved log-sum-exp, so memory stays linear in T.

Rows of padding (no allowed key) reproduce the dense reference `attention._xla`: its finite mask value turns
them into a uniform average of all values.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from anllm_jax import anchor_rows, masks

DEFAULT_BLOCK = 128
# Previous blocks in the key window, tried in order at run time: a 2-block window covers every sentence of
# up to block+1 tokens, the wide one sentences of up to 8 blocks.
DEFAULT_TIERS = (1, 8)
DEFAULT_Q_CHUNK = 1024
KERNELS = ("jax", "pallas", "pallas_interpret")


def default_capacity(T: int) -> int:
    """Anchor slots per row: room for sentences averaging 16 tokens (multiple of 64, at least 64)."""
    return max(64, -(-math.ceil(T / 16) // 64) * 64)


def anchor_attention(
    q_BTNH: jax.Array,
    k_BTKH: jax.Array,
    v_BTKH: jax.Array,
    info: masks.TokenInfo,
    *,
    block: int = DEFAULT_BLOCK,
    capacity: int | None = None,
    tiers: tuple[int, ...] = DEFAULT_TIERS,
    q_chunk: int = DEFAULT_Q_CHUNK,
    kernel: str = "jax",
    rule: masks.Mask = masks.ANSAN,
) -> jax.Array:
    """Self-attention under `rule(info, info)` (AnSAN by default); returns [B, T, N, H] in the dtype of the queries.

    q_BTNH [B, T, N, H]; k_BTKH, v_BTKH [B, T, K, H] with N a multiple of K; `info` a TokenInfo [B, T].
    `block`: query/key block length. `capacity`: anchor slots per row (default `default_capacity(T)`).
    `tiers`: numbers of previous key blocks in the local window, tried in order. `q_chunk`: queries per
    scan step (rounded to whole blocks). `kernel`: "jax", or "pallas" (GPU) / "pallas_interpret" (CPU) to run
    the one-previous-block tier (forward and backward) as Pallas kernels. All are static; any input is computed exactly.
    """
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    if k_BTKH.shape != (B, T, K, H) or v_BTKH.shape != k_BTKH.shape or N % K:
        raise ValueError(
            f"anchor attention needs q [B,T,N,H] and k, v [B,T,K,H] with N a multiple of K (self-attention); "
            f"got q {q_BTNH.shape}, k {k_BTKH.shape}, v {v_BTKH.shape}"
        )
    if info.order.shape != (B, T):
        raise ValueError(f"TokenInfo must be [B, T] = {(B, T)}, got {info.order.shape}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not one of {', '.join(KERNELS)}")
    if kernel == "pallas" and jax.default_backend() != "gpu":
        raise ValueError(
            f"kernel='pallas' (attention='anchor_pallas') needs a GPU, this backend is {jax.default_backend()}; "
            "use 'anchor' (pure JAX) here, or kernel='pallas_interpret' to emulate the kernels"
        )
    if kernel != "jax" and (tiers[0] != 1 or block & (block - 1) or (q_BTNH.shape[-1] & (q_BTNH.shape[-1] - 1))):
        raise ValueError(
            f"the Pallas kernel needs tiers starting with 1 and power-of-two block and head_dim; got tiers={tiers}, "
            f"block={block}, head_dim={q_BTNH.shape[-1]}"
        )
    if block < 1 or not tiers or min(tiers) < 1:
        raise ValueError(f"block={block} and tiers={tiers} must be positive (e.g. block=128, tiers=(1, 8))")
    capacity = default_capacity(T) if capacity is None else capacity
    nb = -(-T // block)
    per_chunk = max(1, min(nb, q_chunk // block))
    n_chunks = -(-nb // per_chunk)
    per_chunk = -(-nb // n_chunks)
    Tp = n_chunks * per_chunk * block

    q, k, v, info_p = _pad(q_BTNH, k_BTKH, v_BTKH, info, Tp)
    if kernel != "jax" and rule != masks.ANSAN:
        raise ValueError(f"kernel={kernel!r} hard-wires the AnSAN rule; use kernel='jax' for the rule {rule}")
    o = _core(q, k, v, info_p, block, per_chunk, capacity, tuple(tiers), kernel, rule)[:, :T]
    # Rows without any allowed key: the uniform average of every value, as the dense reference gives.
    v_mean = jnp.mean(v_BTKH.astype(jnp.float32), axis=1)  # [B, K, H]
    v_mean_BNH = jnp.repeat(v_mean, N // K, axis=1).astype(o.dtype)
    return jnp.where(info.valid[:, :, None, None], o, v_mean_BNH[:, None])


def _pad(q, k, v, info: masks.TokenInfo, Tp: int):
    T = q.shape[1]
    extra = Tp - T
    if not extra:
        return q, k, v, info

    def pad_time(x, value=0):
        return jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2), constant_values=value)

    order_tail = jnp.max(info.order, axis=1, keepdims=True) + 1 + jnp.arange(extra, dtype=info.order.dtype)
    repeat_last = lambda x: jnp.concatenate([x, jnp.repeat(x[:, -1:], extra, axis=1)], axis=1)
    info_p = masks.TokenInfo(
        order=jnp.concatenate([info.order, order_tail], axis=1),
        seg=repeat_last(info.seg),
        anchor=pad_time(info.anchor, False),
        valid=pad_time(info.valid, False),
        doc=repeat_last(info.doc),
        pos=repeat_last(info.pos),
        sep=pad_time(info.sep, False),
        nsep=repeat_last(info.nsep),
    )
    return pad_time(q), pad_time(k), pad_time(v), info_p


def select_path(info: masks.TokenInfo, block: int, capacity: int, tiers: tuple[int, ...]) -> jax.Array:
    """Index of the first tier that computes `info` exactly, or len(tiers) for the all-keys path.

    A tier fits when the rows are ordered, every valid query's run (`anchor_rows.runs`) starts inside its window
    and every row's anchors fit the slots.
    """
    T = info.order.shape[1]
    t = jnp.arange(T, dtype=jnp.int32)
    valid = info.valid
    ordered, run_start = anchor_rows.runs(info)
    fits_slots = jnp.all(jnp.sum(info.anchor & valid, axis=1) <= capacity)
    tier = jnp.int32(len(tiers))
    for i in reversed(range(len(tiers))):
        window_start = (t // block - tiers[i]) * block
        fits = ordered & fits_slots & jnp.all(~valid | (run_start >= window_start))
        tier = jnp.where(fits, i, tier)
    return tier


def _flat(info: masks.TokenInfo) -> masks.TokenInfo:
    return jax.tree.map(lambda a: a.reshape(-1, a.shape[-1]), info)


def _parts(q, qi, local, shared, rule):
    """Masked score parts of one chunk of n query blocks, each (scores f32, mask, keys, values, key spec).

    q [B, n, C, K, G, H]; qi TokenInfo [B, n, C]. local = (k, v [B, n, W, K, H], TokenInfo [B, n, W]) keys of
    each block's window, restricted to the query's sentence. shared = (k, v [B, S, K, H], TokenInfo [B, S],
    exclude_same_seg) keys seen by every block of the chunk.
    """
    B, n, C = qi.order.shape
    scale = q.shape[-1] ** -0.5
    parts = []
    if local is not None:
        kw, vw, kwi = local
        W = kw.shape[2]
        mask = rule(_flat(qi), _flat(kwi)) & (_flat(qi).seg[:, :, None] == _flat(kwi).seg[:, None, :])
        s = jnp.einsum("bnqkgh,bnwkh->bnkgqw", q, kw, preferred_element_type=jnp.float32) * scale
        parts.append((s, mask.reshape(B, n, 1, 1, C, W), kw, vw, "bnwkh"))
    if shared is not None:
        ks, vs, ksi, exclude_same_seg = shared
        S = ks.shape[1]
        qf = jax.tree.map(lambda a: a.reshape(B, n * C), qi)
        mask = rule(qf, ksi)
        if exclude_same_seg:
            mask &= qf.seg[:, :, None] != ksi.seg[:, None, :]
        s = jnp.einsum("bnqkgh,bskh->bnkgqs", q, ks, preferred_element_type=jnp.float32) * scale
        parts.append((s, mask.reshape(B, n, 1, 1, C, S), ks, vs, "bskh"))
    return parts


def _chunk_fwd(q, qi, local, shared, rule):
    """Output [B, n, C, K, G, H] (dtype of q) and log-sum-exp [B, n, K, G, C] of one chunk."""
    parts = _parts(q, qi, local, shared, rule)
    m = functools.reduce(jnp.maximum, [jnp.max(jnp.where(mk, s, -jnp.inf), axis=-1) for s, mk, *_ in parts])
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    ps = [jnp.where(mk, jnp.exp(s - m[..., None]), 0.0) for s, mk, *_ in parts]
    denom = sum(jnp.sum(p, axis=-1) for p in ps)
    denom = jnp.where(denom > 0, denom, 1.0)
    o = sum(
        jnp.einsum(
            f"bnkgq{spec[-3]},{spec}->bnqkgh",
            (p / denom[..., None]).astype(vv.dtype),
            vv,
            preferred_element_type=jnp.float32,
        )
        for p, (_, _, _, vv, spec) in zip(ps, parts, strict=True)
    )
    return o.astype(q.dtype), m + jnp.log(denom)


def _chunk_bwd(q, qi, local, shared, lse, do, rule):
    """Gradients of one chunk: dq [B, n, C, K, G, H] f32 and, per part, (dk, dv) f32 shaped like its keys."""
    parts = _parts(q, qi, local, shared, rule)
    scale = q.shape[-1] ** -0.5
    ps = [jnp.where(mk, jnp.exp(s - lse[..., None]), 0.0) for s, mk, *_ in parts]
    dps = [
        jnp.einsum(f"bnqkgh,{spec}->bnkgq{spec[-3]}", do, vv, preferred_element_type=jnp.float32)
        for _, _, _, vv, spec in parts
    ]
    delta = sum(jnp.sum(p * dp, axis=-1) for p, dp in zip(ps, dps, strict=True))
    dq = 0.0
    grads = []
    for p, dp, (_, _, kk, _, spec) in zip(ps, dps, parts, strict=True):
        x = spec[-3]
        ds = (p * (dp - delta[..., None]) * scale).astype(q.dtype)
        dq = dq + jnp.einsum(f"bnkgq{x},{spec}->bnqkgh", ds, kk, preferred_element_type=jnp.float32)
        dk = jnp.einsum(f"bnkgq{x},bnqkgh->{spec}", ds, q, preferred_element_type=jnp.float32)
        dv = jnp.einsum(f"bnkgq{x},bnqkgh->{spec}", p.astype(do.dtype), do, preferred_element_type=jnp.float32)
        grads.append((dk, dv))
    return dq, grads


def _chunks(x, n_chunks: int, per_chunk: int, block: int):
    """[B, Tp, ...] -> [n_chunks, B, per_chunk, block, ...] (the scan axis first)."""
    return jnp.moveaxis(x.reshape(x.shape[0], n_chunks, per_chunk, block, *x.shape[2:]), 1, 0)


def _unchunk(x):
    """[n_chunks, B, per_chunk, block, ...] -> [B, Tp, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[4:])


def _split_heads(q, K):
    B, T, N, H = q.shape
    return q.reshape(B, T, K, N // K, H)


def _windows(x_range, n: int, n_prev: int):
    """Range [B, (n + n_prev) * C, ...] -> per-block windows [B, n, (n_prev + 1) * C, ...]."""
    B, R = x_range.shape[:2]
    C = R // (n + n_prev)
    xb = x_range.reshape(B, n + n_prev, C, *x_range.shape[2:])
    w = jnp.stack([xb[:, j : j + n] for j in range(n_prev + 1)], axis=2)
    return w.reshape(B, n, (n_prev + 1) * C, *x_range.shape[2:])


def _fold_windows(w, n: int, n_prev: int):
    """Adjoint of `_windows`: sum per-block window gradients [B, n, W, ...] into their range."""
    B = w.shape[0]
    C = w.shape[2] // (n_prev + 1)
    wb = w.reshape(B, n, n_prev + 1, C, *w.shape[3:])
    out = jnp.zeros((B, n + n_prev, C, *w.shape[3:]), w.dtype)
    for j in range(n_prev + 1):
        out = out.at[:, j : j + n].add(wb[:, :, j])
    return out.reshape(B, (n + n_prev) * C, *w.shape[3:])


def _local_range(k, v, info_f, c, n: int, n_prev: int, C: int):
    """Keys, values and info of chunk c's window range (front-padded coordinates)."""
    start = c * n * C
    size = (n + n_prev) * C

    def cut(x):
        return jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)

    return cut(k), cut(v), jax.tree.map(cut, info_f)


def _windowed_fwd(q, k, v, info, C: int, n: int, capacity: int, n_prev: int, rule):
    """Local windows of n_prev previous blocks plus gathered anchors. Returns o [B,Tp,N,H], lse [B,Tp,K,G]."""
    B, Tp, N, H = q.shape
    K = k.shape[2]
    n_chunks = Tp // (n * C)
    ka, va, ia, _ = anchor_rows.gather_anchors(k, v, info, capacity)
    front = n_prev * C
    kf, vf, info_f = anchor_rows.front(k, front), anchor_rows.front(v, front), anchor_rows.front_info(info, front)
    xs = (jnp.arange(n_chunks), _chunks(_split_heads(q, K), n_chunks, n, C), _chunks_info(info, n_chunks, n, C))

    def step(_, x):
        c, qc, qic = x
        kr, vr, ir = _local_range(kf, vf, info_f, c, n, n_prev, C)
        local = (_windows(kr, n, n_prev), _windows(vr, n, n_prev), jax.tree.map(lambda a: _windows(a, n, n_prev), ir))
        return None, _chunk_fwd(qc, qic, local, (ka, va, ia, True), rule)

    _, (o, lse) = jax.lax.scan(step, None, xs)
    return _unchunk(o).reshape(B, Tp, N, H), _unchunk_lse(lse)


def _windowed_bwd(q, k, v, info, lse, do, C: int, n: int, capacity: int, n_prev: int, rule):
    B, Tp, N, H = q.shape
    K = k.shape[2]
    n_chunks = Tp // (n * C)
    ka, va, ia, idx_BA = anchor_rows.gather_anchors(k, v, info, capacity)
    front = n_prev * C
    kf, vf, info_f = anchor_rows.front(k, front), anchor_rows.front(v, front), anchor_rows.front_info(info, front)
    xs = (
        jnp.arange(n_chunks),
        _chunks(_split_heads(q, K), n_chunks, n, C),
        _chunks_info(info, n_chunks, n, C),
        _chunk_lse(lse, n_chunks, n, C),
        _chunks(_split_heads(do, K), n_chunks, n, C),
    )
    zeros_f = jnp.zeros(kf.shape, jnp.float32)
    zeros_a = jnp.zeros(ka.shape, jnp.float32)

    def step(carry, x):
        dkf, dvf, dka, dva = carry
        c, qc, qic, lsec, doc = x
        kr, vr, ir = _local_range(kf, vf, info_f, c, n, n_prev, C)
        local = (_windows(kr, n, n_prev), _windows(vr, n, n_prev), jax.tree.map(lambda a: _windows(a, n, n_prev), ir))
        dq, ((dkw, dvw), (dks, dvs)) = _chunk_bwd(qc, qic, local, (ka, va, ia, True), lsec, doc, rule)
        start = c * n * C
        size = (n + n_prev) * C

        def add_range(acc, g):
            cur = jax.lax.dynamic_slice_in_dim(acc, start, size, axis=1)
            return jax.lax.dynamic_update_slice_in_dim(acc, cur + _fold_windows(g, n, n_prev), start, axis=1)

        return (add_range(dkf, dkw), add_range(dvf, dvw), dka + dks, dva + dvs), dq

    (dkf, dvf, dka, dva), dq = jax.lax.scan(step, (zeros_f, zeros_f, zeros_a, zeros_a), xs)
    dk = anchor_rows.scatter_add_rows(dkf[:, front:], idx_BA, dka)
    dv = anchor_rows.scatter_add_rows(dvf[:, front:], idx_BA, dva)
    return _unchunk(dq).reshape(B, Tp, N, H), dk, dv


def _all_keys_fwd(q, k, v, info, C: int, rule):
    """Every query block against every key under the rule: the exact path for any input."""
    B, Tp, N, H = q.shape
    K = k.shape[2]
    n_chunks = Tp // C
    xs = (_chunks(_split_heads(q, K), n_chunks, 1, C), _chunks_info(info, n_chunks, 1, C))

    def step(_, x):
        qc, qic = x
        return None, _chunk_fwd(qc, qic, None, (k, v, info, False), rule)

    _, (o, lse) = jax.lax.scan(step, None, xs)
    return _unchunk(o).reshape(B, Tp, N, H), _unchunk_lse(lse)


def _all_keys_bwd(q, k, v, info, lse, do, C: int, rule):
    B, Tp, N, H = q.shape
    K = k.shape[2]
    n_chunks = Tp // C
    xs = (
        _chunks(_split_heads(q, K), n_chunks, 1, C),
        _chunks_info(info, n_chunks, 1, C),
        _chunk_lse(lse, n_chunks, 1, C),
        _chunks(_split_heads(do, K), n_chunks, 1, C),
    )
    zeros = jnp.zeros(k.shape, jnp.float32)

    def step(carry, x):
        dk, dv = carry
        qc, qic, lsec, doc = x
        dq, ((dks, dvs),) = _chunk_bwd(qc, qic, None, (k, v, info, False), lsec, doc, rule)
        return (dk + dks, dv + dvs), dq

    (dk, dv), dq = jax.lax.scan(step, (zeros, zeros), xs)
    return _unchunk(dq).reshape(B, Tp, N, H), dk, dv


def _chunks_info(info: masks.TokenInfo, n_chunks: int, n: int, C: int) -> masks.TokenInfo:
    return jax.tree.map(lambda a: _chunks(a, n_chunks, n, C), info)


def _unchunk_lse(lse):
    """[n_chunks, B, n, K, G, C] -> [B, Tp, K, G]."""
    lse = jnp.moveaxis(lse, -1, 3)  # [n_chunks, B, n, C, K, G]
    return _unchunk(lse)


def _chunk_lse(lse, n_chunks: int, n: int, C: int):
    """[B, Tp, K, G] -> [n_chunks, B, n, K, G, C]."""
    return jnp.moveaxis(_chunks(lse, n_chunks, n, C), 3, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def _core(q, k, v, info, block, per_chunk, capacity, tiers, kernel, rule):
    return _core_fwd(q, k, v, info, block, per_chunk, capacity, tiers, kernel, rule)[0]


def _core_fwd(q, k, v, info, block, per_chunk, capacity, tiers, kernel, rule):
    tier = select_path(info, block, capacity, tiers)
    branches = [
        functools.partial(_windowed_fwd, C=block, n=per_chunk, capacity=capacity, n_prev=n_prev, rule=rule)
        for n_prev in tiers
    ]
    branches.append(functools.partial(_all_keys_fwd, C=block, rule=rule))
    if kernel != "jax":
        branches[0] = functools.partial(
            _pallas().windowed_fwd, C=block, capacity=capacity, interpret=kernel == "pallas_interpret"
        )
    o, lse = jax.lax.switch(tier, branches, q, k, v, info)
    return o, (q, k, v, info, o, lse, tier)


def _core_bwd(block, per_chunk, capacity, tiers, kernel, rule, res, do):
    q, k, v, info, o, lse, tier = res
    branches = [
        functools.partial(_windowed_bwd, C=block, n=per_chunk, capacity=capacity, n_prev=n_prev, rule=rule)
        for n_prev in tiers
    ]
    branches.append(functools.partial(_all_keys_bwd, C=block, rule=rule))
    if kernel != "jax":
        pallas_bwd = functools.partial(
            _pallas().windowed_bwd, C=block, capacity=capacity, interpret=kernel == "pallas_interpret"
        )
        branches[0] = lambda q, k, v, info, lse, do: pallas_bwd(q, k, v, info, o, lse, do)
    dq, dk, dv = jax.lax.switch(tier, branches, q, k, v, info, lse, do)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


def _pallas():
    # Imported on first use so that the pure-JAX path does not load Pallas.
    from anllm_jax.kernels import anchor_pallas

    return anchor_pallas


_core.defvjp(_core_fwd, _core_bwd)
