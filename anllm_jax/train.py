"""Continual pretraining under the AnSAN mask: `python -m anllm_jax.train --config configs/X.yaml [key=value ...]`.

The job: set-up (mesh, model, train state, data, compiled step), the loop (steps, periodic held-out evaluation,
checkpoints, SIGTERM), the finish (final evaluation, exported model, loss plot) and the CLI. The step itself is in
trainstep.py, the state and its checkpoints in trainstate.py, and what the run reports in trainlog.py.

Run directory `<output_dir>/<run_name>/`: config.yaml (resolved), model_config.json, tokenizer/, checkpoints/
(orbax, async, every N steps, at the end and on SIGTERM, the data iterator state in each), metrics.jsonl,
eval.jsonl, tensorboard/ and loss.png. Start order: the run's latest checkpoint, else `load_parameters_path`
(weights only, fresh optimizer), else a fresh init.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import signal
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from anllm_jax import checkpoints, data, records, sharding, trainlog, trainstate, trainstep
from anllm_jax.config import RESUME_KEYS, ModelConfig, TrainConfig, load_train_config, preset
from anllm_jax.model import Llama
from anllm_jax.tokenizer import AC_TOKEN, Tokenizer

log = logging.getLogger("anllm_jax.train")
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
# Settings a resume checks against the run's start, beside the data settings of config.RESUME_KEYS; of the
# model.overrides, those that change how the model computes but not what it is apply on resume.
MODEL_KEYS = ("load_parameters_path", "model.preset", "model.tokenizer_path", "model.anchor_init", "model.ep_strings")
APPLIED_ON_RESUME = ("dtype", "remat", "attention", "max_seq_len")


# ---------------------------------------------------------------------------------------------------------------------
# Model and data


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
        model, tokenizer = checkpoints.set_anchor_mode(model, tokenizer, mode, m.ep_strings, m.anchor_init)
        mcfg = model.cfg.replace(**m.overrides)
        params = jax.device_get(nnx.to_pure_dict(nnx.split(model, nnx.Param)[1]))
        want = jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(trainstate.abstract_params(mcfg)))
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
                tokenizer.add_token(AC_TOKEN)
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


def _make_iterator(cfg: TrainConfig, mcfg: ModelConfig, tokenizer: Any, shard: int, n_shards: int) -> Any:
    if cfg.dataset_type == "synthetic":
        return data.SyntheticIterator(
            mcfg.vocab_size, mcfg.anchor_ids, cfg.data.seq_len, cfg.global_batch_size, shard, n_shards, cfg.seed
        )
    if tokenizer is None:
        raise ValueError("dataset_type=corpus needs a tokenizer: set load_parameters_path or model.tokenizer_path")
    return data.make_iterator(cfg.data, tokenizer, cfg.global_batch_size, shard, n_shards)


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


def _eval_batches(cfg: TrainConfig, tokenizer: Any, b_shard: NamedSharding) -> list[dict[str, jax.Array]]:
    """The first `eval.batches` batches of the validation split (rows cut as for training), as global batches.
    Every process reads the same whole batches and keeps its devices' rows, so the held-out set, and with it the
    perplexity, is the same for any number of processes and devices."""
    n = cfg.eval.batch_size
    held_out = dataclasses.replace(cfg.data, split="validation", shuffle=False, num_epochs=1, split_by="rows")
    batches = []
    for batch in data.make_iterator(held_out, tokenizer, n, 0, 1):
        batches.append(sharding.host_to_global(batch, {k: b_shard for k in batch}))
        if len(batches) == cfg.eval.batches:
            break
    return batches


def _export_model(job: Job, step: int) -> None:
    """<run>/model: the parameters of `step` (a native checkpoint whose manifest records the step, so that a rerun
    and `checkpoints.load` see whether it is older than the newest checkpoint)."""
    if jax.process_count() > 1:
        log.warning(
            "checkpoint.export_model needs a single process; export with restore_train_state and "
            "checkpoints.save instead"
        )
        return
    model = nnx.merge(job.graphdef, jax.device_get(job.state["params"]))
    checkpoints.save(model, job.tokenizer, str(job.run_dir / "model"), writer=trainstate.EXPORT_WRITER, step=step)
    log.info("model of step %d written to %s (python -m anllm_jax.generate / anllm_jax.eval read it)", step,
             job.run_dir / "model")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# The job


@dataclasses.dataclass
class Job:
    """What the loop works on, built once by `setup`."""

    cfg: TrainConfig
    run_dir: Path
    mcfg: ModelConfig
    tokenizer: Any
    graphdef: nnx.GraphDef
    state: dict[str, Any]
    iterator: Any
    compiled: Any
    batch_sharding: NamedSharding
    ckpt: trainstate.Checkpoints
    runlog: trainlog.RunLog
    eval_fn: Any
    eval_batches: list[dict[str, jax.Array]] | None
    last_saved: int | None
    guard: trainstate.Guard
    lock: records.DirLock | None = None
    results: dict[str, Any] = dataclasses.field(default_factory=dict)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    stop_signal: str = ""  # "SIGTERM" or "SIGINT" once one stopped the loop
    last_batch: dict[str, jax.Array] | None = None


def _check_batch(cfg: TrainConfig, mesh: jax.sharding.Mesh, rules: Any) -> None:
    b_axes = sharding.batch_axes(rules)
    n_batch_shards = math.prod(mesh.shape[a] for a in (b_axes if isinstance(b_axes, tuple) else (b_axes,)))
    if (cfg.global_batch_size // cfg.micro_batches) % n_batch_shards:
        raise ValueError(
            f"global_batch_size/micro_batches={cfg.global_batch_size // cfg.micro_batches} is not divisible by the "
            f"{n_batch_shards} batch shards of the mesh {dict(mesh.shape)}"
        )


def _setting(cfg: TrainConfig, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _resumes_data(cfg: TrainConfig, old: TrainConfig, run_dir: Path) -> bool:
    """Whether the data iterator goes on from the checkpoint's position: the settings that decide the data stream
    must be those of the run's previous invocation (`old`); `resume_with_new_data` accepts a change and restarts
    the stream (the weights and optimizer still resume)."""
    differ = [
        f"{k} {_setting(old, k)!r} -> {_setting(cfg, k)!r}" for k in RESUME_KEYS if _setting(old, k) != _setting(cfg, k)
    ]
    if not differ:
        return True
    if cfg.resume_with_new_data:
        log.warning("resuming %s with changed data settings (%s): the data stream starts afresh", run_dir, differ)
        return False
    raise ValueError(
        f"{run_dir} resumes with other data settings ({'; '.join(differ)}), which would not continue its data "
        "stream; restore them, pass resume_with_new_data=true to keep the weights and restart the data, or pick "
        "another run_name"
    )


def _resumed_model(cfg: TrainConfig, old: TrainConfig, run_dir: Path) -> ModelConfig:
    """The run's model (model_config.json) with the model.overrides a resume may change (APPLIED_ON_RESUME: how it
    computes, not what it is); any other changed model setting is refused, since the checkpoint holds the weights
    and optimizer state of the model the run started with."""
    differ = [
        f"{k} {_setting(old, k)!r} -> {_setting(cfg, k)!r}" for k in MODEL_KEYS if _setting(old, k) != _setting(cfg, k)
    ]
    new_o, old_o = cfg.model.overrides, old.model.overrides
    for key in sorted(set(new_o) | set(old_o)):
        if new_o.get(key, "<unset>") != old_o.get(key, "<unset>") and not (key in APPLIED_ON_RESUME and key in new_o):
            differ.append(f"model.overrides.{key} {old_o.get(key, '<unset>')!r} -> {new_o.get(key, '<unset>')!r}")
    if differ:
        raise ValueError(
            f"{run_dir} was started with other model settings ({'; '.join(differ)}), which its checkpoints cannot "
            f"take; restore them or pick another run_name (a resume may change model.overrides."
            f"{'/'.join(APPLIED_ON_RESUME)})"
        )
    applied = {k: new_o[k] for k in APPLIED_ON_RESUME if k in new_o}
    return ModelConfig.from_dict(records.read_json(run_dir / "model_config.json")).replace(**applied)


def _run_settings(cfg: TrainConfig, run_dir: Path, resume: bool) -> tuple[ModelConfig, Any, Any, bool]:
    """(model config, host parameters or None, tokenizer, whether the data iterator resumes): the run's own on
    resume (checked against its previous invocation's config.yaml), else built from the config."""
    if not resume:
        return *build_model(cfg), False
    old = load_train_config(str(run_dir / "config.yaml"))
    resume_data = _resumes_data(cfg, old, run_dir)
    mcfg = _resumed_model(cfg, old, run_dir)
    tokenizer = Tokenizer.load(str(run_dir / "tokenizer")) if (run_dir / "tokenizer").exists() else None
    return mcfg, None, tokenizer, resume_data


def _write_run_files(cfg: TrainConfig, run_dir: Path, mcfg: ModelConfig, tokenizer: Any, new_run: bool) -> None:
    """After the state was restored or made: config.yaml follows the latest invocation (a resume may extend
    `steps`); the model config and tokenizer are fixed when the run starts. Written atomically by the first
    process."""
    multihost_utils.sync_global_devices("run_dir checked")  # every process read the old config.yaml
    if jax.process_index() == 0:
        records.write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        if new_run:
            records.write_json(run_dir / "model_config.json", mcfg.to_dict())
            if tokenizer is not None:
                tokenizer.save(str(run_dir / "tokenizer"))
    multihost_utils.sync_global_devices("run_dir")


def setup(cfg: TrainConfig, devices: list[Any] | None = None) -> Job:
    """Mesh, model, train state (restored or fresh), data iterator (at its saved position), compiled step, held-out
    batches and the run log."""
    run_dir = Path(cfg.output_dir) / cfg.run_name
    mesh = sharding.make_mesh(cfg.mesh, devices)
    rules = sharding.axis_rules(cfg.mesh)
    _check_batch(cfg, mesh, rules)
    if not (math.isfinite(cfg.optimizer.lr) and cfg.optimizer.lr >= 0):
        raise ValueError(f"optimizer.lr={cfg.optimizer.lr} must be a finite number >= 0, e.g. optimizer.lr=2e-5")
    lock = trainstate.open_run_dir(run_dir, cfg.checkpoint.export_model)
    ckpt = None
    try:
        if cfg.dataset_type == "corpus":
            _ensure_corpus(cfg)
        ckpt = trainstate.Checkpoints(run_dir / "checkpoints", cfg.checkpoint.keep, cfg.checkpoint.async_save)
        return _build_job(cfg, run_dir, mesh, rules, ckpt, lock)
    except BaseException:
        if ckpt is not None:
            ckpt.close()  # an open orbax manager would print its threads' shutdown tracebacks after the error
        if lock is not None:
            lock.release()
        raise


def _build_job(
    cfg: TrainConfig, run_dir: Path, mesh: jax.sharding.Mesh, rules: Any, ckpt: Any, lock: records.DirLock | None
) -> Job:
    resume = ckpt.latest_step() is not None
    mcfg, host_params, tokenizer, resume_data = _run_settings(cfg, run_dir, resume)

    tx = trainstep.make_optimizer(cfg.optimizer, cfg.steps)
    abstract = trainstate.abstract_state(mcfg, tx, mesh, rules)
    graphdef = nnx.split(nnx.eval_shape(lambda: Llama(mcfg, rngs=nnx.Rngs(0))))[0]
    data_state, resume_step, reference = None, None, {}
    if resume:
        resume_step, state, data_state, reference = ckpt.restore_newest(abstract)
        log.info("resumed from %s step %d", run_dir / "checkpoints", resume_step)
    else:
        state = trainstate.fresh_state(mcfg, tx, abstract, cfg.seed, host_params)
        source = cfg.load_parameters_path if host_params is not None else f"a fresh init of {cfg.model.preset}"
        log.info("weights from %s (%.1fM parameters), fresh optimizer", source, mcfg.num_params() / 1e6)
    _write_run_files(cfg, run_dir, mcfg, tokenizer, new_run=not resume)

    seq_len = cfg.data.seq_len
    b_shard = sharding.batch_sharding(mesh, rules)
    iterator = _make_iterator(cfg, mcfg, tokenizer, *sharding.process_rows(b_shard, cfg.global_batch_size, seq_len))
    if data_state is not None and resume_data:
        iterator.set_state(data_state)
    t0 = time.time()
    compiled = trainstep.compile_step(
        graphdef, mcfg, tx, trainstep.lr_schedule(cfg.optimizer, cfg.steps), cfg.micro_batches, abstract, mesh,
        rules, (cfg.global_batch_size, seq_len),
    )  # fmt: skip
    trainlog.log_compiled(compiled, time.time() - t0)
    eval_batches = _eval_batches(cfg, tokenizer, b_shard) if cfg.eval.batches > 0 else None
    eval_fn = (
        jax.jit(trainstep.make_eval_step(graphdef, mcfg), out_shardings=sharding.replicated(mesh))
        if eval_batches
        else None
    )
    tokens = cfg.global_batch_size * seq_len
    runlog = trainlog.RunLog(
        run_dir, jax.process_index() == 0, cfg.steps, cfg.log_every, tokens,
        trainstep.flops_per_token(mcfg, seq_len) * tokens, mesh.devices.size,
        trainstep.peak_flops(mesh.devices.flat[0].device_kind),
    )  # fmt: skip
    return Job(
        cfg, run_dir, mcfg, tokenizer, graphdef, state, iterator, compiled, b_shard, ckpt, runlog, eval_fn,
        eval_batches, resume_step, trainstate.Guard(cfg.guard, mcfg.vocab_size, reference), lock,
    )  # fmt: skip


def evaluate(job: Job, step_no: int, when: str) -> dict[str, float]:
    """Held-out perplexity under the full and the AnSAN mask, recorded in the run log."""
    totals: dict[str, float] = {}
    for batch in job.eval_batches or ():
        for k, v in job.eval_fn(job.state["params"], batch).items():
            totals[k] = totals.get(k, 0.0) + float(sharding.host_value(v))
    ppl = {mask: math.exp(totals[f"{mask}_nll"] / max(totals[f"{mask}_count"], 1.0)) for mask in ("full", "ansan")}
    job.runlog.evaluation(step_no, ppl, int(totals["full_count"]), when)
    return ppl


def _stop_diverged(job: Job, problem: str, condemned: int, step_no: int, when: str) -> None:
    """Stop the run: checkpoints holding condemned parameters (of steps >= step_no - condemned) move to
    <run>/rejected/, and the error names the newest remaining one, which passed the guard."""
    job.ckpt.wait()  # the last good checkpoint is whole before the error names it
    rejected = [s for s in job.ckpt.manager.all_steps() if s >= step_no - condemned]
    for step in rejected:
        job.ckpt.reject(step)
    moved = (
        f"; checkpoint step {', '.join(map(str, rejected))} held those parameters: moved to {job.run_dir / 'rejected'}"
    )
    lower = f"optimizer.lr={job.cfg.optimizer.lr / 10:g}"
    good = job.ckpt.latest_step()
    if good is not None:
        advice = (
            f"the last good checkpoint is step {good} in {job.run_dir / 'checkpoints'}: rerun the same command with "
            f"a lower learning rate (e.g. {lower}) to resume from it"
        )
    else:
        advice = f"no checkpoint passed the guard: start again with a lower learning rate (e.g. {lower})"
    raise FloatingPointError(f"{problem} {when}; stopped without saving it{moved if rejected else ''}; {advice}")


def _record(job: Job, pending: list[tuple[int, dict[str, jax.Array], int]], keep_last: int) -> None:
    """Read back and record the metrics of finished steps, leaving the newest `keep_last` in flight (reading a
    step's metrics waits for it, so the next step is dispatched first). A diverged step stops the run before its
    state can be saved: checkpoints are written only after their step's metrics passed the guard."""
    while len(pending) > keep_last:
        step_no, m, batch_hash = pending.pop(0)
        row = {k: float(sharding.host_value(v)) for k, v in m.items()}
        row.update(step=step_no, batch_crc=batch_hash, time=time.time())
        problem = job.guard.problem(row)
        if problem is not None:
            _stop_diverged(job, *problem, step_no, f"at step {step_no}")
        job.history.append(row)
        job.runlog.step(row)


def _next_batch(job: Job) -> tuple[dict[str, jax.Array], int]:
    batch = next(job.iterator)
    shape = (job.cfg.global_batch_size, job.cfg.data.seq_len)
    arrays = {
        k: jax.make_array_from_process_local_data(job.batch_sharding, np.asarray(batch[k], np.int32), shape)
        for k in ("tokens", "segment_ids")
    }
    return arrays, zlib.crc32(np.ascontiguousarray(batch["tokens"]).tobytes())


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
EXIT_CODES = {"SIGTERM": 143, "SIGINT": 130}


def _signal_everywhere(name: str) -> str:
    """The stop signal this process received, or SIGTERM when only another did (all processes must stop at the
    same step to save one checkpoint together); "" when none did."""
    if jax.process_count() == 1:
        return name
    anywhere = bool(multihost_utils.process_allgather(np.asarray(bool(name))).any())
    return name or ("SIGTERM" if anywhere else "")


def _stop_handler(received: dict[str, str]) -> Any:
    """SIGTERM (preemption, scancel) and a first Ctrl-C ask for a checkpoint at the next step boundary; a second
    Ctrl-C stops at once (`main` reports it in one line; the previous checkpoint is whole)."""

    def handler(signum: int, _: Any) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and received.get("name") == "SIGINT":
            raise KeyboardInterrupt
        received.setdefault("name", name)

    return handler


def loop(job: Job) -> None:
    """Steps from the state's step to cfg.steps, with periodic evaluation, checkpoints and a clean stop on
    SIGTERM or Ctrl-C (checkpoint, then return)."""
    cfg = job.cfg
    received: dict[str, str] = {}
    previous = {s: signal.signal(s, _stop_handler(received)) for s in STOP_SIGNALS}
    profiler = trainlog.StepProfiler(cfg.profile, job.run_dir / "profile", jax.process_index() == 0)
    pending: list[tuple[int, dict[str, jax.Array], int]] = []
    start = int(sharding.host_value(job.state["step"]))
    if start >= cfg.steps:
        log.info("run %s is already complete at step %d; pass run_name=<new name> or a larger steps=", job.run_dir,
                 start)  # fmt: skip
    try:
        for step in range(start + 1, cfg.steps + 1):
            profiler.before(step)
            batch, batch_hash = _next_batch(job)
            job.state, metrics = job.compiled(job.state, batch)
            job.last_batch = batch
            profiler.after(step, metrics)
            pending.append((step, metrics, batch_hash))
            _record(job, pending, keep_last=1)
            job.stop_signal = _signal_everywhere(received.get("name", ""))
            every = cfg.eval.every_steps
            if job.eval_batches and every and step % every == 0 and step < cfg.steps and not job.stop_signal:
                _record(job, pending, keep_last=0)
                t_eval = time.time()
                evaluate(job, step, f"at step {step}")
                job.runlog.pause(time.time() - t_eval)
            if step % cfg.checkpoint.every_steps == 0 or step == cfg.steps or job.stop_signal:
                _record(job, pending, keep_last=0)
                job.ckpt.save(step, job.state, job.iterator.get_state(), job.guard.reference())
                job.ckpt.prune(job.guard.passed_through(step))
                job.last_saved = step
            if job.stop_signal:
                job.ckpt.wait()
                log.info("%s: saved checkpoint at step %d; rerun the same command to resume", job.stop_signal, step)
                break
        _record(job, pending, keep_last=0)
        job.ckpt.wait()
    finally:
        profiler.stop()
        # After a preemption checkpoint, a further SIGTERM (a scheduler ending the other tasks once one has exited
        # with 143) or Ctrl-C must not kill this process in the middle of its orderly exit (`train` and `main`
        # keep them ignored until then); the scheduler's KillWait still bounds that exit.
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN if job.stop_signal else previous[s])


