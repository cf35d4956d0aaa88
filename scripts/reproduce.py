"""Small-scale AnLLM reproduction: SmolLM2-135M continually pretrained as a full-attention control, AnLLM-EP and
AnLLM-AC, then all four models (base included) evaluated on the paper's 8 QA tasks.

    scripts/reproduce.sh [--smoke] [--out DIR] [--limit N] [--tasks LIST] [--jobs N]

Stages, each timed:
1. convert: the packaged SmolLM2-135M GGUF to native checkpoints, one per starting point: base (full attention),
   base-ep ("." tokens are anchors), base-ac (<AC> added, its rows copied from ".").
2. prepare: the registry English corpus (Wikipedia leads + King James Bible) as a tfds dataset.
3. train-control, train-ep, train-ac: configs/reproduce-{full,ep,ac}.yaml, identical but for the anchor mode;
   each run exports its final model as a native checkpoint, DIR/runs/<run>/model.
4. eval-base, eval-control, eval-ep, eval-ac: 0 and 5 shots in modes full (causal forward), no-cache (one AnSAN
   forward per row: the timing baseline) and anchor-cache (demonstrations prefilled once into the anchor cache).
   Base and control have no trained anchors; they are evaluated with "." as anchors.
5. report: DIR/results.json and DIR/results.md (the combined table beside the paper's numbers), DIR/loss_curves.png.

--jobs 1 runs stages 3 and 4 in this process, one model at a time (base, control and EP then share compiled
functions). --jobs N > 1 (4, the default off --smoke) runs the three trainings and then the four evaluations as
`python -m anllm_jax.train` / `python -m anllm_jax.eval` processes, up to N at once, sharing the accelerator (logs in
DIR/logs/, compilations shared through DIR/jax_cache/); since their timings disturb one another, a last stage,
timing, measures the 5-shot no-cache / anchor-cache time ratio again one model at a time.

A rerun with the same --out reuses the converted checkpoints, the corpus and finished training runs (the trainer
resumes from each run's last checkpoint) and repeats the evaluations.
--smoke runs every stage on CPU in a few minutes: 2 steps of 1 x 64 tokens on a 20-document corpus and one task
with one question; its numbers only show that the pipeline works.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The three continual-pretraining runs: run name -> anchor mode (configs/reproduce-<mode>.yaml).
RUNS = {"control": "full", "ep": "ep", "ac": "ac"}
MODELS = ("base", "control", "ep", "ac")
MODEL_LABELS = {
    "base": "SmolLM2-135M (base)",
    "control": "control (full attention)",
    "ep": "AnLLM-EP",
    "ac": "AnLLM-AC",
}
SHOTS = (0, 5)
EVAL_MODES = ("full", "no-cache", "anchor-cache")
TABLE_MODES = ("full", "anchor-cache")
FULL_LIMIT = 100
SMOKE_TASKS = ("winogrande",)
SMOKE_LIMIT = 1
SMOKE_MAX_DOCS = 10
SMOKE_TRAIN = (
    "steps=2",
    "global_batch_size=1",
    "data.seq_len=64",
    "optimizer.warmup_steps=1",
    "log_every=1",
    "eval.batches=0",
    "checkpoint.every_steps=2",
    "model.overrides.dtype=float32",  # bf16 matmuls are slow on CPUs
    "model.overrides.remat=none",
)

# Pang et al. 2024 (Llama-2-7B, 1B tokens of RedPajama), averages over the same 8 tasks.
PAPER = {
    "source": "Pang et al. 2024, Anchor-based Large Language Models (Llama-2-7B base)",
    "avg_0shot_full": {"Llama-2-7B": 65.8, "AnLLM-EP": 64.6, "AnLLM-AC": 65.1},
    "ansan_5shot_avg_loss_points": 1.5,
    "max_kv_reduction_pct": 99.0,
    "max_time_ratio": 3.5,
}
# Share of accelerator memory for the worker processes of --jobs > 1, split evenly among those running at once;
# the driver keeps DRIVER_MEMORY for converting and timing.
WORKER_MEMORY = 0.86
DRIVER_MEMORY = 0.08
# Targets of the reproduction for the AC model at 5 shots.
TARGET_AC_DROP_POINTS = 2.0
TARGET_AC_KV_REDUCTION = 0.95

log = logging.getLogger("reproduce")


class Timer:
    """Wall time per stage, printed as each ends."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.stages: dict[str, float] = {}

    def run(self, name: str, fn, *args, **kwargs):
        log.info("=== %s", name)
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.stages[name] = time.perf_counter() - t0
        log.info("=== %s done in %.1f s", name, self.stages[name])
        return out

    def total(self) -> float:
        return time.perf_counter() - self.start


