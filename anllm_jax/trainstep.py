"""The training step: AdamW with its schedule, the next-token loss, the jitted sharded step and the held-out
evaluation step, and the FLOP accounting of the progress line.

One jitted step (explicit in/out shardings, donated state, compiled once) over a (data, fsdp, tensor) mesh with
FSDP-sharded float32 master weights and AdamW state; compute runs in `ModelConfig.dtype`. Gradient accumulation
scans over micro-batches. The loss is next-token cross-entropy on every real token, anchors included; padding
(segment 0) and packed-document boundaries are excluded, and the model sees the segment ids, so the anchor mask
of its `anchor_mode` applies within each document.

FLOP accounting (progress line, MFU): per token 6 * N_matmul (N_matmul = all parameters except an untied input
embedding table, whose lookup is free) plus causal dense attention 6 * n_layers * n_heads * head_dim * T
(forward QK^T and AV at half of T^2 each, backward twice the forward). The anchor mask is counted like causal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from anllm_jax import masks, sharding
from anllm_jax.config import ModelConfig, OptimizerConfig
from anllm_jax.model import mask_anchor_ids

# Dense bf16 peak FLOP/s per device (no sparsity), matched as substrings of `device.device_kind`, longest first.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "B200": 2250e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def peak_flops(device_kind: str) -> float | None:
    """Peak dense bf16 FLOP/s of one device, or None when unknown (CPUs)."""
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):
        if name.lower() in device_kind.lower():
            return PEAK_FLOPS[name]
    return None


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), see the module docstring."""
    n_matmul = cfg.num_params() - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)
    attention = 6 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
    return 6 * n_matmul + attention


def lr_schedule(ocfg: OptimizerConfig, total_steps: int) -> Callable[[jax.Array], jax.Array]:
    """Linear warm-up to `lr` over `warmup_steps` (first step at lr/warmup), then constant, cosine or linear decay
    to lr * end_lr_fraction at `total_steps`."""
    warmup = max(ocfg.warmup_steps, 0)
    decay_steps = max(total_steps - warmup, 1)
    end = ocfg.end_lr_fraction

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warm = ocfg.lr * jnp.minimum(1.0, (step + 1) / max(warmup, 1))
        frac = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        if ocfg.schedule == "cosine":
            factor = end + (1 - end) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
        elif ocfg.schedule == "linear":
            factor = 1 - (1 - end) * frac
        else:
            factor = jnp.ones_like(frac)
        return jnp.where(step < warmup, warm, ocfg.lr * factor)

    return schedule


def decay_mask(ocfg: OptimizerConfig, params: Any) -> Any:
    """True for parameters that get weight decay: all but norms and embeddings unless configured."""

    def decays(path: tuple[Any, ...], _: Any) -> bool:
        name = str(getattr(path[-1], "key", path[-1]))
        if name.endswith("norm"):
            return ocfg.decay_norms
        if name == "embed":
            return ocfg.decay_embeddings
        return True

    return jax.tree.map_with_path(decays, params)


