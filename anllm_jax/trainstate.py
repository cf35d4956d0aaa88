"""The train state {step, params, opt_state}: its sharded shapes, a fresh start, and orbax checkpoints for exact
resume (the state plus every process's data-iterator position and the guard's reference), restorable on any mesh;
the run folder a job owns and locks; and the divergence guard, which decides which checkpoints are good.

Orbax writes each step into a temporary directory and renames it when complete, so a kill mid-write leaves the
previous checkpoint the latest one.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import errno
import json
import logging
import math
import os
import re
import shutil
import statistics
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

from anllm_jax import checkpoints, records, sharding
from anllm_jax.config import GuardConfig, ModelConfig, load_train_config
from anllm_jax.model import Llama
from anllm_jax.trainstep import make_optimizer

log = logging.getLogger(__name__)
RUN_WRITER = "anllm_jax.train"  # the run folder's manifest
EXPORT_WRITER = "anllm_jax.train export"  # <run>/model
DEAD_MARGIN = 0.1  # a loss back at ln(vocab) means a dead model once the recent median was this far below it


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


def gather_strings(text: str) -> list[str]:
    """Every process's `text`, in process order (a collective: all processes must call it)."""
    if jax.process_count() == 1:
        return [text]
    raw = np.frombuffer(text.encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.asarray([raw.size], np.int32))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: raw.size] = raw
    everything = multihost_utils.process_allgather(padded)
    return [bytes(everything[i, : int(lengths[i, 0])]).decode() for i in range(jax.process_count())]


_OUT_OF_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def _os_error(e: BaseException) -> tuple[int | None, str]:
    """(errno, its text) of a failed write: TensorStore puts it at the end of its message."""
    cause = e.__cause__ or e
    found = re.search(r"([^:\"]+) \[os_error_code='(\d+)'\]", str(cause))
    if found:
        return int(found.group(2)), found.group(1).strip()
    return getattr(cause, "errno", None), records.error_reason(e)


