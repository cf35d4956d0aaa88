"""The train state {step, params, opt_state}: its sharded shapes, a fresh start, and orbax checkpoints for exact
resume (the state plus every process's data-iterator position), restorable on any mesh.

Orbax writes each step into a temporary directory and renames it when complete, so a kill mid-write leaves the
previous checkpoint the latest one.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from anllm_jax import records, sharding
from anllm_jax.config import ModelConfig, load_train_config
from anllm_jax.model import Llama
from anllm_jax.trainstep import make_optimizer


def abstract_params(mcfg: ModelConfig) -> nnx.State:
    return nnx.split(nnx.eval_shape(lambda: Llama(mcfg, rngs=nnx.Rngs(0))), nnx.Param)[1]


def abstract_state(mcfg: ModelConfig, tx: optax.GradientTransformation, mesh: Any, rules: Any) -> dict[str, Any]:
    """Abstract train state (ShapeDtypeStruct with sharding) for the model config."""
    abstract = abstract_params(mcfg)
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
        params = sharding.host_to_global(host_params, shardings["params"])
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
    step0 = sharding.host_to_global(np.zeros((), np.int32), shardings["step"])
    return {"step": step0, "params": params, "opt_state": opt_state}


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
        states = data["states"]
        if data["process_count"] == jax.process_count():
            return out["state"], _decode_state(states[jax.process_index()])
        # With data.split_by=rows every process reads the same global stream, so the saved positions are equal
        # and any process count can go on from them.
        if all(s == states[0] for s in states):
            return out["state"], _decode_state(states[0])
        raise ValueError(
            f"checkpoint step {step} was written by {data['process_count']} processes, each at its own position in "
            f"the data (data.split_by=documents), but this job has {jax.process_count()}; resume with the same "
            "process count (weights alone load with restore_train_state)"
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        # orbax's close() does not wait for its start-up cleanup of unfinished temporary checkpoints; a process that
        # stops right after start-up (a bad input) would see that thread fail at interpreter exit, with a traceback.
        pending = getattr(self.manager, "_cleanup_tmp_directory_future", None)
        if pending is not None:
            pending.result()
        self.manager.close()


def restore_train_state(
    run_dir: str | Path, mesh: jax.sharding.Mesh | None = None, step: int | None = None
) -> tuple[ModelConfig, dict[str, Any]]:
    """(model config, train state {step, params, opt_state}) of a run's checkpoint, on any mesh and process count."""
    run_dir = Path(run_dir)
    cfg = load_train_config(str(run_dir / "config.yaml"))
    mcfg = ModelConfig.from_dict(records.read_json(run_dir / "model_config.json"))
    mesh = mesh or sharding.make_mesh(cfg.mesh)
    shardings = abstract_state(mcfg, make_optimizer(cfg.optimizer, cfg.steps), mesh, sharding.axis_rules(cfg.mesh))
    ckpt = ocp.CheckpointManager((run_dir / "checkpoints").absolute(), item_names=("state", "data"))
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{run_dir}/checkpoints holds no checkpoint")
    state = ckpt.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(shardings)))["state"]
    ckpt.close()
    return mcfg, state