def make_optimizer(ocfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    adamw = optax.adamw(
        lr_schedule(ocfg, total_steps),
        b1=ocfg.b1,
        b2=ocfg.b2,
        eps=ocfg.eps,
        weight_decay=ocfg.weight_decay,
        mask=lambda p: decay_mask(ocfg, p),
    )
    return optax.chain(optax.clip_by_global_norm(ocfg.grad_clip), adamw) if ocfg.grad_clip > 0 else adamw


def next_token_nll(
    logits_BTV: jax.Array, tokens_BT: jax.Array, segment_ids_BT: jax.Array, pad_id: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """(sum of -log p(next token), number of targets). A target counts when it and its predecessor are real tokens
    of the same packed document: padding (segment 0) and document boundaries are excluded.

    Position t predicts token t + 1; the last position has no target and is masked rather than sliced off, since
    slicing would copy the [B, T, vocab] logits and their gradient."""
    next_BT = jnp.roll(tokens_BT, -1, axis=1)
    next_seg_BT = jnp.roll(segment_ids_BT, -1, axis=1)
    last_BT = jnp.arange(tokens_BT.shape[1]) == tokens_BT.shape[1] - 1
    valid_BT = (next_seg_BT == segment_ids_BT) & (segment_ids_BT != 0) & ~last_BT
    if pad_id is not None:
        valid_BT &= (next_BT != pad_id) & (tokens_BT != pad_id)
    logits_BTV = logits_BTV.astype(jnp.float32)
    logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, next_BT[..., None], axis=-1)[..., 0]
    nll = jnp.where(valid_BT, logz_BT - target_logit_BT, 0.0)
    return nll.sum(), valid_BT.sum().astype(jnp.float32)


def make_train_step(
    graphdef: nnx.GraphDef,
    mcfg: ModelConfig,
    tx: optax.GradientTransformation,
    schedule: Callable[[jax.Array], jax.Array],
    micro_batches: int,
    micro_sharding: NamedSharding,
) -> Callable[[dict[str, Any], dict[str, jax.Array]], tuple[dict[str, Any], dict[str, jax.Array]]]:
    """step(state, batch) -> (new state, metrics). state = {step, params, opt_state}; batch = {tokens, segment_ids}
    int32[G, T]. With k micro-batches, micro-batch i holds rows i, i+k, ... so each stays spread over the devices."""
    anchor_ids = jnp.asarray(mask_anchor_ids(mcfg), jnp.int32)

    def loss_sums(params: Any, tokens_BT: jax.Array, seg_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
        model = nnx.merge(graphdef, params)
        logits_BTV = model(tokens_BT, segment_ids_BT=seg_BT)
        return next_token_nll(logits_BTV, tokens_BT, seg_BT, mcfg.pad_id)

    grad_fn = jax.value_and_grad(loss_sums, has_aux=True)

    def step(state: dict[str, Any], batch: dict[str, jax.Array]) -> tuple[dict[str, Any], dict[str, jax.Array]]:
        params = state["params"]
        tokens, seg = batch["tokens"], batch["segment_ids"]
        if micro_batches == 1:
            (nll, count), grads = grad_fn(params, tokens, seg)
        else:
            G, T = tokens.shape

            def split(x: jax.Array) -> jax.Array:
                x = x.reshape(G // micro_batches, micro_batches, T).swapaxes(0, 1)
                return jax.lax.with_sharding_constraint(x, micro_sharding)

            def body(carry: Any, mb: tuple[jax.Array, jax.Array]) -> tuple[Any, None]:
                (nll_mb, count_mb), g = grad_fn(params, *mb)
                acc_nll, acc_count, acc_g = carry
                return (acc_nll + nll_mb, acc_count + count_mb, jax.tree.map(jnp.add, acc_g, g)), None

            zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
            (nll, count, grads), _ = jax.lax.scan(body, zeros, (split(tokens), split(seg)))
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        real = seg != 0
        metrics = {
            "loss": nll / denom,
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state["step"]),
            "targets": count,
            "real_tokens": real.sum(),
            "anchors": (masks.is_anchor(tokens, anchor_ids) & real).sum(),
        }
        new_params = optax.apply_updates(params, updates)
        # Read back with the loss, so that a state with a NaN or Inf anywhere is never checkpointed or exported.
        metrics["finite"] = all_finite((new_params, opt_state))
        new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
        return new_state, metrics

    return step


def all_finite(tree: Any) -> jax.Array:
    """bool scalar: every floating-point entry of the pytree is finite."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


def make_eval_step(graphdef: nnx.GraphDef, mcfg: ModelConfig) -> Callable[..., dict[str, jax.Array]]:
    """Summed next-token NLL and target count under the full mask and under the AnSAN mask of the model's anchor
    ids. A full-attention model that knows anchor ids (a control run started from an EP checkpoint) is measured
    under their mask too, so its curve shows what training without the mask does to AnSAN perplexity."""
    ansan = "anchor" if mcfg.anchor_ids and mcfg.attention != "cudnn_causal" else "model"

    def step(params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        model = nnx.merge(graphdef, params)
        out = {}
        for name, mask in (("full", "full"), ("ansan", ansan)):
            logits = model(batch["tokens"], segment_ids_BT=batch["segment_ids"], mask=mask)
            out[f"{name}_nll"], out[f"{name}_count"] = next_token_nll(
                logits, batch["tokens"], batch["segment_ids"], mcfg.pad_id
            )
        return out

    return step


def compile_step(
    graphdef: nnx.GraphDef,
    mcfg: ModelConfig,
    tx: optax.GradientTransformation,
    schedule: Callable[[jax.Array], jax.Array],
    micro_batches: int,
    abstract: dict[str, Any],
    mesh: jax.sharding.Mesh,
    rules: tuple[tuple[str, Any], ...],
    batch_shape: tuple[int, int],
) -> Any:
    """The train step compiled once for the state's shardings and [G, T] batches split over the batch axes, with
    the state donated."""
    shardings = jax.tree.map(lambda x: x.sharding, abstract)
    b_shard = sharding.batch_sharding(mesh, rules)
    micro_sharding = NamedSharding(mesh, PartitionSpec(None, sharding.batch_axes(rules), None))
    step_fn = make_train_step(graphdef, mcfg, tx, schedule, micro_batches, micro_sharding)
    batch_abstract = {
        k: jax.ShapeDtypeStruct(batch_shape, jnp.int32, sharding=b_shard) for k in ("tokens", "segment_ids")
    }
    return (
        jax.jit(
            step_fn,
            in_shardings=(shardings, b_shard),
            out_shardings=(shardings, sharding.replicated(mesh)),
            donate_argnums=(0,),
        )
        .lower(abstract, batch_abstract)
        .compile()
    )
