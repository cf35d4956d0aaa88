"""The mask-free causal backend (`cudnn_causal`) against the dense reference under `masks.allowed`, and the
guards that keep it to the inputs where the two agree (anchor-free rows of one document, then padding)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anllm_jax import attention, config, masks, train
from anllm_jax.config import preset
from anllm_jax.model import init_model

B, T, N, K, H = 3, 40, 4, 2, 16
PAD = 0


def _case(seed: int = 0):
    """Right-padded anchor-free rows (lengths 40, 23, 1), GQA q/k/v and a loss weight on valid queries."""
    r = np.random.default_rng(seed)
    lengths = np.array([T, 23, 1])
    toks = r.integers(1, 50, size=(B, T))
    toks[np.arange(T)[None, :] >= lengths[:, None]] = PAD
    info = masks.token_info(jnp.asarray(toks), jnp.zeros((0,), jnp.int32), PAD)
    q = jnp.asarray(r.normal(size=(B, T, N, H)), jnp.float32)
    k, v = (jnp.asarray(r.normal(size=(B, T, K, H)), jnp.float32) for _ in range(2))
    w = jnp.asarray(r.normal(size=(B, T, N, H)) * np.asarray(info.valid)[:, :, None, None], jnp.float32)
    return info, q, k, v, w


def _loss(f, w):
    def loss(q, k, v):
        o = f(q, k, v)
        return jnp.sum(o * w), o

    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)


def test_causal_backend_equals_dense_on_valid_positions():
    """Outputs at valid queries and gradients of a loss over them equal the dense masked reference (float32)."""
    info, q, k, v, w = _case()
    (_, o), grads = _loss(lambda q, k, v: attention._causal(q, k, v, info, "xla"), w)(q, k, v)
    (_, o_ref), grads_ref = _loss(lambda q, k, v: attention._xla(q, k, v, masks.allowed(info, info)), w)(q, k, v)
    valid = np.asarray(info.valid)
    np.testing.assert_allclose(np.asarray(o)[valid], np.asarray(o_ref)[valid], atol=1e-5)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(g, g_ref, atol=1e-5)


def test_causal_backend_for_cache_queries_is_dense():
    """Queries against other keys (a KV cache) take the dense path under the rule."""
    info, q, k, v, _ = _case(1)
    q_info = jax.tree.map(lambda a: a[:, -5:], info)
    got = attention.attend(q[:, -5:], k, v, q_info, info, impl="cudnn_causal")
    np.testing.assert_allclose(got, attention._xla(q[:, -5:], k, v, masks.allowed(q_info, info)), atol=1e-6)


def test_causal_backend_needs_full_anchor_mode_and_unpacked_rows(tmp_path):
    with pytest.raises(ValueError, match="cannot apply anchor_mode=ep; use attention=cudnn, anchor"):
        preset("tiny", attention="cudnn_causal", anchor_mode="ep", anchor_ids=(5,))
    model = init_model(preset("tiny", attention="cudnn_causal", anchor_ids=(5,)))
    with pytest.raises(ValueError, match="attention=cudnn_causal is plain causal"):
        model(jnp.ones((1, 8), jnp.int32), mask="anchor")
    raw = {
        "run_name": "x",
        "output_dir": str(tmp_path),
        "dataset_type": "synthetic",
        "model": {"preset": "tiny", "overrides": {"attention": "cudnn_causal"}},
        "data": {"anchor_mode": "full", "seq_len": 32, "packing": True},
    }
    with pytest.raises(ValueError, match="set data.packing=false or use attention=cudnn"):
        train.build_model(config.train_config_from_dict(raw))
    raw["data"]["packing"] = False
    assert train.build_model(config.train_config_from_dict(raw))[0].attention == "cudnn_causal"


@pytest.mark.gpu
def test_cudnn_causal_matches_dense_on_gpu():
    """The dispatcher's cuDNN path in bf16 equals the float32 dense reference within 1e-2 relative."""
    info, q, k, v, w = _case(2)
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    (_, o), grads = jax.jit(_loss(lambda q, k, v: attention.attend(q, k, v, info, info, "cudnn_causal"), w))(*bf)
    (_, o_ref), grads_ref = _loss(lambda q, k, v: attention._xla(q, k, v, masks.allowed(info, info)), w)(q, k, v)
    valid = np.asarray(info.valid)
    rel = lambda a, b: float(np.linalg.norm(np.float32(a) - b) / np.linalg.norm(b))
    assert rel(np.asarray(o)[valid], np.asarray(o_ref)[valid]) <= 1e-2
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert rel(g, g_ref) <= 1e-2
