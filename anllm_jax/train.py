"""Continual pretraining under the AnSAN mask: `python -m anllm_jax.train --config configs/X.yaml [key=value ...]`.

One jitted step (explicit in/out shardings, donated state, compiled once) over a (data, fsdp, tensor) mesh with
FSDP-sharded float32 master weights and AdamW state; compute runs in `ModelConfig.dtype`. Gradient accumulation
scans over micro-batches. The loss is next-token cross-entropy on every real token, anchors included; padding
(segment 0) and packed-document boundaries are excluded, and the model sees the segment ids, so the anchor mask
of its `anchor_mode` applies within each document.

Run directory `<output_dir>/<run_name>/`: config.yaml (resolved), model_config.json, tokenizer/, checkpoints/
(orbax, async, every N steps, at the end and on SIGTERM, the data iterator state in each), metrics.jsonl,
tensorboard/ and loss.png. Start order: the run's latest checkpoint, else `load_parameters_path` (weights only,
fresh optimizer), else a fresh init.

FLOP accounting (progress line, MFU): per token 6 * N_matmul (N_matmul = all parameters except an untied input
embedding table, whose lookup is free) plus causal dense attention 6 * n_layers * n_heads * head_dim * T
(forward QK^T and AV at half of T^2 each, backward twice the forward). The anchor mask is counted like causal.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import yaml
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from anllm_jax import checkpoints, data, masks, sharding
from anllm_jax.config import ModelConfig, OptimizerConfig, ProfileConfig, TrainConfig, load_train_config, preset
from anllm_jax.model import Llama
from anllm_jax.tokenizer import Tokenizer

log = logging.getLogger("anllm_jax.train")
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"

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


# ---------------------------------------------------------------------------------------------------------------------
# Optimizer and loss


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


# ---------------------------------------------------------------------------------------------------------------------
# Data


class SyntheticIterator:
    """Deterministic random batches for benchmarks and tests: rows of 1-3 packed documents, a padded tail on some
    rows, and anchors at random positions (about one token in 12). The global batch depends only on (seed, step),
    so any process count sees the same data; each process yields its block of rows."""

    def __init__(
        self,
        vocab_size: int,
        anchor_ids: tuple[int, ...],
        seq_len: int,
        global_batch_size: int,
        process_index: int = 0,
        process_count: int = 1,
        seed: int = 0,
    ):
        if global_batch_size % process_count:
            raise ValueError(f"global_batch_size={global_batch_size} is not divisible by {process_count} processes")
        self.vocab_size, self.anchor_ids, self.seq_len = vocab_size, anchor_ids, seq_len
        self.global_batch_size, self.seed, self.step = global_batch_size, seed, 0
        rows = global_batch_size // process_count
        self.rows = slice(process_index * rows, (process_index + 1) * rows)

    def __iter__(self) -> SyntheticIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.step])
        B, T = self.global_batch_size, self.seq_len
        tokens = rng.integers(3, self.vocab_size, (B, T), dtype=np.int32)
        if self.anchor_ids:
            anchor = rng.random((B, T)) < 1 / 12
            tokens[anchor] = rng.choice(np.asarray(self.anchor_ids, np.int32), int(anchor.sum()))
        segment_ids = np.zeros((B, T), np.int32)
        for b in range(B):
            cuts = np.sort(rng.choice(np.arange(1, T), rng.integers(0, 3), replace=False))
            end = T if rng.random() < 0.5 else int(rng.integers(T // 2, T + 1))
            for doc, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, T], strict=True), start=1):
                segment_ids[b, lo : min(hi, end)] = doc
        tokens[segment_ids == 0] = 0
        self.step += 1
        return {"tokens": tokens[self.rows], "segment_ids": segment_ids[self.rows]}

    def get_state(self) -> dict[str, int]:
        return {"step": self.step}

    def set_state(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


def _process_rows(batch_sharding: NamedSharding, global_batch: int, seq_len: int) -> tuple[int, int]:
    """(block index, number of blocks): the contiguous block of batch rows this process's devices hold."""
    slices = batch_sharding.addressable_devices_indices_map((global_batch, seq_len)).values()
    starts = [s[0].start or 0 for s in slices]
    stops = [global_batch if s[0].stop is None else s[0].stop for s in slices]
    lo, hi = min(starts), max(stops)
    rows = hi - lo
    if sum(b - a for a, b in {(a, b) for a, b in zip(starts, stops, strict=True)}) != rows or global_batch % rows:
        raise ValueError(
            "this mesh gives a process non-contiguous batch rows; put the process-spanning devices on the data/fsdp "
            "axes (mesh.dcn_* or the ici_* order)"
        )
    return lo // rows, global_batch // rows