def _final_loss(job: Job) -> float | None:
    """Loss of the current parameters on the last training batch (a rerun: the next one, else a held-out one);
    None when no batch is left."""
    batch = job.last_batch
    if batch is None:
        try:
            batch = _next_batch(job)[0]
        except StopIteration:
            batch = job.eval_batches[0] if job.eval_batches else None
    if batch is None:
        return None

    def loss(params: Any, batch: dict[str, jax.Array]) -> jax.Array:
        tokens, seg = batch["tokens"], batch["segment_ids"]
        logits = nnx.merge(job.graphdef, params)(tokens, segment_ids_BT=seg)
        nll, count = trainstep.next_token_nll(logits, tokens, seg, job.mcfg.pad_id)
        return nll / jnp.maximum(count, 1.0)

    fn = jax.jit(loss, out_shardings=sharding.replicated(job.batch_sharding.mesh))
    return float(sharding.host_value(fn(job.state["params"], batch)))


def _export_checked(job: Job, step: int) -> None:
    """Export step `step`'s parameters once the guard passed them: no later step has checked them, so their loss
    on a batch stands in for that step's row (a failure moves the final checkpoint to rejected/)."""
    loss = _final_loss(job)
    if loss is None:
        log.warning("no batch is left to check the final parameters with; exporting them unchecked")
    else:
        problem = job.guard.problem({"loss": loss, "finite": 1.0})
        if problem is not None:
            _stop_diverged(job, problem[0], problem[1], step + 1, f"after the last step {step}")
        job.ckpt.prune(step)
    _export_model(job, step)