class Checkpoints:
    """Orbax manager for {train state, per-process data iterator states, the guard's reference}. Orbax writes
    each step into a temporary directory and renames it when complete, so a kill mid-write leaves the previous
    checkpoint the latest one. It keeps the newest `keep` steps that passed the guard (`Guard` checks step k's
    parameters on step k + 1) and every newer one not checked yet (`prune`), so a bad step never pushes out the
    last good one. A step found bad or unreadable moves to <run>/rejected/<step>, out of the way of resume and
    loading."""

    def __init__(self, directory: Path, keep: int, async_save: bool):
        self.directory, self.keep = directory.absolute(), keep
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True
            ),
            item_names=("state", "data"),
        )
        self.pending: tuple[int, int] | None = None  # (step, bytes) of the save in flight
        checkpoints.quiet_orbax()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict[str, Any], data_state: Any, guard: dict[str, Any]) -> None:
        """Start writing step `step` (after the previous save finished); a failed write is a one-line OSError."""
        states = gather_strings(json.dumps(_encode_state(data_state)))
        data = {"process_count": jax.process_count(), "states": [json.loads(s) for s in states], "guard": guard}
        self.wait()
        self.pending = (step, sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)))
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data))
        self._checked(lambda: self.manager.save(step, args=args, force=True))

    def prune(self, passed_through: int) -> None:
        """Delete all but the newest `keep` of the steps up to `passed_through`, the ones the guard passed."""
        passed = [s for s in self.manager.all_steps() if s <= passed_through]
        for step in sorted(passed)[: max(len(passed) - max(self.keep, 1), 0)]:
            self.manager.delete(step)

    def wait(self) -> None:
        self._checked(self.manager.wait_until_finished)
        self.pending = None

    def _checked(self, fn: Any) -> None:
        try:
            fn()
        except Exception as e:
            self._failed(e)

    def _failed(self, e: Exception) -> None:
        step, size = self.pending or (None, 0)
        self.pending = None
        if jax.process_index() == 0:  # the partial step is this program's own: free its space
            for tmp in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(tmp, ignore_errors=True)
        previous = [s for s in self.manager.all_steps() if s != step]
        kept = f"step {max(previous)} is intact and a rerun resumes from it" if previous else "no earlier step exists"
        code, reason = _os_error(e)
        if code in _OUT_OF_SPACE:
            free = shutil.disk_usage(self.directory).free
            raise OSError(
                f"out of disk space writing checkpoint step {step} to {self.directory} ({reason}): it needs about "
                f"{size / 2**20:,.1f} MiB and {free / 2**20:,.1f} MiB are free there; free space or move output_dir, "
                f"then rerun the same command ({kept})"
            ) from None
        raise OSError(f"checkpoint step {step} could not be written to {self.directory} ({reason}); {kept}") from None

    def _data_position(self, step: int, data: dict[str, Any]) -> Any:
        states = data["states"]
        if data["process_count"] == jax.process_count():
            return _decode_state(states[jax.process_index()])
        # With data.split_by=rows every process reads the same global stream, so the saved positions are equal
        # and any process count can go on from them.
        if all(s == states[0] for s in states):
            return _decode_state(states[0])
        raise ValueError(
            f"checkpoint step {step} was written by {data['process_count']} processes, each at its own position in "
            f"the data (data.split_by=documents), but this job has {jax.process_count()}; resume with the same "
            "process count (weights alone load with restore_train_state)"
        )

    def restore_newest(self, abstract_state: Any) -> tuple[int, dict[str, Any], Any, dict[str, Any]]:
        """(step, state, data position, guard reference) of the newest step that reads back whole; a newer step
        that does not (a truncated file) is named and moved to <run>/rejected/. With no older step to fall back
        on, the error names the unreadable one and nothing is moved."""
        while True:
            step = self.latest_step()
            args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
            try:
                out, reason = self.manager.restore(step, args=args), ""
            except Exception as e:  # orbax wraps TensorStore read errors in a bare Exception
                reason = records.error_reason(e)
            # Each process reads its own shards: all fall back together when any of them could not.
            reason = next((r for r in gather_strings(reason) if r), "")
            if not reason:
                return step, out["state"], self._data_position(step, out["data"]), out["data"].get("guard", {})
            older = [s for s in self.manager.all_steps() if s < step]
            if not older:
                raise ValueError(
                    f"checkpoint step {step} in {self.directory} cannot be read ({reason}); it is incomplete or "
                    f"corrupt and no earlier step exists: move {self.directory / str(step)} away to start afresh"
                )
            where = self.reject(step)
            log.warning("checkpoint step %d cannot be read (%s): moved to %s; resuming from step %d", step, reason,
                        where, max(older))  # fmt: skip

    def reject(self, step: int) -> Path:
        """Move step `step` out of the checkpoints (to <run>/rejected/<step>), so that resume and loading skip
        it; it is kept for inspection, never deleted."""
        target = self.directory.parent / "rejected" / str(step)
        if jax.process_index() == 0:
            target.parent.mkdir(exist_ok=True)
            n = 1
            while target.exists():
                target, n = target.with_name(f"{step}.{n}"), n + 1
            os.rename(self.directory / str(step), target)
        multihost_utils.sync_global_devices("checkpoint rejected")
        self.manager.reload()
        return target

    def close(self) -> None:
        # orbax's close() does not wait for its start-up cleanup of unfinished temporary checkpoints; a process that
        # stops right after start-up (a bad input) would see that thread fail at interpreter exit, with a traceback.
        pending = getattr(self.manager, "_cleanup_tmp_directory_future", None)
        if pending is not None:
            pending.result()
        with contextlib.suppress(Exception):  # a failed save in flight: save/wait report its error in one line
            self.manager.close()


# ---------------------------------------------------------------------------------------------------------------------
# The run folder and the guard that decides which checkpoints are good


