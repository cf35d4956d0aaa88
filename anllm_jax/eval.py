"""Evaluate a checkpoint on the eight QA benchmarks of the AnLLM paper: accuracy, KV reduction and speed.

    python -m anllm_jax.eval --checkpoint PATH --tasks all|LIST --shots K[,K] --mode MODE[,MODE]
        [--limit N] [--output DIR]

Modes (each scores every answer option by its log-likelihood, lm-evaluation-harness style):
- full: one causal forward over demonstrations + question + option.
- ansan: one forward over the same tokens under the AnSAN mask (the model's anchors).
- anchor-cache: the demonstrations go through `generate.prefill` once with the anchor cache policy; every
  question + option is scored against that cache (`generate.score_continuations`). Zero-shot, the cached
  prefix is each question's context shared by its options. Computes the same function as ansan.
- no-cache: the timing baseline that recomputes the demonstrations for every question and option; it is the
  ansan computation (when both are asked for, one run serves both).
- POLICY (ansan-bounded, streaming, sepllm, window): one forward under that policy's mask; POLICY-cache (any
  policy, ansan-cache being anchor-cache): the policy's KV cache of the demonstrations, as anchor-cache does. The
  parameters come from --sinks, --window, --anchors-kept, --separators-kept, --separators (docs/policies.md).

Rows of token ids are laid out as [demonstrations][question context][option]; only the option's tokens are
scored. For `ac` models `<AC>` follows each demonstration (and, with --ac-sentences, each of its sentences).
Outputs: results.json, results.md, results.png and loglikelihoods.json in --output.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from anllm_jax import cli_args, masks, records, tasks
from anllm_jax.eval_reports import markdown_table, plot
from anllm_jax.model import Llama, mask_anchor_ids, mask_policy, policy_anchor_ids
from anllm_jax.scoring import kv_counts, score_cached, score_masked

MODES = (
    "full",
    "ansan",
    "anchor-cache",
    "no-cache",
    *masks.POLICY_NAMES[2:],
    *(f"{name}-cache" for name in masks.POLICY_NAMES),
)
_COMPILE_EVENTS = frozenset(
    {
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    }
)


class _CompileClock:
    """Wall time of a block and the part of it JAX spent tracing, lowering and compiling."""

    def __init__(self) -> None:
        self.compile_s = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_: object) -> None:
        if event in _COMPILE_EVENTS:
            self.compile_s += duration

    def measure(self, fn):
        c0, t0 = self.compile_s, time.perf_counter()
        result = fn()
        wall = time.perf_counter() - t0
        compile_s = self.compile_s - c0
        return result, max(wall - compile_s, 0.0), compile_s


_CLOCK: _CompileClock | None = None


def _clock() -> _CompileClock:
    global _CLOCK
    if _CLOCK is None:
        _CLOCK = _CompileClock()
    return _CLOCK


# ----------------------------------------------------------------------------------------------------------
# Runner


def anchor_token_id(model: Llama) -> int | None:
    """The <AC> id (an ac model's one anchor id) placed after demonstrations, or None for other models."""
    return mask_anchor_ids(model.cfg)[0] if model.cfg.anchor_mode == "ac" else None


def mode_policy(model: Llama, mode: str, policies: dict[str, masks.Policy] | None = None) -> masks.Policy:
    """The policy a mode scores under: its own for policy modes (from `policies`, else its defaults), the
    model's own mask for ansan and no-cache, causal for full, AnSAN for anchor-cache."""
    name = mode.removesuffix("-cache")
    if mode == "anchor-cache" or name == "ansan" and mode != "ansan":
        return masks.ANSAN_POLICY
    if mode in ("ansan", "no-cache"):
        return mask_policy(model.cfg)
    return (policies or {}).get(name) or masks.Policy(name)


def _score_mode(
    model: Llama,
    enc: tasks.EncodedTask,
    mode: str,
    policy: masks.Policy,
    token_budget: int,
    batch_size: int,
    progress: bool,
) -> tuple[list[np.ndarray], dict]:
    """(per-document option log-likelihoods, cache statistics) of one mode."""
    if mode == "full" and not enc.prefix:
        return score_masked(model, enc, "full", token_budget, progress)[0], {}
    if mode == "full" or mode.endswith("-cache"):
        # With demonstrations, full mode scores against their full KV cache, computed once: the same numbers as the
        # causal forward over each whole prompt, without recomputing the demonstrations for every option.
        cached = {"full": "full", "anchor-cache": "anchor", "ansan-cache": "anchor"}.get(mode, policy)
        lls, _, stats = score_cached(model, enc, cached, batch_size, progress)
        return lls, stats
    rule = "model" if mode in ("ansan", "no-cache") else policy
    return score_masked(model, enc, rule, token_budget, progress)[0], {}


def evaluate_task(
    model: Llama,
    tokenizer,
    name: str,
    shots: int,
    modes: Sequence[str],
    limit: int | None = None,
    ac_sentences: bool = False,
    token_budget: int = 512,
    batch_size: int = 16,
    progress: bool = True,
    seed: int = tasks.FEWSHOT_SEED,
    policies: dict[str, masks.Policy] | None = None,
) -> tuple[dict, dict[str, list[list[float]]]]:
    """Metrics per mode for one task, and the per-document option log-likelihoods per mode (`policies`: the
    parameters of policy modes by policy name, default each policy's defaults)."""
    task = tasks.load_task(name)
    demos, docs = tasks.fewshot(task, shots, seed)
    if limit is not None:
        docs = docs[:limit]
    enc = tasks.encode_task(tokenizer, name, demos, docs, anchor_token_id(model), ac_sentences)
    anchor_ids = mask_anchor_ids(model.cfg)
    clock = _clock()
    result: dict = {"n": len(docs), "modes": {}}
    lls_out: dict[str, list[list[float]]] = {}
    done: dict[str, tuple] = {}
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
        policy = mode_policy(model, mode, policies)
        extra: dict = {} if mode in MODES[:4] else {"policy": str(policy)}
        twin = {"no-cache": "ansan", "ansan": "no-cache"}.get(mode)
        if twin in done:
            lls, seconds, compile_s = done[twin]
            extra["same_run_as"] = twin
        else:
            (lls, stats), seconds, compile_s = clock.measure(
                lambda m=mode, p=policy: _score_mode(model, enc, m, p, token_budget, batch_size, progress)
            )
            extra |= stats
        done[mode] = (lls, seconds, compile_s)
        scores = [tasks.score(doc, ll) for doc, ll in zip(docs, lls, strict=True)]
        if mode in ("ansan", "no-cache", "anchor-cache"):
            kv_full, kv_kept = kv_counts(enc, anchor_ids)  # the anchor cache's entries, as before policies
        else:
            kv_full, kv_kept = kv_counts(enc, policy_anchor_ids(model.cfg, policy), policy)
        result["modes"][mode] = {
            "acc": float(np.mean([s["acc"] for s in scores])) if scores else None,
            "acc_norm": float(np.mean([s["acc_norm"] for s in scores])) if scores and task.has_acc_norm else None,
            "n": len(docs),
            "kv_full": kv_full,
            "kv_kept": kv_kept,
            "kv_reduction": 1.0 - kv_kept / kv_full if kv_full else 0.0,
            "seconds": seconds,
            "compile_seconds": compile_s,
            **extra,
        }
        lls_out[mode] = [[float(x) for x in ll] for ll in lls]
    base = next((result["modes"][m]["seconds"] for m in ("no-cache", "ansan") if m in result["modes"]), None)
    if base is not None and "anchor-cache" in result["modes"]:
        ac_s = result["modes"]["anchor-cache"]["seconds"]
        result["time_ratio_no_cache_over_anchor_cache"] = base / ac_s if ac_s > 0 else None
    return result, lls_out


def parse_modes(spec: str) -> list[str]:
    modes = [m.strip() for m in spec.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; modes: {', '.join(MODES)}")
    if not modes:
        raise ValueError(f"--mode is empty; pass one or more of {', '.join(MODES)}")
    return list(dict.fromkeys(modes))


def parse_shots(spec: str) -> list[int]:
    try:
        shots = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--shots {spec!r} must be an integer or a comma-separated list of integers") from None
    if not shots or any(k < 0 for k in shots):
        raise ValueError(f"--shots {spec!r} must hold integers >= 0")
    return shots


def check_shots(names: Sequence[str], shots: Sequence[int]) -> None:
    """Fail before any model work when a task has fewer demonstrations than asked for."""
    for name in names:
        task = tasks.load_task(name)
        for k in shots:
            tasks.fewshot(task, k)


def run(
    model: Llama,
    tokenizer,
    task_names: Sequence[str],
    shots: Sequence[int],
    modes: Sequence[str],
    limit: int | None = None,
    ac_sentences: bool = False,
    token_budget: int = 512,
    batch_size: int = 16,
    progress: bool = True,
    checkpoint: str = "",
    output: str | None = None,
    resume: bool = False,
    policies: dict[str, masks.Policy] | None = None,
    overwrite: bool = False,
) -> tuple[dict, dict]:
    """Evaluate every task at every shot count in every mode. Returns (results, log-likelihoods).

    With `output`, the reports are rewritten after every task (`"complete": false` until the last), so a long
    run that is stopped keeps what it measured; `resume` then takes the tasks already in `output` from there.
    `overwrite`: write into an `output` that holds files eval did not write (records.write_files).
    """
    check_shots(task_names, shots)
    results = {
        "checkpoint": checkpoint,
        "commit": records.commit(),
        "device": records.hardware(),
        "jax": jax.__version__,
        "dtype": model.cfg.dtype,
        "anchor_mode": model.cfg.anchor_mode,
        "anchor_ids": list(model.cfg.anchor_ids),
        "modes": list(modes),
        "policies": {m: str(mode_policy(model, m, policies)) for m in modes},
        "shots": list(shots),
        "limit": limit,
        "fewshot_seed": tasks.FEWSHOT_SEED,
        "ac_sentences": ac_sentences,
        "complete": False,
        "results": {},
    }
    lls: dict = {}
    kw = {"policies": policies}
    done, done_lls = _previous_run(results, output) if resume and output is not None else ({}, {})
    for k in shots:
        results["results"][str(k)], lls[str(k)] = {}, {}
        for name in task_names:
            if name in done.get(str(k), {}) and name in done_lls.get(str(k), {}):
                results["results"][str(k)][name] = done[str(k)][name]
                lls[str(k)][name] = done_lls[str(k)][name]
                print(f"[{k}-shot] {name}: taken from {output}", file=sys.stderr)
                continue
            r, ll = evaluate_task(
                model, tokenizer, name, k, modes, limit, ac_sentences, token_budget, batch_size, progress, **kw
            )
            results["results"][str(k)][name], lls[str(k)][name] = r, ll
            summary = ", ".join(f"{m} acc {100 * s['acc']:.1f} ({s['seconds']:.1f}s)" for m, s in r["modes"].items())
            print(f"[{k}-shot] {name} n={r['n']}: {summary}", file=sys.stderr)
            if output is not None:
                write_outputs(results, lls, output, overwrite)
    results["complete"] = True
    return results, lls


# Settings that must match for a resumed run to reuse earlier tasks' results.
_RUN_KEYS = (
    "checkpoint",
    "dtype",
    "anchor_mode",
    "anchor_ids",
    "modes",
    "policies",
    "limit",
    "fewshot_seed",
    "ac_sentences",
)


def _previous_run(results: dict, output: str) -> tuple[dict, dict]:
    """Per-shot task results and log-likelihoods of an earlier run in `output` with the same settings."""
    path = Path(output) / "results.json"
    if not path.exists():
        return {}, {}
    old = json.loads(path.read_text())
    # Results written before policy modes existed hold no "policies": their modes' policies follow from the rest.
    old.setdefault("policies", results["policies"])
    differ = [key for key in _RUN_KEYS if old.get(key) != results[key]]
    if differ:
        raise ValueError(
            f"--resume: {path} was written with other settings ({', '.join(differ)}); "
            "drop --resume or pass another --output"
        )
    return old["results"], json.loads((Path(output) / "loglikelihoods.json").read_text())


WRITER = "anllm_jax.eval"


def write_outputs(results: dict, lls: dict, output: str, overwrite: bool = False) -> Path:
    """The reports in `output`, each replaced whole; eval's manifest there names them, so a later run replaces
    only these (records.write_files)."""
    # Log-likelihoods first: --resume trusts results.json, so it must never name tasks missing from them.
    fills = {
        "loglikelihoods.json": lambda p: records.write_json(p, lls, indent=None),
        "results.json": lambda p: records.write_json(p, results, indent=2),
        "results.md": lambda p: records.write_text(p, markdown_table(results)),
        "results.png": lambda p: plot(results, p),
    }
    records.write_files(output, fills, WRITER, overwrite)
    return Path(output)


def _load(checkpoint: str, dtype: str):
    """The model and tokenizer, refused (one line) without a tokenizer or with non-finite parameters."""
    from anllm_jax import checkpoints

    return checkpoints.load_for_inference(checkpoint, dtype)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m anllm_jax.eval", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="HF dir, GGUF file, native dir, or 'smollm2' (packaged)")
    p.add_argument("--tasks", default="all", help=f"'all' or a comma-separated list of {', '.join(tasks.TASKS)}")
    p.add_argument("--shots", default="0", help="demonstrations per question, e.g. 5 or 0,5")
    p.add_argument("--mode", default="full", help=f"comma-separated modes: {', '.join(MODES)}")
    p.add_argument("--limit", type=int, default=None, help="score only the first N documents of each task")
    p.add_argument("--output", default="eval_results", help="folder for results.json/.md/.png")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an --output holding files eval did not write (its own names are replaced, the rest kept)",
    )
    p.add_argument(
        "--anchors",
        choices=("ep", "ac"),
        default=None,
        help="anchor mode to use when the model has none (default ep: '.' tokens are anchors)",
    )
    p.add_argument("--ac-sentences", action="store_true", help="ac models: <AC> after every demonstration sentence")
    p.add_argument("--dtype", default="float32", help="compute dtype: float32, bfloat16, or float64 (a reference)")
    p.add_argument("--token-budget", type=int, default=512, help="padded tokens per batch in full/ansan modes")
    p.add_argument("--batch-size", type=int, default=16, help="rows per batch in anchor-cache mode")
    p.add_argument("--resume", action="store_true", help="reuse the tasks already in --output (same settings)")
    p.add_argument("--no-progress", action="store_true")
    cli_args.add_arguments(p)
    args = p.parse_args(argv)
    try:
        names = tasks.resolve_tasks(args.tasks)
        modes = parse_modes(args.mode)
        shots = parse_shots(args.shots)
        policy_names = [m.removesuffix("-cache") for m in modes if m.removesuffix("-cache") in masks.POLICY_NAMES]
        cli_args.check_used(policy_names, args)
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        check_shots(names, shots)
        # Before the scoring, not after it: writable, never the current folder or one holding the model, and
        # nothing in it eval did not write (without --overwrite).
        records.check_writable(args.output, "--output")
        records.check_output_dir(args.output, WRITER, args.overwrite, [args.checkpoint])
        if args.dtype == "float64":  # a numerical reference run: without x64, JAX would compute in float32
            jax.config.update("jax_enable_x64", True)
        model, tokenizer = _load(args.checkpoint, args.dtype)
        needs_anchors = any(m not in ("full", "full-cache") for m in modes)
        if args.anchors and args.anchors != model.cfg.anchor_mode or needs_anchors and model.cfg.anchor_mode == "full":
            from anllm_jax import checkpoints

            model, tokenizer = checkpoints.set_anchor_mode(model, tokenizer, args.anchors or "ep")
            print(f"anchor mode {model.cfg.anchor_mode}, anchor ids {list(model.cfg.anchor_ids)}", file=sys.stderr)
        if args.ac_sentences and model.cfg.anchor_mode != "ac":
            raise ValueError("--ac-sentences needs an ac model (with the <AC> token); drop it or pass an ac checkpoint")
        policies = {name: cli_args.from_args(name, args, tokenizer) for name in policy_names}
        for policy in policies.values():
            mask_policy(model.cfg, policy)  # a policy the model cannot run fails before any scoring
        results, lls = run(
            model,
            tokenizer,
            names,
            shots,
            modes,
            args.limit,
            args.ac_sentences,
            args.token_budget,
            args.batch_size,
            not args.no_progress,
            args.checkpoint,
            args.output,
            args.resume,
            policies,
            args.overwrite,
        )
        out = write_outputs(results, lls, args.output, args.overwrite)
    except (ValueError, FileNotFoundError, FloatingPointError, OSError) as e:
        print(f"anllm_jax.eval: error: {e}", file=sys.stderr)
        return 2
    print(markdown_table(results))
    print(f"wrote {out}/results.json, results.md, results.png, loglikelihoods.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