# ---------------------------------------------------------------------------------------------------------------------
# Stages


def convert(out: Path) -> dict[str, str]:
    """Native starting checkpoints {full, ep, ac} converted from the packaged SmolLM2-135M GGUF."""
    from anllm_jax import checkpoints

    paths = {mode: out / "checkpoints" / f"base-{mode}" for mode in ("full", "ep", "ac")}
    if all((p / "config.json").exists() for p in paths.values()):
        log.info("reusing %s", out / "checkpoints")
        return {mode: str(p) for mode, p in paths.items()}
    model, tokenizer = checkpoints.load("smollm2")
    checkpoints.save(model, tokenizer, str(paths["full"]))
    checkpoints.set_anchor_mode(model, tokenizer, "ep")
    checkpoints.save(model, tokenizer, str(paths["ep"]))
    model, tokenizer = checkpoints.add_anchor_token(model, tokenizer, init="dot")
    checkpoints.save(model, tokenizer, str(paths["ac"]))
    log.info("anchor ids: ep %s, ac %s", tokenizer.anchor_ids("ep"), list(model.cfg.anchor_ids))
    return {mode: str(p) for mode, p in paths.items()}


def prepare(out: Path, smoke: bool) -> str:
    from anllm_jax import data

    path = out / "corpus"
    data.prepare(output=str(path), max_docs=SMOKE_MAX_DOCS if smoke else None)
    return str(path)


def _train_overrides(name: str, out: Path, start: str, corpus: str, smoke: bool) -> list[str]:
    return [
        f"run_name={name}",
        f"output_dir={out / 'runs'}",
        f"load_parameters_path={start}",
        f"data.path={corpus}",
        *(SMOKE_TRAIN if smoke else ()),
    ]


def _config_path(name: str) -> str:
    return str(REPO / "configs" / f"reproduce-{RUNS[name]}.yaml")


def summarize_run(name: str, run_dir: Path, ppl: dict[str, Any]) -> dict[str, Any]:
    """A finished run: its exported model (<run dir>/model), steps, tokens, losses and held-out perplexities."""
    from anllm_jax.config import load_train_config

    checkpoint = run_dir / "model"
    if not (checkpoint / "config.json").exists():
        raise FileNotFoundError(
            f"{checkpoint} is missing: the run did not export its model; delete {run_dir} and rerun"
        )
    cfg = load_train_config(str(run_dir / "config.yaml"))
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "anchor_mode": RUNS[name],
        "checkpoint": str(checkpoint),
        "run_dir": str(run_dir),
        "steps": cfg.steps,
        "tokens": cfg.steps * cfg.global_batch_size * cfg.data.seq_len,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "heldout_ppl_before": ppl.get("eval_before"),
        "heldout_ppl_after": ppl.get("eval_after"),
    }


def train_in_process(name: str, out: Path, start: str, corpus: str, smoke: bool) -> dict[str, Any]:
    """One continual-pretraining run in this process; returns its summary."""
    from anllm_jax import train
    from anllm_jax.config import load_train_config

    cfg = load_train_config(_config_path(name), _train_overrides(name, out, start, corpus, smoke))
    result = train.train(cfg)
    return summarize_run(name, result["run_dir"], result)


_PPL_LINE = re.compile(r"held-out perplexity (before|after) training: full mask ([\d.]+) \| AnSAN mask ([\d.]+)")