def finish(job: Job) -> dict[str, Any]:
    """Final evaluation (skipped after a stop signal: the grace period belongs to the checkpoint), the exported
    model of a complete run (also on a rerun, when model/ is older than the newest step) and loss.png; returns
    the run's summary."""
    step = int(sharding.host_value(job.state["step"]))
    if job.eval_batches and not job.stop_signal:
        job.results["eval_after"] = evaluate(job, step, "after training")
    complete = not job.stop_signal and step >= job.cfg.steps
    if job.cfg.checkpoint.export_model and complete and trainstate.export_is_stale(job.run_dir, step):
        _export_checked(job, step)
    if jax.process_index() == 0 and job.history:
        trainlog.plot_loss(job.run_dir)
    return {
        "preempted": bool(job.stop_signal),
        "stop_signal": job.stop_signal,
        "history": job.history,
        "state": job.state,
        "model_config": job.mcfg,
        "run_dir": job.run_dir,
        **job.results,
    }


def train(cfg: TrainConfig, devices: list[Any] | None = None) -> dict[str, Any]:
    """Run the job; returns {history: per-step metric dicts, state: final train state, model_config, run_dir,
    preempted, stop_signal, eval_before/eval_after: held-out perplexities}."""
    previous = {s: signal.getsignal(s) or signal.SIG_DFL for s in STOP_SIGNALS}
    job = setup(cfg, devices)
    try:
        if job.eval_batches and job.last_saved is None:
            job.results["eval_before"] = evaluate(job, 0, "before training")
        loop(job)
        return finish(job)
    finally:
        job.ckpt.close()
        job.runlog.close()
        if job.lock is not None:
            job.lock.release()
        for s in STOP_SIGNALS:
            signal.signal(s, previous[s])


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
        sharding.initialize_distributed(cfg.distributed)
        if jax.process_count() > 1:
            log.info(
                "jax.distributed: process %d of %d, %d devices (%d local)",
                jax.process_index(),
                jax.process_count(),
                jax.device_count(),
                jax.local_device_count(),
            )
        if jax.process_index() != 0:
            logging.getLogger().setLevel(logging.WARNING)
        result = train(cfg)
        if result["stop_signal"]:
            for s in STOP_SIGNALS:  # see `loop`: the exit itself is not cut short
                signal.signal(s, signal.SIG_IGN)
            sys.exit(EXIT_CODES[result["stop_signal"]])
    except (ValueError, FileNotFoundError, FloatingPointError, OSError) as e:
        print(f"anllm_jax.train: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(
            "anllm_jax.train: error: interrupted (Ctrl-C) before a checkpoint was written; the newest checkpoint "
            "is whole: rerun the same command to resume from it",
            file=sys.stderr,
        )
        sys.exit(130)
    log.info("run directory: %s", result["run_dir"])


if __name__ == "__main__":
    main()
