"""The AnSAN mask against a brute-force Python loop of the rule, and masked attention without NaN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anllm_jax import attention, masks
from anllm_jax.config import preset
from anllm_jax.model import init_model

ANCHOR, PAD = 7, 0


def brute_force_mask(tokens, anchor_ids, pad_id=None, segment_ids=None):
    """REFERENCE section 1, one (i, j) pair at a time."""
    T = len(tokens)
    pad = [pad_id is not None and t == pad_id for t in tokens]
    if segment_ids is not None:
        pad = [p or s == 0 for p, s in zip(pad, segment_ids, strict=True)]
    doc = list(segment_ids) if segment_ids is not None else [0] * T
    is_a = [t in anchor_ids and not pad[k] for k, t in enumerate(tokens)]

    def seg(t):
        return sum(is_a[:t])

    out = np.zeros((T, T), bool)
    for i in range(T):
        for j in range(T):
            if j > i or pad[i] or pad[j] or doc[i] != doc[j]:
                continue
            out[i, j] = seg(j) == seg(i) or (is_a[j] and not is_a[i])
    return out


def random_stream(rng, T, anchor_rate):
    toks = rng.integers(1, 20, size=T)
    toks[rng.random(T) < anchor_rate] = ANCHOR
    return toks


def check(tokens_BT, anchor_ids, pad_id=None, segment_ids_BT=None):
    got = np.asarray(
        jax.jit(masks.anchor_mask)(
            jnp.asarray(tokens_BT),
            jnp.asarray(anchor_ids, jnp.int32),
            pad_id,
            None if segment_ids_BT is None else jnp.asarray(segment_ids_BT),
        )
    )
    for b in range(len(tokens_BT)):
        seg = None if segment_ids_BT is None else list(segment_ids_BT[b])
        want = brute_force_mask(list(tokens_BT[b]), list(anchor_ids), pad_id, seg)
        np.testing.assert_array_equal(got[b], want, err_msg=f"row {b}: {list(tokens_BT[b])}")


@pytest.mark.parametrize("anchor_rate", [0.0, 0.1, 0.3, 0.7, 1.0])
def test_random_streams_match_brute_force(anchor_rate):
    rng = np.random.default_rng(int(anchor_rate * 100))
    check(np.stack([random_stream(rng, 24, anchor_rate) for _ in range(6)]), [ANCHOR])


def test_edge_layouts():
    rows = [
        [ANCHOR, 3, 4, ANCHOR, ANCHOR, 5, 6, 8, 9, ANCHOR],  # anchor at 0, adjacent, at the end
        [1, 2, 3, 4, 5, 6, 8, 9, 10, 11],  # no anchors: plain causal
        [ANCHOR] * 10,  # every token an anchor: each sees only itself
        [1, 2, ANCHOR, 3, 4, 5, 6, 8, 9, 10],  # long open sequence after the only anchor
    ]
    check(np.array(rows), [ANCHOR])
    m = np.asarray(masks.anchor_mask(jnp.array(rows), jnp.array([ANCHOR])))
    np.testing.assert_array_equal(m[1], np.tril(np.ones((10, 10), bool)))
    np.testing.assert_array_equal(m[2], np.eye(10, dtype=bool))
    # BOS (position 0) is invisible to every token after the first anchor.
    assert not m[3, 3:, 0].any() and m[3, 2, 0]


def test_several_anchor_ids_and_empty_means_causal():
    rng = np.random.default_rng(1)
    toks = np.stack([rng.integers(1, 12, size=20) for _ in range(4)])
    check(toks, [3, 5, 9])
    causal = np.asarray(masks.anchor_mask(jnp.asarray(toks), jnp.zeros((0,), jnp.int32)))
    np.testing.assert_array_equal(causal, np.broadcast_to(np.tril(np.ones((20, 20), bool)), causal.shape))


def test_padding_and_packed_segments():
    rng = np.random.default_rng(2)
    B, T = 5, 32
    toks = np.stack([random_stream(rng, T, 0.2) for _ in range(B)])
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(1, T), size=3, replace=False))
        bounds = [0, *cuts, T]
        for d in range(len(bounds) - 1):
            seg[b, bounds[d] : bounds[d + 1]] = d + 1
        seg[b, T - rng.integers(0, 6) :] = 0  # right padding
    check(toks, [ANCHOR], segment_ids_BT=seg)
    toks_padded = toks.copy()
    toks_padded[:, -4:] = PAD
    check(toks_padded, [ANCHOR], pad_id=PAD)


def test_anchor_ids_are_data_under_jit():
    """One compiled function serves any anchor set: the ids are traced, not baked in."""
    traces = []

    @jax.jit
    def f(tokens, anchor_ids):
        traces.append(1)
        return masks.anchor_mask(tokens, anchor_ids)

    toks = jnp.array([[1, 2, 3, 4, 5, 6]])
    a = f(toks, jnp.array([3]))
    b = f(toks, jnp.array([4]))
    assert len(traces) == 1
    assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_fully_masked_rows_have_no_nan_in_outputs_or_gradients():
    rng = np.random.default_rng(3)
    B, T, N, K, H = 2, 8, 4, 2, 16
    toks = jnp.asarray(np.stack([random_stream(rng, T, 0.3) for _ in range(B)]))
    seg = jnp.ones((B, T), jnp.int32).at[:, -3:].set(0)  # padded queries see nothing
    info = masks.token_info(toks, jnp.array([ANCHOR]), segment_ids_BT=seg)
    q, k, v = (jax.random.normal(jax.random.key(i), (B, T, n, H)) for i, n in enumerate((N, K, K)))

    def loss(q, k, v):
        return jnp.sum(attention.attend(q, k, v, info, info, "xla") ** 2)

    out = attention.attend(q, k, v, info, info, "xla")
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    assert np.isfinite(np.asarray(out)).all()
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)

    cfg = preset("tiny", anchor_mode="ac", anchor_ids=(ANCHOR,))
    model = init_model(cfg)
    logits = model(toks, segment_ids_BT=seg)
    assert np.isfinite(np.asarray(logits)).all()


def test_attention_matches_float64_reference():
    """Dense masked GQA attention against a float64 numpy computation of softmax(QK^T/sqrt(H)) V."""
    rng = np.random.default_rng(4)
    B, T, N, K, H = 2, 12, 6, 3, 8
    toks = jnp.asarray(np.stack([random_stream(rng, T, 0.25) for _ in range(B)]))
    info = masks.token_info(toks, jnp.array([ANCHOR]))
    q = rng.standard_normal((B, T, N, H))
    k = rng.standard_normal((B, T, K, H))
    v = rng.standard_normal((B, T, K, H))
    got = np.asarray(attention.attend(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), info, info, "xla"))
    mask = np.asarray(masks.allowed(info, info))
    want = np.zeros((B, T, N, H))
    for b in range(B):
        for n in range(N):
            s = q[b, :, n] @ k[b, :, n // (N // K)].T / np.sqrt(H)
            s = np.where(mask[b], s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            want[b, :, n] = (p / p.sum(-1, keepdims=True)) @ v[b, :, n // (N // K)]
    np.testing.assert_allclose(got, want, atol=1e-5)
