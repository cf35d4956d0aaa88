"""Llama-family decoder in Flax NNX, with the AnSAN mask and an optional KV-cache write path.

Layer weights are stacked along a leading `layers` axis and the forward pass scans over them, so compile
time does not grow with depth and the stack shards like any other axis. Every parameter carries logical
axis names (`out_sharding` metadata) from: vocab, embed, heads, kv_heads, head_dim, mlp, layers.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from anllm_jax import attention, masks
from anllm_jax.config import ModelConfig

# name: (shape function of the config, logical axes, initialiser kind)
_LAYER_PARAMS = {
    "attn_norm": (lambda c: (c.d_model,), ("embed",), "ones"),
    "wq": (lambda c: (c.d_model, c.n_heads, c.head_dim), ("embed", "heads", "head_dim"), "normal"),
    "wk": (lambda c: (c.d_model, c.n_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), "normal"),
    "wv": (lambda c: (c.d_model, c.n_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), "normal"),
    "wo": (lambda c: (c.n_heads, c.head_dim, c.d_model), ("heads", "head_dim", "embed"), "normal"),
    "mlp_norm": (lambda c: (c.d_model,), ("embed",), "ones"),
    "w_gate": (lambda c: (c.d_model, c.ffn_dim), ("embed", "mlp"), "normal"),
    "w_up": (lambda c: (c.d_model, c.ffn_dim), ("embed", "mlp"), "normal"),
    "w_down": (lambda c: (c.ffn_dim, c.d_model), ("mlp", "embed"), "normal"),
}

_REMAT = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _param(value: jax.Array, axes: tuple[str, ...]) -> nnx.Param:
    # Logical names only: a mesh and rules turn them into shardings at train time (sharding.py).
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def _init(kind: str, key: jax.Array, shape: tuple[int, ...], dtype: str) -> jax.Array:
    if kind == "ones":
        return jnp.ones(shape, dtype)
    return 0.02 * jax.random.normal(key, shape, dtype)


class Blocks(nnx.Module):
    """The decoder layers, each weight stacked to [n_layers, ...]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        for name, (shape_fn, axes, kind) in _LAYER_PARAMS.items():
            value = _init(kind, rngs.params(), (cfg.n_layers, *shape_fn(cfg)), cfg.param_dtype)
            setattr(self, name, _param(value, ("layers", *axes)))

    def arrays(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in _LAYER_PARAMS}