def open_run_dir(run_dir: Path, export_model: bool) -> records.DirLock | None:
    """On the first process, before any work: the run folder is writable and this program's own (its manifest),
    no other job works in it (a lock naming host and pid, held until the job ends), what an interrupted export
    left is removed, and model/ is an export of this program. Every process gets the verdict."""
    lock, error = None, ""
    if jax.process_index() == 0:
        try:
            records.check_writable(run_dir, "output_dir/run_name")
            marker = json.dumps({"writer": RUN_WRITER})
            records.claim_dir(
                run_dir, RUN_WRITER, f"pick another output_dir or run_name; if it is a training run of an older "
                f"anllm_jax, mark it as one: echo '{marker}' > {run_dir / records.MANIFEST}",
            )  # fmt: skip
            lock = records.DirLock(run_dir)
            if lock.took_over is not None:
                owner = lock.took_over
                log.warning("%s: took over the lock of process %s on %s, which is gone", run_dir, owner.get("pid", "?"),
                            owner.get("host", "?"))  # fmt: skip
            for partial in [
                *run_dir.glob("model.tmp-*"),
                *(run_dir.glob("model.old-*") if (run_dir / "model").is_dir() else ()),
            ]:
                shutil.rmtree(partial)
                log.info("removed %s, left by an export that was interrupted", partial)
            if export_model:
                records.check_output_dir(run_dir / "model", EXPORT_WRITER, fix="move it away to export the model there")
        except ValueError as e:
            error = str(e)
            if lock is not None:
                lock.release()
    error = gather_strings(error)[0]
    if error:
        raise ValueError(error)
    return lock


def export_is_stale(run_dir: Path, step: int) -> bool:
    """Whether <run>/model is missing or holds another step than `step` (its manifest records the step)."""
    return (records.read_manifest(run_dir / "model") or {}).get("step") != step


class Guard:
    """Decides, step by step, whether the run has diverged (GuardConfig). Step k's row holds the loss and gradient
    norm of the parameters after step k - 1 (what checkpoint k - 1 holds) and whether step k's update left
    everything finite. So step k's row is what passes checkpoint k - 1, and a failed row condemns it as well
    (resuming from it would compute the same loss and gradient on the same batch), unless only the update itself
    overflowed, which a lower learning rate changes. Its reference (the recent losses) travels in every
    checkpoint, so the checks hold from the first step after a resume."""

    def __init__(self, cfg: GuardConfig, vocab_size: int, reference: dict[str, Any] | None = None) -> None:
        self.cfg, self.ln_vocab = cfg, math.log(vocab_size)
        reference = reference or {}
        self.recent = collections.deque(reference.get("recent", ()), maxlen=max(cfg.spike_window, 1))
        self.zero_grads = int(reference.get("zero_grads", 0))

    def reference(self) -> dict[str, Any]:
        return {"recent": list(self.recent), "zero_grads": self.zero_grads}

    def problem(self, row: dict[str, Any]) -> tuple[str, int] | None:
        """None, or (what is wrong, how many of the latest parameters it condemns: 0 = only this step's update,
        n = also the parameters of the previous n steps). A row without "grad_norm" checks parameters no step
        has trained on (the final ones) by their loss alone."""
        loss, grad_norm, c = row["loss"], row.get("grad_norm"), self.cfg
        if not math.isfinite(loss):
            return f"loss is {loss}", 1
        if grad_norm is not None and not math.isfinite(grad_norm):
            return f"the gradient norm is {grad_norm}", 1
        if row["finite"] < 1:
            return "the parameters or the optimizer state hold NaN or Inf after the update", 0
        if grad_norm is not None:
            self.zero_grads = self.zero_grads + 1 if grad_norm == 0 else 0
            if c.zero_grad_steps and self.zero_grads >= c.zero_grad_steps:
                return (
                    f"the gradient norm is 0 (loss {loss:.4f}; ln(vocab) {self.ln_vocab:.4f} is a uniform guess), so "
                    f"the model no longer learns (guard.zero_grad_steps={c.zero_grad_steps})"
                ), self.zero_grads
        median = statistics.median(self.recent) if self.recent else None
        if median is not None and abs(loss - self.ln_vocab) < 1e-3 and median < self.ln_vocab - DEAD_MARGIN:
            return (
                f"loss {loss:.4f} is back at ln(vocab), a uniform guess, from a median of {median:.4f}: the model died",
                1,
            )
        if (
            c.spike_factor
            and median is not None
            and len(self.recent) == c.spike_window
            and loss > c.spike_factor * median
        ):
            return (
                f"loss {loss:.4f} is {loss / median:.1f}x the median {median:.4f} of the previous "
                f"{c.spike_window} steps (guard.spike_factor={c.spike_factor:g})"
            ), 1
        self.recent.append(loss)
        return None

    def passed_through(self, step: int) -> int:
        """The newest step whose parameters the rows up to step `step`'s passed (a run of zero gradients could
        still condemn the ones it covers)."""
        return step - 1 - self.zero_grads


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