def run_workers(commands: dict[str, list[str]], out: Path, jobs: int) -> dict[str, str]:
    """Run the commands, `jobs` at a time, each logging to DIR/logs/<name>.log with an equal share of accelerator
    memory; returns each log's text. A failed command stops the pipeline with its log's tail."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    at_once = min(jobs, len(commands))
    env = os.environ | {"XLA_PYTHON_CLIENT_MEM_FRACTION": f"{WORKER_MEMORY / at_once:.3f}", "PYTHONPATH": str(REPO)}
    waiting, running, failed = list(commands), {}, []
    while waiting or running:
        while waiting and len(running) < at_once:
            name = waiting.pop(0)
            with open(logs / f"{name}.log", "w") as f:
                running[name] = subprocess.Popen(commands[name], stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        time.sleep(0.5)
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                if proc.returncode != 0:
                    failed.append(name)
    texts = {name: (logs / f"{name}.log").read_text() for name in commands}
    if failed:
        tails = "\n".join(f"--- {n} (log {logs / n}.log):\n" + texts[n][-3000:] for n in failed)
        raise RuntimeError(f"{', '.join(failed)} failed:\n{tails}")
    return texts


def train_parallel(out: Path, starts: dict[str, str], corpus: str, smoke: bool, jobs: int) -> dict[str, dict[str, Any]]:
    """The three runs as `python -m anllm_jax.train` processes, `jobs` at a time."""
    commands = {
        f"train-{name}": [sys.executable, "-m", "anllm_jax.train", "--config", _config_path(name)]
        + _train_overrides(name, out, starts[mode], corpus, smoke)
        for name, mode in RUNS.items()
    }
    texts = run_workers(commands, out, jobs)
    summaries = {}
    for name in RUNS:
        ppl: dict[str, Any] = {}
        for when, full, ansan in _PPL_LINE.findall(texts[f"train-{name}"]):
            ppl[f"eval_{when}"] = {"full": float(full), "ansan": float(ansan)}
        summaries[name] = summarize_run(name, out / "runs" / name, ppl)
    return summaries


def evaluate(
    name: str, checkpoint: str, out: Path, task_names: list[str], limit: int | None, dtype: str
) -> tuple[dict, dict]:
    """eval.run over every task, 0 and 5 shots, in EVAL_MODES; writes DIR/eval/<name>/results.*."""
    from anllm_jax import eval

    model, tokenizer = _load_for_eval(checkpoint, dtype)
    results, lls = eval.run(
        model, tokenizer, task_names, SHOTS, EVAL_MODES, limit, progress=False, checkpoint=checkpoint
    )
    eval.write_outputs(results, lls, str(out / "eval" / name))
    return results, lls


def _load_for_eval(checkpoint: str, dtype: str):
    """The model and tokenizer; a full-attention model gets "." as anchors, as `python -m anllm_jax.eval` does."""
    import jax
    from flax import nnx

    from anllm_jax import checkpoints

    model, tokenizer = checkpoints.load(checkpoint, dtype=dtype)
    if model.cfg.anchor_mode == "full":
        checkpoints.set_anchor_mode(model, tokenizer, "ep")
    # Weights restored from a checkpoint saved from host arrays come back uncommitted, which jit keys apart from
    # committed ones: placing every model the same way lets models of one shape share compiled functions.
    nnx.update(model, jax.device_put(nnx.state(model), jax.devices()[0]))
    return model, tokenizer


def evaluate_parallel(
    checkpoints_by_model: dict[str, str], out: Path, task_names: list[str], limit: int | None, dtype: str, jobs: int
) -> tuple[dict[str, dict], dict[str, dict]]:
    """The four evaluations as `python -m anllm_jax.eval` processes, `jobs` at a time; returns their results and
    log-likelihoods."""
    commands = {}
    for name, checkpoint in checkpoints_by_model.items():
        commands[f"eval-{name}"] = [
            sys.executable, "-m", "anllm_jax.eval", "--checkpoint", checkpoint, "--tasks", ",".join(task_names),
            "--shots", ",".join(map(str, SHOTS)), "--mode", ",".join(EVAL_MODES), "--output", str(out / "eval" / name),
            "--dtype", dtype, "--no-progress",
        ] + (["--limit", str(limit)] if limit else [])  # fmt: skip
    run_workers(commands, out, jobs)
    evals, lls = {}, {}
    for name in checkpoints_by_model:
        evals[name] = json.loads((out / "eval" / name / "results.json").read_text())
        lls[name] = json.loads((out / "eval" / name / "loglikelihoods.json").read_text())
    return evals, lls


def time_alone(
    checkpoints_by_model: dict[str, str], task_names: list[str], limit: int | None, dtype: str
) -> dict[str, float | None]:
    """No-cache / anchor-cache scoring time ratio at 5 shots per model, measured one model at a time in this
    process (the parallel evaluations share the accelerator, so their own timings are not comparable)."""
    from anllm_jax import eval

    ratios = {}
    for name, checkpoint in checkpoints_by_model.items():
        model, tokenizer = _load_for_eval(checkpoint, dtype)
        results, _ = eval.run(model, tokenizer, task_names, [5], ["no-cache", "anchor-cache"], limit, progress=False)
        per_task = results["results"]["5"].values()
        cache_s = sum(r["modes"]["anchor-cache"]["seconds"] for r in per_task)
        ratios[name] = sum(r["modes"]["no-cache"]["seconds"] for r in per_task) / cache_s if cache_s > 0 else None
    return ratios


# ---------------------------------------------------------------------------------------------------------------------
# Report


def table_rows(
    evals: dict[str, dict], task_names: list[str], time_ratios: dict[str, float | None] | None = None
) -> list[dict[str, Any]]:
    """One row per (shots, model, table mode): acc per task (%), their mean, KV reduction over all scored rows (%);
    for anchor-cache also the KV reduction of the cached prefixes (the demonstrations at 5 shots, each question's
    shared context at 0 shots) and the no-cache / anchor-cache time ratio over all tasks (compilation excluded),
    taken from `time_ratios` (5-shot ratios measured alone, per model) when the evaluations ran in parallel."""
    rows = []
    for k in SHOTS:
        for name in MODELS:
            per_task = evals[name]["results"][str(k)]
            for mode in TABLE_MODES:
                acc = {t: 100 * per_task[t]["modes"][mode]["acc"] for t in task_names}
                kv_full = sum(per_task[t]["modes"][mode]["kv_full"] for t in task_names)
                kv_kept = sum(per_task[t]["modes"][mode]["kv_kept"] for t in task_names)
                ratio = prefix_reduction = None
                if mode == "anchor-cache" and time_ratios is not None:
                    ratio = time_ratios[name] if k == 5 else None
                elif mode == "anchor-cache":
                    base_s = sum(per_task[t]["modes"]["no-cache"]["seconds"] for t in task_names)
                    cache_s = sum(per_task[t]["modes"]["anchor-cache"]["seconds"] for t in task_names)
                    ratio = base_s / cache_s if cache_s > 0 else None
                if mode == "anchor-cache":
                    prefix = sum(per_task[t]["modes"][mode]["prefix_tokens"] for t in task_names)
                    prefix_kept = sum(per_task[t]["modes"][mode]["prefix_entries_kept"] for t in task_names)
                    prefix_reduction = 100 * (1 - prefix_kept / prefix) if prefix else None
                rows.append(
                    {
                        "shots": k,
                        "model": name,
                        "mode": mode,
                        "n": {t: per_task[t]["modes"][mode]["n"] for t in task_names},
                        "acc": acc,
                        "average": sum(acc.values()) / len(acc),
                        "kv_reduction": 100 * (1 - kv_kept / kv_full) if kv_full else 0.0,
                        "prefix_kv_reduction": prefix_reduction,
                        "time_ratio": ratio,
                    }
                )
    return rows


def consistency(lls: dict[str, dict], task_names: list[str]) -> dict[str, float]:
    """Largest |log-likelihood| difference between anchor-cache and no-cache (the same function) per model."""
    out = {}
    for name, per_shots in lls.items():
        worst = 0.0
        for k in SHOTS:
            for t in task_names:
                cached, uncached = per_shots[str(k)][t]["anchor-cache"], per_shots[str(k)][t]["no-cache"]
                for doc_a, doc_b in zip(cached, uncached, strict=True):
                    worst = max([worst] + [abs(x - y) for x, y in zip(doc_a, doc_b, strict=True)])
        out[name] = worst
    return out


def checks(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The reproduction's targets, read off the table (AC at 5 shots), and the paper-style deltas."""

    def row(model: str, shots: int, mode: str) -> dict[str, Any]:
        return next(r for r in rows if r["model"] == model and r["shots"] == shots and r["mode"] == mode)

    ac_full, ac_cache = row("ac", 5, "full"), row("ac", 5, "anchor-cache")
    drop = ac_full["average"] - ac_cache["average"]
    return {
        "ac_5shot_full_avg": ac_full["average"],
        "ac_5shot_anchor_cache_avg": ac_cache["average"],
        "ac_5shot_drop_points": drop,
        "ac_5shot_drop_target_met": drop <= TARGET_AC_DROP_POINTS,
        "ac_5shot_kv_reduction": ac_cache["kv_reduction"],
        "ac_5shot_prefix_kv_reduction": ac_cache["prefix_kv_reduction"],
        "ac_5shot_kv_target_met": ac_cache["prefix_kv_reduction"] >= 100 * TARGET_AC_KV_REDUCTION,
        "control_avg": {k: row("control", k, "full")["average"] for k in SHOTS},
        "base_avg": {k: row("base", k, "full")["average"] for k in SHOTS},
        "full_minus_anchor_cache_5shot": {
            m: row(m, 5, "full")["average"] - row(m, 5, "anchor-cache")["average"] for m in MODELS
        },
    }