def _encode_state(state: Any) -> Any:
    return {"__bytes__": base64.b64encode(state).decode()} if isinstance(state, bytes) else state


def _decode_state(state: Any) -> Any:
    return base64.b64decode(state["__bytes__"]) if isinstance(state, dict) and "__bytes__" in state else state


def _gather_strings(text: str) -> list[str]:
    """Every process's `text`, in process order (a collective: all processes must call it)."""
    if jax.process_count() == 1:
        return [text]
    raw = np.frombuffer(text.encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.asarray([raw.size], np.int32))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: raw.size] = raw
    everything = multihost_utils.process_allgather(padded)
    return [bytes(everything[i, : int(lengths[i, 0])]).decode() for i in range(jax.process_count())]


# ---------------------------------------------------------------------------------------------------------------------
# Model setup


def resolve_path(path: str) -> str:
    if path == "smollm2":
        return checkpoints.smollm2_gguf_path()
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"load_parameters_path {path} does not exist; give an HF dir, a GGUF file, a native "
            "checkpoint dir, or 'smollm2' for the packaged SmolLM2-135M"
        )
    return path


def load_tokenizer(path: str) -> Any:
    """A tokenizer from a saved/HF tokenizer directory, a tokenizer.json, or else a sentencepiece model file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"model.tokenizer_path {path} does not exist")
    if os.path.isdir(path):
        return Tokenizer.load(path)
    if path.endswith(".json"):
        return Tokenizer.from_tokenizer_json(path)
    return Tokenizer.from_sentencepiece(path)


def build_model(cfg: TrainConfig) -> tuple[ModelConfig, dict[str, Any] | None, Any]:
    """(model config, host parameters or None for a fresh init, tokenizer or None) with the anchor variant set."""
    m, mode = cfg.model, cfg.data.anchor_mode
    params = tokenizer = None
    if cfg.load_parameters_path:
        model, tokenizer = checkpoints.load(resolve_path(cfg.load_parameters_path))
        if mode == "ac" and model.cfg.anchor_mode != "ac":
            model, tokenizer = checkpoints.add_anchor_token(model, tokenizer, init=m.anchor_init)
        elif mode == "ep" and model.cfg.anchor_mode != "ep":
            model = checkpoints.set_anchor_mode(model, tokenizer, "ep", ep_strings=m.ep_strings)
        mcfg = model.cfg.replace(anchor_mode=mode, **m.overrides)
        params = jax.device_get(nnx.to_pure_dict(nnx.split(model, nnx.Param)[1]))
        want = jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(_abstract_params(mcfg)))
        if jax.tree.map(lambda x: x.shape, params) != want:
            raise ValueError(
                "model.overrides change parameter shapes of the loaded model; override only dtype, remat, "
                "attention, max_seq_len and similar"
            )
    else:
        mcfg = preset(m.preset, **m.overrides)
        if m.tokenizer_path:
            tokenizer = load_tokenizer(m.tokenizer_path)
            if mode == "ac":
                tokenizer.add_token("<AC>")
            if mode != "full":
                mcfg = mcfg.replace(anchor_ids=tuple(tokenizer.anchor_ids(mode, ep_strings=m.ep_strings)))
            if tokenizer.vocab_size > mcfg.vocab_size:
                raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but model vocab_size={mcfg.vocab_size}")
        mcfg = mcfg.replace(anchor_mode=mode)
    if mcfg.anchor_mode != "full" and not mcfg.anchor_ids:
        raise ValueError(
            f"data.anchor_mode={mcfg.anchor_mode} needs anchor ids: set load_parameters_path, "
            "model.tokenizer_path or model.overrides.anchor_ids"
        )
    if cfg.data.seq_len > mcfg.max_seq_len:
        raise ValueError(
            f"data.seq_len={cfg.data.seq_len} is longer than the model's max_seq_len={mcfg.max_seq_len}; lower "
            f"data.seq_len, or set model.overrides.max_seq_len={cfg.data.seq_len} to train at a longer context"
        )
    if mcfg.attention == "cudnn_causal" and cfg.data.packing:
        raise ValueError(
            "attention=cudnn_causal ignores the document boundaries of packed rows; "
            "set data.packing=false or use attention=cudnn"
        )
    return mcfg, params, tokenizer


def _abstract_params(mcfg: ModelConfig) -> nnx.State:
    return nnx.split(nnx.eval_shape(lambda: Llama(mcfg, rngs=nnx.Rngs(0))), nnx.Param)[1]


def _place(host_tree: Any, shardings: Any) -> Any:
    """Host arrays (identical on every process) -> global arrays with the given shardings."""
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]), host_tree, shardings
    )


def _host(x: jax.Array) -> np.ndarray:
    """A replicated global array as a host numpy array (works when not every shard is addressable)."""
    return np.asarray(x.addressable_shards[0].data)


# ---------------------------------------------------------------------------------------------------------------------
# The step


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
    anchor_ids = jnp.asarray(mcfg.anchor_ids, jnp.int32) if mcfg.anchor_mode != "full" else jnp.zeros((0,), jnp.int32)

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
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates), "opt_state": opt_state}
        return new_state, metrics

    return step


def make_eval_step(graphdef: nnx.GraphDef, mcfg: ModelConfig) -> Callable[..., dict[str, jax.Array]]:
    """Summed next-token NLL and target count under the full mask and under the AnSAN mask of the model's anchor
    ids. A full-attention model that knows anchor ids (a control run started from an EP checkpoint) is measured
    under their mask too, so its curve shows what training without the mask does to AnSAN perplexity."""
    ansan = "ansan" if mcfg.anchor_ids and mcfg.attention != "cudnn_causal" else None

    def step(params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        model = nnx.merge(graphdef, params)
        out = {}
        for name, mode in (("full", "full"), ("ansan", ansan)):
            logits = model(batch["tokens"], segment_ids_BT=batch["segment_ids"], anchor_mode=mode)
            out[f"{name}_nll"], out[f"{name}_count"] = next_token_nll(
                logits, batch["tokens"], batch["segment_ids"], mcfg.pad_id
            )
        return out

    return step


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints


class Checkpoints:
    """Orbax manager for {train state, per-process data iterator states}. Orbax writes each step into a temporary
    directory and renames it when complete, so a kill mid-write leaves the previous checkpoint the latest one."""

    def __init__(self, directory: Path, keep: int, async_save: bool):
        self.manager = ocp.CheckpointManager(
            directory.absolute(),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True
            ),
            item_names=("state", "data"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict[str, Any], data_state: Any) -> None:
        states = _gather_strings(json.dumps(_encode_state(data_state)))
        data = {"process_count": jax.process_count(), "states": [json.loads(s) for s in states]}
        self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)), force=True
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[dict[str, Any], Any]:
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
        )
        data = out["data"]
        if data["process_count"] != jax.process_count():
            raise ValueError(
                f"checkpoint step {step} was written by {data['process_count']} processes but this job has "
                f"{jax.process_count()}; resume with the same process count (weights alone load with "
                "restore_train_state)"
            )
        return out["state"], _decode_state(data["states"][jax.process_index()])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


# ---------------------------------------------------------------------------------------------------------------------
# Distributed


def initialize_distributed(cfg: TrainConfig) -> None:
    """jax.distributed from the config, else from JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID, else
    auto-detected on SLURM (more than one task) and multi-host TPU VMs; single-process otherwise."""
    d = cfg.distributed
    env = os.environ
    address = d.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    num = d.num_processes if d.num_processes is not None else _int_env("JAX_NUM_PROCESSES")
    pid = d.process_id if d.process_id is not None else _int_env("JAX_PROCESS_ID")
    slurm = int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env
    tpu_pod = "," in env.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in env
    if address or num is not None:
        if not (address and num is not None and pid is not None):
            raise ValueError(
                "distributed: set coordinator_address, num_processes and process_id together "
                "(config distributed.* or JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID)"
            )
        if num > 1:
            jax.distributed.initialize(address, num, pid, initialization_timeout=d.initialization_timeout)
    elif slurm or tpu_pod:
        jax.distributed.initialize(initialization_timeout=d.initialization_timeout)


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    return None if value is None else int(value)


# ---------------------------------------------------------------------------------------------------------------------
# The job


@dataclasses.dataclass
class _Progress:
    steps: int
    tokens_per_step: int
    flops_per_step: float
    n_devices: int
    peak: float | None
    run_start: float
    last_time: float
    done_since_start: int = 0


def _format_eta(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def _make_iterator(cfg: TrainConfig, mcfg: ModelConfig, tokenizer: Any, shard: int, n_shards: int) -> Any:
    if cfg.dataset_type == "synthetic":
        return SyntheticIterator(
            mcfg.vocab_size, mcfg.anchor_ids, cfg.data.seq_len, cfg.global_batch_size, shard, n_shards, cfg.seed
        )
    if tokenizer is None:
        raise ValueError("dataset_type=corpus needs a tokenizer: set load_parameters_path or model.tokenizer_path")
    return data.make_iterator(cfg.data, tokenizer, cfg.global_batch_size, shard, n_shards)


def restore_train_state(
    run_dir: str | Path, mesh: jax.sharding.Mesh | None = None, step: int | None = None
) -> tuple[ModelConfig, dict[str, Any]]:
    """(model config, train state {step, params, opt_state}) of a run's checkpoint, on any mesh and process count."""
    run_dir = Path(run_dir)
    cfg = load_train_config(str(run_dir / "config.yaml"))
    mcfg = ModelConfig.from_dict(json.loads((run_dir / "model_config.json").read_text()))
    mesh = mesh or sharding.make_mesh(cfg.mesh)
    shardings = abstract_state(mcfg, make_optimizer(cfg.optimizer, cfg.steps), mesh, sharding.axis_rules(cfg.mesh))
    ckpt = ocp.CheckpointManager((run_dir / "checkpoints").absolute(), item_names=("state", "data"))
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{run_dir}/checkpoints holds no checkpoint")
    state = ckpt.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(shardings)))["state"]
    ckpt.close()
    return mcfg, state