class Llama(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.policy:
            masks.parse_policy(cfg.policy)  # a bad spec fails here, not at the first forward
        self.cfg = cfg
        self.embed = _param(
            _init("normal", rngs.params(), (cfg.vocab_size, cfg.d_model), cfg.param_dtype), ("vocab", "embed")
        )
        self.blocks = Blocks(cfg, rngs=rngs)
        self.final_norm = _param(jnp.ones((cfg.d_model,), cfg.param_dtype), ("embed",))
        if not cfg.tie_embeddings:
            self.lm_head = _param(
                _init("normal", rngs.params(), (cfg.d_model, cfg.vocab_size), cfg.param_dtype), ("embed", "vocab")
            )

    def __call__(
        self,
        tokens_BT: jax.Array,
        *,
        segment_ids_BT: jax.Array | None = None,
        positions_BT: jax.Array | None = None,
        mask: str | masks.Policy = "model",
        logits_at_BK: jax.Array | None = None,
    ) -> jax.Array:
        """Logits float32[B, T, vocab] under the attention mask `mask` (see `mask_policy`); only at positions
        `logits_at_BK` ([B, K], giving [B, K, vocab]) when those are given.

        `segment_ids_BT` are packed-document ids (0 marks padding); positions restart in each document
        unless `positions_BT` is given.
        """
        policy = mask_policy(self.cfg, mask)
        anchor_ids = jnp.asarray(policy_anchor_ids(self.cfg, policy), jnp.int32)
        info = masks.token_info(tokens_BT, anchor_ids, self.cfg.pad_id, segment_ids_BT, policy.separator_ids)
        if positions_BT is None:
            positions_BT = positions_from_segments(segment_ids_BT, tokens_BT.shape)
        logits, _ = self.forward(tokens_BT, positions_BT, info, logits_at_BK=logits_at_BK, policy=policy)
        return logits

    def forward(
        self,
        tokens_BT: jax.Array,
        positions_BT: jax.Array,
        q_info: masks.TokenInfo,
        kv_cache: tuple[jax.Array, jax.Array] | None = None,
        k_info: masks.TokenInfo | None = None,
        write_start_B: jax.Array | None = None,
        logits_at_BK: jax.Array | None = None,
        policy: masks.Policy = masks.ANSAN_POLICY,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Shared forward pass under `policy`'s mask. Returns (logits float32[B, T, V], updated cache or None).

        `logits_at_BK` (int [B, K]) computes the output head only at those positions, giving [B, K, V]: the
        head is a fifth of a small model's FLOPs and most positions' logits are often not needed.

        Without a cache, the tokens attend to each other. With `kv_cache = (k, v)`, each [L, B, S, K, H],
        the new keys/values are written into each row at slot `write_start_B[b]` and the queries attend
        over the whole buffer, whose slots `k_info` describes (new slots included).
        """
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        x_BTD = jnp.take(self.embed[...], tokens_BT, axis=0).astype(dtype)
        cos_BTH, sin_BTH = rope_tables(cfg, positions_BT)
        if kv_cache is None:
            k_info = q_info

        def layer(carry, xs):
            # The cache rides in the carry, not in xs/ys: each layer writes only its new slots in place, where
            # xs -> ys would copy every layer's whole cache and hold two caches at once.
            x_BTD, kv = carry
            p, i = xs
            p = {name: w.astype(dtype) for name, w in p.items()}
            h = rms_norm(x_BTD, p["attn_norm"], cfg.rms_eps)
            q = apply_rope(matmul(h, p["wq"]), cos_BTH, sin_BTH)
            k = apply_rope(matmul(h, p["wk"]), cos_BTH, sin_BTH)
            v = matmul(h, p["wv"])
            if kv is not None:
                kv = (write_rows(kv[0], k, write_start_B, i), write_rows(kv[1], v, write_start_B, i))
                k, v = kv[0][i], kv[1][i]
            o = attention.attend(q, k, v, q_info, k_info, cfg.attention, policy)
            x_BTD = x_BTD + matmul(o, p["wo"], 2)
            h = rms_norm(x_BTD, p["mlp_norm"], cfg.rms_eps)
            g = jax.nn.silu(matmul(h, p["w_gate"]))
            u = matmul(h, p["w_up"])
            x_BTD = x_BTD + matmul(g * u, p["w_down"])
            return (x_BTD, kv), None

        if cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=_REMAT[cfg.remat], prevent_cse=False)
        layers = (self.blocks.arrays(), jnp.arange(cfg.n_layers, dtype=jnp.int32))
        (x_BTD, new_cache), _ = jax.lax.scan(layer, (x_BTD, kv_cache), layers)
        if logits_at_BK is not None:
            x_BTD = jnp.take_along_axis(x_BTD, logits_at_BK[..., None], axis=1)
        x_BTD = rms_norm(x_BTD, self.final_norm[...].astype(dtype), cfg.rms_eps)
        acc = jnp.promote_types(dtype, jnp.float32)
        head_DV = self.embed[...].T if cfg.tie_embeddings else self.lm_head[...]
        logits = matmul(x_BTD, head_DV.astype(dtype), preferred_element_type=acc)
        return logits, new_cache


def matmul(x: jax.Array, w: jax.Array, k: int = 1, preferred_element_type: jnp.dtype | None = None) -> jax.Array:
    """The last `k` axes of `x` contracted with the first `k` of `w`, as one 2-D matmul: XLA's CPU backend runs
    the weight gradient of a 2-D product ~2x faster than that of "btd,dnh->btnh" (two contracted axes)."""
    lead, out = x.shape[: x.ndim - k], w.shape[k:]
    y = jnp.matmul(
        x.reshape(math.prod(lead), -1), w.reshape(-1, math.prod(out)), preferred_element_type=preferred_element_type
    )
    return y.reshape(*lead, *out)


MASKS = ("model", "full", "anchor")


def mask_policy(cfg: ModelConfig, mask: str | masks.Policy = "model") -> masks.Policy:
    """The attention policy `mask` names for a model, checked against it: "full" plain causal; "anchor" AnSAN
    over the model's anchor ids (also for a full-attention model that knows anchor ids, e.g. to measure what it
    would lose under the mask); "model" the policy the model was set up with (`cfg.policy`, else causal when its
    anchor_mode is "full" and AnSAN otherwise); a `masks.Policy` itself."""
    if isinstance(mask, masks.Policy):
        policy = mask
    elif mask not in MASKS:
        raise ValueError(f"mask={mask!r} is not one of {', '.join(MASKS)} (or a masks.Policy)")
    elif mask == "full" or (mask == "model" and not cfg.policy and cfg.anchor_mode == "full"):
        return masks.FULL
    elif mask == "anchor":
        policy = masks.ANSAN_POLICY
    else:
        policy = masks.ANSAN_POLICY if not cfg.policy else masks.parse_policy(cfg.policy)
    if policy.name == "full":
        return policy
    what = "AnSAN" if policy.name == "ansan" else policy.name
    if cfg.attention == "cudnn_causal":
        raise ValueError(
            f"the {what} mask needs an attention path that reads it, but attention=cudnn_causal is plain "
            "causal; switch the model to attention=cudnn, xla, anchor or anchor_pallas"
        )
    if policy.reads_anchors and not cfg.anchor_ids:
        raise ValueError(
            f"the {what} mask needs anchor ids, but the model config "
            "has none; put the model in an anchor mode with checkpoints.set_anchor_mode(model, tokenizer, 'ep' or "
            "'ac')"
        )
    if policy.reads_separators and not policy.separator_ids:
        raise ValueError(
            f"policy {policy} needs separator ids; give them (separator_ids=... or the CLI's --separators)"
        )
    return policy


def policy_anchor_ids(cfg: ModelConfig, policy: masks.Policy) -> tuple[int, ...]:
    """The anchor ids that mark anchors under `policy`: the model's, for policies that read anchors."""
    return cfg.anchor_ids if policy.reads_anchors else ()


def mask_anchor_ids(cfg: ModelConfig, mask: str | masks.Policy = "model") -> tuple[int, ...]:
    """The anchor ids that decide attention under `mask`, the one place they are derived from a model config:
    none for "full" (plain causal) and for policies that do not read anchors, else the model's anchor ids."""
    return policy_anchor_ids(cfg, mask_policy(cfg, mask))


def write_rows(buf: jax.Array, new_BT: jax.Array, start_B: jax.Array, layer: jax.Array | None = None) -> jax.Array:
    """Write each row's new entries [B, T, ...] into buf [B, S, ...] (or into layer `layer` of a stacked cache
    buf [L, B, S, ...]) at the row's own slot offset; only the new entries are written.

    Entries that would land past slot S are dropped, so callers check capacity first.
    """
    B, T = new_BT.shape[:2]
    idx = (jnp.arange(B)[:, None], start_B[:, None] + jnp.arange(T, dtype=start_B.dtype))
    if layer is not None:
        idx = (layer, *idx)
    return buf.at[idx].set(new_BT.astype(buf.dtype), mode="drop")


def positions_from_segments(segment_ids_BT: jax.Array | None, shape: tuple[int, int]) -> jax.Array:
    """int32[B, T] positions: 0.. per row, restarting at each packed-document boundary."""
    idx_BT = jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32), shape)
    if segment_ids_BT is None:
        return idx_BT
    starts = jnp.concatenate([jnp.ones((shape[0], 1), bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
    return idx_BT - jax.lax.cummax(jnp.where(starts, idx_BT, 0), axis=1)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return x32.astype(x.dtype) * scale.astype(x.dtype)


@functools.cache
def inv_frequencies(cfg: ModelConfig) -> np.ndarray:
    """RoPE inverse frequencies [head_dim/2], with Llama-3 scaling when configured (as HF computes them)."""
    H = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, H, 2).astype(np.float32) / np.float32(H)))
    s = cfg.rope_scaling
    if s is None:
        return inv.astype(np.float32)
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(cfg: ModelConfig, positions_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, head_dim] (float32, float64 for a float64 model) in the HF rotate_half layout (frequencies
    repeated twice)."""
    ft = jnp.promote_types(cfg.dtype, jnp.float32)
    ang = positions_BT.astype(ft)[..., None] * jnp.asarray(inv_frequencies(cfg), ft)
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x_BTNH: jax.Array, cos_BTH: jax.Array, sin_BTH: jax.Array) -> jax.Array:
    x = x_BTNH.astype(jnp.promote_types(x_BTNH.dtype, jnp.float32))
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x * cos_BTH[:, :, None] + rotated * sin_BTH[:, :, None]
    return out.astype(x_BTNH.dtype)


def init_model(cfg: ModelConfig, seed: int = 0) -> Llama:
    return Llama(cfg, rngs=nnx.Rngs(params=seed))
