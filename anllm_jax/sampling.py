"""Token sampling for generation: greedy, temperature, top-k and top-p, with stop ids, as jitted data.

Only `max_new_tokens` and greedy-or-not are static (each compiles its own decode loop); temperature, top_k,
top_p and the stop ids are arrays, so changing them recompiles nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

_MAX_STOP_IDS = 16


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sampling:
    """Sampling settings. Only max_new_tokens and greedy are static (compile a new loop); temperature,
    top_k (0: off), top_p (1.0: off) and stop_ids (int32 [16], -1 unused) are data. Build with `settings()`."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    stop_ids: jax.Array
    max_new_tokens: int = dataclasses.field(metadata={"static": True})
    greedy: bool = dataclasses.field(metadata={"static": True})


def settings(
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] = (),
) -> Sampling:
    """Checked sampling settings; temperature 0 is greedy."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy)")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 switches it off)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (1 switches it off)")
    stop = sorted({int(i) for i in stop_ids})
    if len(stop) > _MAX_STOP_IDS:
        raise ValueError(f"{len(stop)} stop ids given; at most {_MAX_STOP_IDS} are supported")
    return Sampling(
        temperature=jnp.float32(temperature),
        top_k=jnp.int32(top_k),
        top_p=jnp.float32(top_p),
        stop_ids=jnp.asarray(stop + [-1] * (_MAX_STOP_IDS - len(stop)), jnp.int32),
        max_new_tokens=int(max_new_tokens),
        greedy=temperature == 0.0,
    )


def truncate(x_BV: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """`x_BV` with -inf outside each row's top-k tokens and outside the smallest prefix of those whose mass reaches
    top_p (at least one token; ties at the cut kept). top_k (0: off) and top_p (1.0: off) are scalars or [B]."""
    V = x_BV.shape[-1]
    k_B1 = jnp.broadcast_to(top_k, x_BV.shape[:1])[:, None]
    p_B1 = jnp.broadcast_to(top_p, x_BV.shape[:1])[:, None]
    desc_BV = -jnp.sort(-x_BV, axis=-1)
    desc_BV = jnp.where(jnp.arange(V) < jnp.where(k_B1 > 0, jnp.minimum(k_B1, V), V), desc_BV, -jnp.inf)
    p_BV = jax.nn.softmax(desc_BV, axis=-1)
    n_keep_B1 = jnp.maximum(jnp.sum(jnp.cumsum(p_BV, axis=-1) - p_BV < p_B1, axis=-1, keepdims=True), 1)
    cut_B1 = jnp.take_along_axis(desc_BV, n_keep_B1 - 1, axis=-1)
    return jnp.where(x_BV < cut_B1, -jnp.inf, x_BV)


def sample(logits_BV: jax.Array, key: jax.Array, s: Sampling) -> tuple[jax.Array, jax.Array]:
    """Next tokens [B] and their log-probs under the unfiltered model distribution."""
    logp_BV = jax.nn.log_softmax(logits_BV, axis=-1)
    if s.greedy:
        tok_B = jnp.argmax(logits_BV, axis=-1)
    else:
        tok_B = jax.random.categorical(key, truncate(logits_BV / s.temperature, s.top_k, s.top_p), axis=-1)
    tok_B = tok_B.astype(jnp.int32)
    return tok_B, jnp.take_along_axis(logp_BV, tok_B[:, None], axis=-1)[:, 0]