def abstract_state(mcfg: ModelConfig, tx: optax.GradientTransformation, mesh: Any, rules: Any) -> dict[str, Any]:
    """Abstract train state (ShapeDtypeStruct with sharding) for the model config."""
    abstract = _abstract_params(mcfg)
    p_shard = sharding.param_shardings(abstract, mesh, rules)
    p_shape = nnx.to_pure_dict(abstract)
    opt_shape = jax.eval_shape(tx.init, p_shape)
    rep = sharding.replicated(mesh)
    opt_shard = optax.tree_utils.tree_map_params(
        tx,
        lambda _, s: s,
        opt_shape,
        p_shard,
        transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": p_shape, "opt_state": opt_shape}
    shards = {"step": rep, "params": p_shard, "opt_state": opt_shard}
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shards)


def fresh_state(
    mcfg: ModelConfig, tx: optax.GradientTransformation, abstract: dict[str, Any], seed: int, host_params: Any = None
) -> dict[str, Any]:
    """Train state on the mesh of `abstract`: `host_params` (or a seeded init made directly in its shards), a fresh
    optimizer state and step 0."""
    shardings = jax.tree.map(lambda x: x.sharding, abstract)
    if host_params is None:
        init = jax.jit(
            lambda: nnx.to_pure_dict(nnx.split(Llama(mcfg, rngs=nnx.Rngs(params=seed)), nnx.Param)[1]),
            out_shardings=shardings["params"],
        )
        params = init()
    else:
        params = _place(host_params, shardings["params"])
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
    step0 = jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])
    return {"step": step0, "params": params, "opt_state": opt_state}


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
    the state donated; logs the compiled memory analysis."""
    shardings = jax.tree.map(lambda x: x.sharding, abstract)
    b_shard = sharding.batch_sharding(mesh, rules)
    micro_sharding = NamedSharding(mesh, PartitionSpec(None, sharding.batch_axes(rules), None))
    step_fn = make_train_step(graphdef, mcfg, tx, schedule, micro_batches, micro_sharding)
    batch_abstract = {
        k: jax.ShapeDtypeStruct(batch_shape, jnp.int32, sharding=b_shard) for k in ("tokens", "segment_ids")
    }
    t0 = time.time()
    compiled = (
        jax.jit(
            step_fn,
            in_shardings=(shardings, b_shard),
            out_shardings=(shardings, sharding.replicated(mesh)),
            donate_argnums=(0,),
        )
        .lower(abstract, batch_abstract)
        .compile()
    )
    _log_memory(compiled, time.time() - t0)
    return compiled


def train(cfg: TrainConfig, devices: list[Any] | None = None) -> dict[str, Any]:
    """Run the job; returns {history: per-step metric dicts, state: final train state, model_config, run_dir, ...}."""
    run_dir = Path(cfg.output_dir) / cfg.run_name
    primary = jax.process_index() == 0
    mesh = sharding.make_mesh(cfg.mesh, devices)
    rules = sharding.axis_rules(cfg.mesh)
    n_dev = mesh.devices.size
    b_axes = sharding.batch_axes(rules)
    n_batch_shards = math.prod(mesh.shape[a] for a in (b_axes if isinstance(b_axes, tuple) else (b_axes,)))
    if (cfg.global_batch_size // cfg.micro_batches) % n_batch_shards:
        raise ValueError(
            f"global_batch_size/micro_batches={cfg.global_batch_size // cfg.micro_batches} is not divisible by the "
            f"{n_batch_shards} batch shards of the mesh {dict(mesh.shape)}"
        )
    if cfg.dataset_type == "corpus":
        _ensure_corpus(cfg)
    ckpt = Checkpoints(run_dir / "checkpoints", cfg.checkpoint.keep, cfg.checkpoint.async_save)
    resume_step = ckpt.latest_step()

    if resume_step is not None:
        mcfg = ModelConfig.from_dict(json.loads((run_dir / "model_config.json").read_text()))
        tokenizer = _load_run_tokenizer(run_dir)
        host_params = None
    else:
        mcfg, host_params, tokenizer = build_model(cfg)
    if primary:
        # config.yaml follows the latest invocation (a resume may extend `steps`); the model and tokenizer are
        # fixed when the run starts.
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        if resume_step is None:
            (run_dir / "model_config.json").write_text(json.dumps(mcfg.to_dict(), indent=1))
            if tokenizer is not None:
                tokenizer.save(str(run_dir / "tokenizer"))
    multihost_utils.sync_global_devices("run_dir")

    tx = make_optimizer(cfg.optimizer, cfg.steps)
    abstract = abstract_state(mcfg, tx, mesh, rules)
    graphdef = nnx.split(nnx.eval_shape(lambda: Llama(mcfg, rngs=nnx.Rngs(0))))[0]

    data_state = None
    if resume_step is not None:
        state, data_state = ckpt.restore(resume_step, abstract)
        log.info("resumed from %s step %d", run_dir / "checkpoints", resume_step)
    else:
        state = fresh_state(mcfg, tx, abstract, cfg.seed, host_params)
        source = cfg.load_parameters_path if host_params is not None else f"a fresh init of {cfg.model.preset}"
        log.info("weights from %s (%.1fM parameters), fresh optimizer", source, mcfg.num_params() / 1e6)

    seq_len = cfg.data.seq_len
    b_shard = sharding.batch_sharding(mesh, rules)
    shard, n_shards = _process_rows(b_shard, cfg.global_batch_size, seq_len)
    iterator = _make_iterator(cfg, mcfg, tokenizer, shard, n_shards)
    if data_state is not None:
        iterator.set_state(data_state)
    compiled = compile_step(
        graphdef,
        mcfg,
        tx,
        lr_schedule(cfg.optimizer, cfg.steps),
        cfg.micro_batches,
        abstract,
        mesh,
        rules,
        (cfg.global_batch_size, seq_len),
    )
    rep = sharding.replicated(mesh)

    eval_batches = _eval_batches(cfg, tokenizer, b_shard) if cfg.eval.batches > 0 else None
    eval_fn = jax.jit(make_eval_step(graphdef, mcfg), out_shardings=rep) if eval_batches else None
    results: dict[str, Any] = {}
    writer = _tensorboard_writer(run_dir / "tensorboard") if primary else None
    metrics_file = open(run_dir / "metrics.jsonl", "a") if primary else None  # noqa: SIM115
    eval_file = open(run_dir / "eval.jsonl", "a") if primary and eval_batches else None  # noqa: SIM115

    def evaluate(step_no: int, when: str) -> dict[str, float]:
        ppl = _perplexity(eval_fn, state["params"], eval_batches, when)
        if eval_file is not None:
            eval_file.write(json.dumps({"step": step_no, "ppl_full": ppl["full"], "ppl_ansan": ppl["ansan"]}) + "\n")
            eval_file.flush()
        if writer is not None:
            for mask in ("full", "ansan"):
                writer.add_scalar(f"eval/ppl_{mask}", ppl[mask], step_no)
        return ppl

    if eval_batches and resume_step is None:
        results["eval_before"] = evaluate(0, "before training")

    stop = {"sigterm": False}
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(sigterm=True))
    fpt = flops_per_token(mcfg, seq_len)
    now = time.time()
    prog = _Progress(
        cfg.steps,
        cfg.global_batch_size * seq_len,
        fpt * cfg.global_batch_size * seq_len,
        n_dev,
        peak_flops(mesh.devices.flat[0].device_kind),
        now,
        now,
    )
    start = int(_host(state["step"]))
    if start >= cfg.steps:
        log.info("run %s is already complete at step %d; pass run_name=<new name> or a larger steps=", run_dir, start)
    last_saved = resume_step
    history: list[dict[str, Any]] = []
    pending: list[tuple[int, dict[str, jax.Array], int]] = []

    def flush(keep_last: int) -> None:
        while len(pending) > keep_last:
            step_no, m, batch_hash = pending.pop(0)
            row = {k: float(_host(v)) for k, v in m.items()}
            row.update(step=step_no, batch_crc=batch_hash, time=time.time())
            if not math.isfinite(row["loss"]):
                ckpt.wait()
                kept = (
                    f"the last good checkpoint is step {last_saved} in {run_dir / 'checkpoints'}"
                    if last_saved
                    else "no checkpoint was written"
                )
                raise FloatingPointError(
                    f"loss is {row['loss']} at step {step_no}; stopped without saving ({kept}); "
                    "lower optimizer.lr or check the data"
                )
            history.append(row)
            _report(row, prog, cfg.log_every, writer, metrics_file)

    profiler = _StepProfiler(cfg.profile, run_dir / "profile", primary)
    try:
        for step in range(start, cfg.steps):
            profiler.before(step + 1)
            batch = next(iterator)
            batch_hash = zlib.crc32(np.ascontiguousarray(batch["tokens"]).tobytes())
            global_batch = {
                k: jax.make_array_from_process_local_data(
                    b_shard, np.asarray(batch[k], np.int32), (cfg.global_batch_size, seq_len)
                )
                for k in ("tokens", "segment_ids")
            }
            state, metrics = compiled(state, global_batch)
            profiler.after(step + 1, metrics)
            pending.append((step + 1, metrics, batch_hash))
            flush(keep_last=1)
            sigterm = (
                stop["sigterm"]
                if jax.process_count() == 1
                else bool(multihost_utils.process_allgather(np.asarray(stop["sigterm"])).any())
            )
            every = cfg.eval.every_steps
            if eval_batches and every and (step + 1) % every == 0 and step + 1 < cfg.steps and not sigterm:
                flush(keep_last=0)
                t_eval = time.time()
                evaluate(step + 1, f"at step {step + 1}")
                prog.last_time += time.time() - t_eval  # keep evaluation out of the next step's throughput
            if (step + 1) % cfg.checkpoint.every_steps == 0 or step + 1 == cfg.steps or sigterm:
                flush(keep_last=0)
                ckpt.save(step + 1, state, iterator.get_state())
                last_saved = step + 1
            if sigterm:
                ckpt.wait()
                log.info("SIGTERM: saved checkpoint at step %d; rerun the same command to resume", step + 1)
                break
        flush(keep_last=0)
        ckpt.wait()
        if eval_batches and not stop["sigterm"]:  # a preempted job leaves its grace period to the checkpoint
            results["eval_after"] = evaluate(int(_host(state["step"])), "after training")
    finally:
        profiler.stop()
        signal.signal(signal.SIGTERM, previous_handler)
        ckpt.close()
        for f in (writer, metrics_file, eval_file):
            if f is not None:
                f.close()

    if cfg.checkpoint.export_model and history:
        _export_model(run_dir / "model", graphdef, state["params"], tokenizer)
    if primary and history:
        _plot_loss(run_dir)
    return {
        "preempted": stop["sigterm"],
        "history": history,
        "state": state,
        "model_config": mcfg,
        "run_dir": run_dir,
        "mesh": mesh,
        **results,
    }


class _StepProfiler:
    """Traces steps [first_step, first_step + steps) with jax.profiler on the first process."""

    def __init__(self, cfg: ProfileConfig, logdir: Path, primary: bool) -> None:
        self.first, self.last = cfg.first_step, cfg.first_step + cfg.steps - 1
        self.enabled = primary and cfg.steps > 0
        self.logdir, self.active = logdir, False

    def before(self, step: int) -> None:
        if self.enabled and step == self.first:
            jax.profiler.start_trace(str(self.logdir))
            self.active = True

    def after(self, step: int, metrics: Any) -> None:
        if self.active and step == self.last:
            jax.block_until_ready(metrics)  # the trace must hold the whole step, not just its dispatch
            self.stop()

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            log.info(
                "profile of steps %d-%d written to %s (open with xprof or TensorBoard)",
                self.first,
                self.last,
                self.logdir,
            )


def _export_model(directory: Path, graphdef: nnx.GraphDef, params: Any, tokenizer: Any) -> None:
    if jax.process_count() > 1:
        log.warning(
            "checkpoint.export_model needs a single process; export with restore_train_state and "
            "checkpoints.save instead"
        )
        return
    checkpoints.save(nnx.merge(graphdef, jax.device_get(params)), tokenizer, str(directory))
    log.info("model written to %s (python -m anllm_jax.generate / anllm_jax.eval read it)", directory)


def _ensure_corpus(cfg: TrainConfig) -> None:
    """Build the default registry corpus when the config points at its default location and it is missing."""
    try:
        data.dataset_dir(cfg.data.path)
    except FileNotFoundError:
        if Path(cfg.data.path) != Path(data.DataConfig().path):
            raise
        if jax.process_index() == 0:
            log.info("preparing the default corpus (registry text) in %s", cfg.data.path)
            data.prepare(output=cfg.data.path)
        multihost_utils.sync_global_devices("corpus")


def _load_run_tokenizer(run_dir: Path) -> Any:
    if not (run_dir / "tokenizer").exists():
        return None
    return Tokenizer.load(str(run_dir / "tokenizer"))


def _tensorboard_writer(logdir: Path) -> Any:
    # tensorboardX imports torch, when installed, only to accept torch tensors; keep torch (seconds of import, and
    # its CUDA runtime on GPU hosts) out of the JAX process.
    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        from tensorboardX import SummaryWriter
    finally:
        if blocked:
            del sys.modules["torch"]
    return SummaryWriter(str(logdir))


def _log_memory(compiled: Any, seconds: float) -> None:
    stats = compiled.memory_analysis()
    if stats is None:
        log.info("compiled train step in %.1f s", seconds)
        return
    gib = 1 / 2**30
    log.info(
        "compiled train step in %.1f s; per device: arguments %.3f GiB, outputs %.3f GiB, temporaries %.3f GiB, "
        "aliased (donated) %.3f GiB, code %.3f GiB",
        seconds,
        stats.argument_size_in_bytes * gib,
        stats.output_size_in_bytes * gib,
        stats.temp_size_in_bytes * gib,
        stats.alias_size_in_bytes * gib,
        stats.generated_code_size_in_bytes * gib,
    )


def _report(row: dict[str, Any], prog: _Progress, log_every: int, writer: Any, metrics_file: Any) -> None:
    now = row["time"]
    step_time = now - prog.last_time
    prog.last_time = now
    prog.done_since_start += 1
    row["step_time"] = step_time
    row["tokens_per_s"] = prog.tokens_per_step / step_time
    row["tflops_per_device"] = prog.flops_per_step / step_time / prog.n_devices / 1e12
    row["mfu"] = row["tflops_per_device"] * 1e12 / prog.peak if prog.peak else None
    row["anchor_density"] = row["anchors"] / max(row["real_tokens"], 1.0)
    if metrics_file is not None:
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()
    if writer is not None:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_device", "anchor_density"):
            writer.add_scalar(f"train/{key}", row[key], row["step"])
        if row["mfu"] is not None:
            writer.add_scalar("train/mfu", row["mfu"], row["step"])
    if row["step"] % log_every == 0 or row["step"] == prog.steps:
        eta = (prog.steps - row["step"]) * (now - prog.run_start) / prog.done_since_start
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
        log.info(
            "step %d/%d | loss %.4f | lr %.2e | grad norm %.3f | %.0f tok/s | %.3f TFLOP/s/device | MFU %s | "
            "anchors %.1f%% | ETA %s",
            row["step"],
            prog.steps,
            row["loss"],
            row["lr"],
            row["grad_norm"],
            row["tokens_per_s"],
            row["tflops_per_device"],
            mfu,
            100 * row["anchor_density"],
            _format_eta(eta),
        )


def _eval_batches(cfg: TrainConfig, tokenizer: Any, b_shard: NamedSharding) -> list[dict[str, jax.Array]]:
    """The first `eval.batches` batches of the validation split (rows cut as for training), as global batches."""
    n = cfg.eval.batch_size
    shard, n_shards = _process_rows(b_shard, n, cfg.data.seq_len)
    held_out = dataclasses.replace(cfg.data, split="validation", shuffle=False, num_epochs=1)
    batches = []
    for batch in data.make_iterator(held_out, tokenizer, n, shard, n_shards):
        batches.append(
            {k: jax.make_array_from_process_local_data(b_shard, v, (n, v.shape[1])) for k, v in batch.items()}
        )
        if len(batches) == cfg.eval.batches:
            break
    return batches


def _perplexity(eval_fn: Callable[..., Any], params: Any, batches: list[Any], when: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for batch in batches:
        for k, v in eval_fn(params, batch).items():
            totals[k] = totals.get(k, 0.0) + float(_host(v))
    ppl = {mask: math.exp(totals[f"{mask}_nll"] / max(totals[f"{mask}_count"], 1.0)) for mask in ("full", "ansan")}
    log.info(
        "held-out perplexity %s: full mask %.3f | AnSAN mask %.3f (%d tokens)",
        when,
        ppl["full"],
        ppl["ansan"],
        int(totals["full_count"]),
    )
    return ppl


def _plot_loss(run_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_step: dict[int, float] = {}
    with open(run_dir / "metrics.jsonl") as f:
        for line in f:
            row = json.loads(line)
            by_step[row["step"]] = row["loss"]
    steps = sorted(by_step)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [by_step[s] for s in steps])
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (next-token CE)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png", dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML train config (default: configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optimizer.lr=1e-4 steps=20")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    for noisy in ("absl", "jax"):  # orbax reports every save step at INFO, jax every backend it probes
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = load_train_config(args.config, args.overrides)
        initialize_distributed(cfg)
        if jax.process_index() != 0:
            logging.getLogger().setLevel(logging.WARNING)
        result = train(cfg)
        if result["preempted"]:
            sys.exit(143)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"anllm_jax.train: error: {e}", file=sys.stderr)
        sys.exit(1)
    log.info("run directory: %s", result["run_dir"])


if __name__ == "__main__":
    main()
