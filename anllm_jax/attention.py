"""Attention backends behind one dispatcher.

Every backend takes queries [B, T, N, H], keys and values [B, S, K, H] (grouped-query: N is a multiple of K),
the `TokenInfo` of the query and key positions and a `masks.Policy`, and computes softmax attention under the
policy's mask (`masks.allowed`, AnSAN, by default). The dense paths run any policy; the sparse paths run the
policies whose keys are all in the query's sentence or anchors (`Policy.within_ansan`).

`cudnn_causal` is the one backend that does not read the rule: cuDNN's mask-free causal flash attention over
each row's valid prefix. It equals the rule only for anchor-free rows holding one document followed by padding,
which the config enforces (anchor_mode "full", no packing); it is the speed AnSAN training is measured against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from anllm_jax import anchor_attention, masks

# Finite, so a fully masked row (padding) softmaxes to a uniform row instead of NaN.
_MASKED = -1e30


def attend(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    q_info: masks.TokenInfo,
    k_info: masks.TokenInfo,
    impl: str = "xla",
    policy: masks.Policy = masks.ANSAN_POLICY,
) -> jax.Array:
    """Attention under `policy`'s mask; returns [B, T, N, H] in the dtype of the queries."""
    if impl == "xla":
        return _xla(q_BTNH, k_BSKH, v_BSKH, policy.mask(q_info, k_info))
    if impl == "cudnn":
        return _cudnn(q_BTNH, k_BSKH, v_BSKH, policy.mask(q_info, k_info))
    if impl in ("cudnn_causal", "anchor", "anchor_pallas"):
        # These serve self-attention; queries against a KV cache take the dense path.
        if q_info is not k_info or q_BTNH.shape[1] != k_BSKH.shape[1]:
            return _xla(q_BTNH, k_BSKH, v_BSKH, policy.mask(q_info, k_info))
        if impl == "cudnn_causal":
            return _causal(q_BTNH, k_BSKH, v_BSKH, q_info, "cudnn")
        # The Pallas kernels hard-wire AnSAN (on rows without anchors: causal); the JAX path takes the mask.
        if not policy.within_ansan or (impl == "anchor_pallas" and policy.name not in ("full", "ansan")):
            raise ValueError(
                f"attention={impl} computes {'full and ansan' if impl == 'anchor_pallas' else 'AnSAN-shaped'} "
                f"masks only, not policy {policy}; use attention=xla or cudnn for it"
            )
        kernel = "pallas" if impl == "anchor_pallas" else "jax"
        # The full policy's rows carry no anchor flags (`model.policy_anchor_ids`), where AnSAN is causal.
        rule = masks.ANSAN if policy.name == "full" else policy.mask
        return anchor_attention.anchor_attention(q_BTNH, k_BSKH, v_BSKH, q_info, kernel=kernel, rule=rule)
    raise ValueError(f"unknown attention impl {impl!r}; choose xla, cudnn, cudnn_causal, anchor or anchor_pallas")


def _xla(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask_BTS: jax.Array) -> jax.Array:
    """Dense reference: float32 (or wider) scores and softmax, mask applied with `where`.

    Heads lead and each KV head's G query heads are stacked along the query axis, so both products are plain
    batched matmuls over [B, K]: XLA's CPU backend runs this layout (forward and backward) ~3x faster than
    contracting the 5-D [B, T, K, G, H] tensors directly.
    """
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1:3]
    G = N // K
    q_BKQH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
    k_BKSH, v_BKSH = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)
    acc = jnp.promote_types(q_BTNH.dtype, jnp.float32)  # float64 inputs (a numerical reference) stay float64
    s_BKGTS = jnp.einsum("bkqh,bksh->bkqs", q_BKQH, k_BKSH, preferred_element_type=acc).reshape(B, K, G, T, S)
    s_BKGTS = jnp.where(mask_BTS[:, None, None], s_BKGTS * (H**-0.5), _MASKED)
    p_BKQS = jax.nn.softmax(s_BKGTS, axis=-1).reshape(B, K, G * T, S)
    o_BKQH = jnp.einsum("bkqs,bksh->bkqh", p_BKQS.astype(v_BSKH.dtype), v_BKSH, preferred_element_type=acc)
    o_BTNH = o_BKQH.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)
    return o_BTNH.astype(q_BTNH.dtype)


def _cudnn(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask_BTS: jax.Array) -> jax.Array:
    """cuDNN fused attention (GPU, bf16/fp16); the AnSAN mask becomes a dense bias inside cuDNN."""
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None], implementation="cudnn")


def _causal(
    q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, info: masks.TokenInfo, implementation: str | None
) -> jax.Array:
    """Causal attention within each row's first sum(valid) tokens, without a mask array (cuDNN's flash path).

    Padded queries' outputs are unspecified (no valid query reads them); valid queries never see padded keys.
    """
    lengths_B = jnp.sum(info.valid, axis=1, dtype=jnp.int32)
    return jax.nn.dot_product_attention(
        q_BTNH,
        k_BSKH,
        v_BSKH,
        is_causal=True,
        query_seq_lengths=lengths_B,
        key_value_seq_lengths=lengths_B,
        implementation=implementation,
    )