def _cell(x: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def markdown(report: dict[str, Any]) -> str:
    task_names = report["tasks"]
    head = "| model | mode | " + " | ".join(task_names) + " | avg | KV red. % rows | KV red. % prefix | time ratio |"
    sep = "|---|---|" + "---|" * len(task_names) + "---|---|---|---|"
    label = "SMOKE RUN (pipeline check only; the numbers are not results)" if report["smoke"] else "full run"
    lines = [
        f"# AnLLM small-scale reproduction: {label}",
        "",
        f"commit {report['commit']} | {report['hardware']} | jax {report['jax']} | "
        f"total wall time {report['total_seconds']:.0f} s | n per task: {report['limit'] or 'all'}",
        "",
        "acc in %; avg = mean over the tasks shown; KV red. rows = share of cache entries removed against full "
        "caching over all scored rows (demonstrations + question + option); KV red. prefix = the same over the "
        "cached prefixes only (the demonstrations at 5 shots, each question's shared context at 0 shots); "
        "time ratio = scoring time without a cache (one AnSAN forward per row) / with the anchor cache, "
        f"compilation excluded, measured in {report['time_ratio_source']}. anchor-cache scores equal AnSAN "
        "scores. Base and control use '.' as anchors without having been trained for them.",
    ]
    for k in SHOTS:
        lines += ["", f"## {k}-shot", "", head, sep]
        for r in report["rows"]:
            if r["shots"] != k:
                continue
            cells = [_cell(r["acc"][t]) for t in task_names]
            cells += [_cell(r["average"]), _cell(r["kv_reduction"]), _cell(r["prefix_kv_reduction"])]
            cells.append(_cell(r["time_ratio"], "{:.2f}x"))
            lines.append(f"| {MODEL_LABELS[r['model']]} | {r['mode']} | " + " | ".join(cells) + " |")
        if k == 0:
            blank = " | ".join("-" for _ in task_names)
            for model, avg in PAPER["avg_0shot_full"].items():
                lines.append(f"| paper: {model} (7B) | full | {blank} | {avg} | - | - | - |")
    c, p = report["checks"], PAPER
    max_ratio = max((r["time_ratio"] or 0.0) for r in report["rows"])
    lines += [
        "",
        "## Against the paper and the targets",
        "",
        "| quantity | this run | paper / target |",
        "|---|---|---|",
        f"| AC 5-shot: full avg - anchor-cache avg (points) | {c['ac_5shot_drop_points']:.1f} | "
        f"paper ~{p['ansan_5shot_avg_loss_points']} with AnSAN; target <= {TARGET_AC_DROP_POINTS} "
        f"({'met' if c['ac_5shot_drop_target_met'] else 'not met'}) |",
        f"| AC 5-shot KV reduction (%), prefix / rows | {c['ac_5shot_prefix_kv_reduction']:.1f} / "
        f"{c['ac_5shot_kv_reduction']:.1f} | paper up to "
        f"{p['max_kv_reduction_pct']:.0f}; target prefix >= {100 * TARGET_AC_KV_REDUCTION:.0f} "
        f"({'met' if c['ac_5shot_kv_target_met'] else 'not met'}) |",
        f"| EP 5-shot: full avg - anchor-cache avg (points) | {c['full_minus_anchor_cache_5shot']['ep']:.1f} | "
        f"paper ~{p['ansan_5shot_avg_loss_points']} |",
        f"| control avg, full attention, 0 / 5 shots | {c['control_avg'][0]:.1f} / {c['control_avg'][5]:.1f} | "
        f"base {c['base_avg'][0]:.1f} / {c['base_avg'][5]:.1f} |",
        f"| max time ratio (no cache / anchor cache) | {_cell(max_ratio, '{:.2f}x')} | "
        f"paper up to {p['max_time_ratio']}x |",
        "| max abs log-likelihood difference, anchor-cache vs no-cache | "
        + ", ".join(f"{m} {v:.1e}" for m, v in report["loglik_consistency"].items())
        + " | 0 up to rounding (same function) |",
        "",
        "## Training",
        "",
        "| run | anchor mode | steps | tokens | first loss | final loss | held-out ppl full / AnSAN mask, before "
        "-> after |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, t in report["training"].items():
        before, after = t["heldout_ppl_before"], t["heldout_ppl_after"]
        ppl = (
            f"{before['full']:.2f} / {before['ansan']:.2f} -> {after['full']:.2f} / {after['ansan']:.2f}"
            if before and after
            else "-"
        )
        lines.append(
            f"| {name} | {t['anchor_mode']} | {t['steps']} | {t['tokens']:,} | {_cell(t['first_loss'], '{:.3f}')} | "
            f"{_cell(t['final_loss'], '{:.3f}')} | {ppl} |"
        )
    lines += ["", "## Wall time", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {s} | {v:.1f} |" for s, v in report["stage_seconds"].items()]
    lines += [f"| **total** | {report['total_seconds']:.1f} |", ""]
    return "\n".join(lines)


def plot_losses(training: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, t in training.items():
        by_step: dict[int, float] = {}
        for line in (Path(t["run_dir"]) / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            by_step[row["step"]] = row["loss"]
        steps = sorted(by_step)
        ax.plot(steps, [by_step[s] for s in steps], marker="." if len(steps) < 20 else None, label=MODEL_LABELS[name])
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (next-token CE)")
    ax.set_title("continual pretraining of SmolLM2-135M")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/reproduce.sh", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="every stage at toy size, on CPU in a few minutes")
    p.add_argument("--out", default=None, help="output folder (default runs/reproduce, or runs/reproduce-smoke)")
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help=f"questions per task (default {FULL_LIMIT}; smoke {SMOKE_LIMIT}); 0 scores every question",
    )
    p.add_argument("--tasks", default=None, help="comma-separated tasks (default all 8; smoke winogrande)")
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="1: train and evaluate in this process, one model at a time; N > 1: trainings, then evaluations, as up "
        "to N subprocesses at once sharing the accelerator, with 5-shot time ratios re-measured alone (default 4; "
        "smoke 1)",
    )
    args = p.parse_args(argv)
    if args.jobs is None:
        args.jobs = 1 if args.smoke else 4
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.limit is not None and args.limit < 0:
        p.error(f"--limit must be >= 0, got {args.limit}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    if args.jobs > 1:
        # Before JAX starts: this process must leave the accelerator's memory to its worker processes.
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(DRIVER_MEMORY))
    import jax

    from anllm_jax import eval, records, tasks

    on_cpu = jax.devices()[0].platform == "cpu"
    if on_cpu and not args.smoke:
        print(
            "reproduce: error: the full run needs a GPU (~8 min on one H100); on CPU run scripts/reproduce.sh --smoke",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out or ("runs/reproduce-smoke" if args.smoke else "runs/reproduce")).absolute()
    try:
        task_names = tasks.resolve_tasks(args.tasks) if args.tasks else list(SMOKE_TASKS if args.smoke else tasks.TASKS)
        eval.check_shots(task_names, SHOTS)
    except (ValueError, FileNotFoundError) as e:
        print(f"reproduce: error: {e}", file=sys.stderr)
        return 2
    limit = args.limit if args.limit is not None else (SMOKE_LIMIT if args.smoke else FULL_LIMIT)
    limit = limit or None
    dtype = "float32" if on_cpu else "bfloat16"
    out.mkdir(parents=True, exist_ok=True)
    if args.jobs > 1:
        # Worker processes compile the same functions for the same shapes; they and reruns share the compilations.
        os.environ["JAX_COMPILATION_CACHE_DIR"] = str(out / "jax_cache")
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        jax.config.update("jax_compilation_cache_dir", str(out / "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    commit, hardware = records.commit(), records.hardware()
    log.info("output %s | commit %s | %s | tasks %s | limit %s", out, commit, hardware, task_names, limit)

    timer = Timer()
    starts = timer.run("convert", convert, out)
    corpus = timer.run("prepare", prepare, out, args.smoke)
    if args.jobs > 1:
        training = timer.run("train", train_parallel, out, starts, corpus, args.smoke, args.jobs)
    else:
        training = {
            name: timer.run(f"train-{name}", train_in_process, name, out, starts[mode], corpus, args.smoke)
            for name, mode in RUNS.items()
        }
    checkpoints_by_model = {"base": starts["full"]} | {name: t["checkpoint"] for name, t in training.items()}
    time_ratios = None
    if args.jobs > 1:
        evals, lls = timer.run(
            "eval", evaluate_parallel, checkpoints_by_model, out, task_names, limit, dtype, args.jobs
        )
        time_ratios = timer.run("timing", time_alone, checkpoints_by_model, task_names, limit, dtype)
    else:
        evals, lls = {}, {}
        for name in MODELS:
            evals[name], lls[name] = timer.run(
                f"eval-{name}", evaluate, name, checkpoints_by_model[name], out, task_names, limit, dtype
            )

    t0 = time.perf_counter()
    rows = table_rows(evals, task_names, time_ratios)
    plot_losses(training, out / "loss_curves.png")
    timer.stages["report"] = time.perf_counter() - t0
    report = {
        "smoke": args.smoke,
        "commit": commit,
        "hardware": hardware,
        "jax": jax.__version__,
        "eval_dtype": dtype,
        "tasks": task_names,
        "shots": list(SHOTS),
        "limit": limit,
        "eval_modes": list(EVAL_MODES),
        "jobs": args.jobs,
        "time_ratio_source": "a 5-shot rerun of each model alone" if time_ratios is not None else "the evaluation",
        "training": training,
        "rows": rows,
        "checks": checks(rows),
        "loglik_consistency": consistency(lls, task_names),
        "paper": PAPER,
        "stage_seconds": timer.stages,
        "total_seconds": timer.total(),
    }
    records.write_json(out / "results.json", report)
    records.write_text(out / "results.md", markdown(report))
    print(markdown(report))
    for stage, seconds in timer.stages.items():
        print(f"{stage:>14}: {seconds:7.1f} s")
    print(f"{'total':>14}: {report['total_seconds']:7.1f} s | commit {report['commit']} | {report['hardware']}")
    print(f"wrote {out}/results.json, results.md, loss_curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
