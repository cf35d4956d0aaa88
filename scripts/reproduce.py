"""Small-scale AnLLM reproduction: SmolLM2-135M continually pretrained as a full-attention control, AnLLM-EP and
AnLLM-AC, then all four models (base included) evaluated on the paper's 8 QA tasks.

    scripts/reproduce.sh [--cpu | --smoke] [--out DIR] [--limit N] [--tasks LIST] [--jobs N] [--publish DIR]

Profiles: the default (GPU, ~8 min on one H100; configs/reproduce-{full,ep,ac}.yaml, 0 and 5 shots), `--cpu`
(2 CPU cores in about 110 minutes; configs/reproduce-cpu.yaml, 5 shots) and `--smoke` (the CPU profile at toy size,
a pipeline check in a few minutes).

Stages, each timed:
1. convert: the packaged SmolLM2-135M GGUF to native checkpoints, one per starting point: base (full attention),
   base-ep ("." tokens are anchors), base-ac (<AC> added, its rows copied from ".").
2. prepare: the registry English corpus (Wikipedia leads + King James Bible) as a tfds dataset.
3. train-control, train-ep, train-ac: identical recipes but for the training mask (full, EP, AC); the control starts
   from base-ep so that its held-out perplexity is also measured under the "." mask it never trains with. Each run
   logs held-out perplexity under both masks every few steps (eval.jsonl: the learning curves) and exports its
   final model as a native checkpoint, DIR/runs/<run>/model.
4. eval-base, eval-control, eval-ep, eval-ac: modes full (causal) and anchor-cache (demonstrations prefilled once
   into the anchor cache, which computes the AnSAN function); the control only full. Base has no trained anchors:
   its anchor-cache mode uses "." as anchors and shows what the mask costs an untrained model.
5. timing: EP and AC again at 5 shots on the first documents of each task, one model at a time, in modes no-cache
   (one AnSAN forward per row, the demonstrations recomputed: the paper's baseline) and anchor-cache: the time
   ratio, and the check that both modes give the same log-likelihoods.
6. report: DIR/results.json and DIR/results.md (the combined table beside the paper's numbers),
   DIR/learning_curves.png (held-out perplexity, full and AnSAN mask, per run) and DIR/loss_curves.png.

--jobs 1 runs stages 3 and 4 in this process, one model at a time. --jobs N > 1 (the GPU default, 4) runs the three
trainings and then the four evaluations as `python -m anllm_jax.train` / `python -m anllm_jax.eval` processes, up
to N at once, sharing the accelerator (logs in DIR/logs/, compilations shared through DIR/jax_cache/).

Every stage is resumable: a rerun with the same --out reuses the converted checkpoints, the corpus, finished
training runs (an unfinished one resumes from its last checkpoint), and every task already evaluated.
`--publish DIR` copies the small outputs (metrics, learning curves, evaluation results, report) there after every
stage, so that a run stopped early keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The three continual-pretraining runs: run name -> training mask, and the converted checkpoint each starts from.
RUNS = {"control": "full", "ep": "ep", "ac": "ac"}
STARTS = {"control": "ep", "ep": "ep", "ac": "ac"}
MODELS = ("base", "control", "ep", "ac")
MODEL_LABELS = {
    "base": "SmolLM2-135M (base)",
    "control": "control (full attention)",
    "ep": "AnLLM-EP",
    "ac": "AnLLM-AC",
}
# Table modes per model: the control has no anchors it was trained for, so only its full-attention accuracy counts.
MODEL_MODES = {"base": ("full", "anchor-cache"), "control": ("full",), "ep": ("full", "anchor-cache"),
               "ac": ("full", "anchor-cache")}  # fmt: skip
TIMED = ("ep", "ac")
TIMING_SHOTS = 5


@dataclasses.dataclass(frozen=True)
class Profile:
    """What one invocation trains and evaluates."""

    name: str
    config: str  # configs/<config>, {mode} replaced by the run's training mask
    shots: tuple[int, ...]
    limit: int  # documents per task (0: all)
    timing_limit: int  # documents per task in the timing stage (0: all)
    tasks: tuple[str, ...] | None  # None: all 8
    jobs: int
    train_overrides: tuple[str, ...] = ()
    max_docs: int | None = None  # corpus documents (None: all)
    accelerator: bool = False  # refuses to start on a CPU


PROFILES = {
    "gpu": Profile("gpu", "reproduce-{mode}.yaml", (0, 5), 100, 100, None, 4, accelerator=True),
    "cpu": Profile("cpu", "reproduce-cpu.yaml", (5,), 100, 10, None, 1),
    "smoke": Profile(
        "smoke",
        "reproduce-cpu.yaml",
        (0, 5),
        1,
        1,
        ("winogrande",),
        1,
        (
            "steps=2",
            "global_batch_size=1",
            "data.seq_len=64",
            "optimizer.warmup_steps=1",
            "log_every=1",
            "eval.batches=1",
            "eval.batch_size=1",
            "eval.every_steps=1",
            "checkpoint.every_steps=2",
        ),
        max_docs=10,
    ),
}

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
    """Wall time per stage, printed as each ends; `after` runs once each stage has ended (publishing)."""

    def __init__(self, after=None) -> None:
        self.start = time.perf_counter()
        self.stages: dict[str, float] = {}
        self.after = after

    def run(self, name: str, fn, *args, **kwargs):
        log.info("=== %s", name)
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.stages[name] = time.perf_counter() - t0
        log.info("=== %s done in %.1f s", name, self.stages[name])
        if self.after is not None:
            self.after()
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
    model, tokenizer = checkpoints.set_anchor_mode(model, tokenizer, "ep")
    checkpoints.save(model, tokenizer, str(paths["ep"]))
    model, tokenizer = checkpoints.set_anchor_mode(model, tokenizer, "ac", ac_init="dot")
    checkpoints.save(model, tokenizer, str(paths["ac"]))
    log.info("anchor ids: ep %s, ac %s", tokenizer.anchor_ids("ep"), list(model.cfg.anchor_ids))
    return {mode: str(p) for mode, p in paths.items()}


def prepare(out: Path, profile: Profile) -> str:
    from anllm_jax import data

    path = out / "corpus"
    data.prepare(output=str(path), max_docs=profile.max_docs)
    return str(path)


def _config_path(name: str, profile: Profile) -> str:
    return str(REPO / "configs" / profile.config.format(mode=RUNS[name]))


def _train_overrides(name: str, out: Path, start: str, corpus: str, profile: Profile) -> list[str]:
    return [
        f"run_name={name}",
        f"data.anchor_mode={RUNS[name]}",
        f"output_dir={out / 'runs'}",
        f"load_parameters_path={start}",
        f"data.path={corpus}",
        *profile.train_overrides,
    ]


def _train_config(name: str, out: Path, start: str, corpus: str, profile: Profile):
    from anllm_jax.config import load_train_config

    return load_train_config(_config_path(name, profile), _train_overrides(name, out, start, corpus, profile))


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def finished(run_dir: Path, steps: int) -> bool:
    """The run reached `steps` and exported its model (a rerun skips it)."""
    metrics = _jsonl(run_dir / "metrics.jsonl")
    return (run_dir / "model" / "config.json").exists() and bool(metrics) and metrics[-1]["step"] >= steps


def summarize_run(name: str, run_dir: Path) -> dict[str, Any]:
    """A finished run: its exported model (<run dir>/model), steps, tokens, losses and held-out perplexities (the
    first and the last evaluation of eval.jsonl)."""
    from anllm_jax.config import load_train_config

    checkpoint = run_dir / "model"
    if not (checkpoint / "config.json").exists():
        raise FileNotFoundError(
            f"{checkpoint} is missing: the run did not export its model; delete {run_dir} and rerun"
        )
    cfg = load_train_config(str(run_dir / "config.yaml"))
    losses = [row["loss"] for row in _jsonl(run_dir / "metrics.jsonl")]
    curve = _jsonl(run_dir / "eval.jsonl")
    ppl = lambda row: {"step": row["step"], "full": row["ppl_full"], "ansan": row["ppl_ansan"]}  # noqa: E731
    return {
        "anchor_mode": RUNS[name],
        "checkpoint": str(checkpoint),
        "run_dir": str(run_dir),
        "steps": cfg.steps,
        "tokens": cfg.steps * cfg.global_batch_size * cfg.data.seq_len,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "heldout_ppl_before": ppl(curve[0]) if curve else None,
        "heldout_ppl_after": ppl(curve[-1]) if curve else None,
    }


def train_in_process(name: str, out: Path, start: str, corpus: str, profile: Profile) -> dict[str, Any]:
    """One continual-pretraining run in this process (skipped when it has finished); returns its summary."""
    from anllm_jax import train

    cfg = _train_config(name, out, start, corpus, profile)
    run_dir = Path(cfg.output_dir) / cfg.run_name
    if finished(run_dir, cfg.steps):
        log.info("reusing the finished run %s", run_dir)
    else:
        train.train(cfg)
    return summarize_run(name, run_dir)


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


def train_parallel(out: Path, starts: dict[str, str], corpus: str, profile: Profile, jobs: int) -> dict[str, dict]:
    """The unfinished runs as `python -m anllm_jax.train` processes, `jobs` at a time."""
    commands = {}
    for name in RUNS:
        cfg = _train_config(name, out, starts[STARTS[name]], corpus, profile)
        if not finished(Path(cfg.output_dir) / cfg.run_name, cfg.steps):
            overrides = _train_overrides(name, out, starts[STARTS[name]], corpus, profile)
            config = _config_path(name, profile)
            commands[f"train-{name}"] = [sys.executable, "-m", "anllm_jax.train", "--config", config, *overrides]
    if commands:
        run_workers(commands, out, jobs)
    return {name: summarize_run(name, out / "runs" / name) for name in RUNS}


def evaluate(name: str, checkpoint: str, out: Path, task_names: list[str], profile: Profile, dtype: str) -> dict:
    """eval.run over every task and shot count in the model's modes, resuming the tasks already in
    DIR/eval/<name>; writes DIR/eval/<name>/results.*."""
    from anllm_jax import eval

    model, tokenizer = _load_for_eval(checkpoint, dtype)
    output = str(out / "eval" / name)
    results, _ = eval.run(
        model, tokenizer, task_names, profile.shots, MODEL_MODES[name], profile.limit or None, progress=False,
        checkpoint=checkpoint, output=output, resume=True,
    )  # fmt: skip
    return results


def _load_for_eval(checkpoint: str, dtype: str):
    """The model and tokenizer; a full-attention model gets "." as anchors, as `python -m anllm_jax.eval` does."""
    import jax
    from flax import nnx

    from anllm_jax import checkpoints

    model, tokenizer = checkpoints.load(checkpoint, dtype=dtype)
    if model.cfg.anchor_mode == "full":
        model, tokenizer = checkpoints.set_anchor_mode(model, tokenizer, "ep")
    # Weights restored from a checkpoint saved from host arrays come back uncommitted, which jit keys apart from
    # committed ones: placing every model the same way lets models of one shape share compiled functions.
    nnx.update(model, jax.device_put(nnx.state(model), jax.devices()[0]))
    return model, tokenizer


def evaluate_parallel(
    checkpoints_by_model: dict[str, str], out: Path, task_names: list[str], profile: Profile, dtype: str, jobs: int
) -> dict[str, dict]:
    """The four evaluations as `python -m anllm_jax.eval` processes, `jobs` at a time; returns their results."""
    commands = {}
    for name, checkpoint in checkpoints_by_model.items():
        commands[f"eval-{name}"] = [
            sys.executable, "-m", "anllm_jax.eval", "--checkpoint", checkpoint, "--tasks", ",".join(task_names),
            "--shots", ",".join(map(str, profile.shots)), "--mode", ",".join(MODEL_MODES[name]),
            "--output", str(out / "eval" / name), "--dtype", dtype, "--no-progress", "--resume",
        ] + (["--limit", str(profile.limit)] if profile.limit else [])  # fmt: skip
    run_workers(commands, out, jobs)
    return {name: json.loads((out / "eval" / name / "results.json").read_text()) for name in checkpoints_by_model}


def time_alone(
    checkpoints_by_model: dict[str, str], out: Path, task_names: list[str], profile: Profile, dtype: str
) -> dict[str, dict[str, Any]]:
    """Per timed model, measured one model at a time in this process: the no-cache / anchor-cache scoring time
    ratio at 5 shots over the first `timing_limit` documents per task, and the largest |log-likelihood|
    difference between the two modes (the same function, so rounding only). Resumes from DIR/timing/<model>."""
    from anllm_jax import eval

    timing = {}
    for name in TIMED:
        model, tokenizer = _load_for_eval(checkpoints_by_model[name], dtype)
        results, lls = eval.run(
            model, tokenizer, task_names, [TIMING_SHOTS], ["no-cache", "anchor-cache"], profile.timing_limit or None,
            progress=False, checkpoint=checkpoints_by_model[name], output=str(out / "timing" / name), resume=True,
        )  # fmt: skip
        per_task = results["results"][str(TIMING_SHOTS)]
        seconds = {m: sum(r["modes"][m]["seconds"] for r in per_task.values()) for m in ("no-cache", "anchor-cache")}
        worst = 0.0
        for t in task_names:
            per_doc = lls[str(TIMING_SHOTS)][t]
            for doc_a, doc_b in zip(per_doc["anchor-cache"], per_doc["no-cache"], strict=True):
                worst = max([worst] + [abs(x - y) for x, y in zip(doc_a, doc_b, strict=True)])
        timing[name] = {
            "documents_per_task": profile.timing_limit or None,
            "seconds": seconds,
            "time_ratio": seconds["no-cache"] / seconds["anchor-cache"] if seconds["anchor-cache"] > 0 else None,
            "max_abs_loglik_diff": worst,
        }
    return timing


# ---------------------------------------------------------------------------------------------------------------------
# Report


def table_rows(
    evals: dict[str, dict], task_names: list[str], shots: tuple[int, ...], timing: dict[str, dict]
) -> list[dict[str, Any]]:
    """One row per (shots, model, table mode): acc per task (%), their mean, KV reduction over all scored rows (%);
    for anchor-cache also the KV reduction of the cached prefixes (the demonstrations at 5 shots, each question's
    shared context at 0 shots) and, for timed models at 5 shots, the timing stage's no-cache / anchor-cache ratio."""
    rows = []
    for k in shots:
        for name in MODELS:
            per_task = evals[name]["results"][str(k)]
            for mode in MODEL_MODES[name]:
                stats = {t: per_task[t]["modes"][mode] for t in task_names}
                acc = {t: 100 * stats[t]["acc"] for t in task_names}
                kv_full = sum(s["kv_full"] for s in stats.values())
                kv_kept = sum(s["kv_kept"] for s in stats.values())
                ratio = prefix_reduction = None
                if mode == "anchor-cache":
                    prefix = sum(s["prefix_tokens"] for s in stats.values())
                    prefix_kept = sum(s["prefix_entries_kept"] for s in stats.values())
                    prefix_reduction = 100 * (1 - prefix_kept / prefix) if prefix else None
                    if k == TIMING_SHOTS and name in timing:
                        ratio = timing[name]["time_ratio"]
                rows.append(
                    {
                        "shots": k,
                        "model": name,
                        "mode": mode,
                        "n": {t: s["n"] for t, s in stats.items()},
                        "acc": acc,
                        "average": sum(acc.values()) / len(acc),
                        "kv_reduction": 100 * (1 - kv_kept / kv_full) if kv_full else 0.0,
                        "prefix_kv_reduction": prefix_reduction,
                        "time_ratio": ratio,
                    }
                )
    return rows


def checks(rows: list[dict[str, Any]], shots: tuple[int, ...]) -> dict[str, Any]:
    """The reproduction's targets, read off the table (AC at 5 shots), and the paper-style deltas."""

    def row(model: str, k: int, mode: str) -> dict[str, Any]:
        return next(r for r in rows if r["model"] == model and r["shots"] == k and r["mode"] == mode)

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
        "control_avg": {k: row("control", k, "full")["average"] for k in shots},
        "base_avg": {k: row("base", k, "full")["average"] for k in shots},
        "full_minus_anchor_cache_5shot": {
            m: row(m, 5, "full")["average"] - row(m, 5, "anchor-cache")["average"]
            for m in MODELS
            if "anchor-cache" in MODEL_MODES[m]
        },
    }


# The comparisons the reading rests on: (model, mode) minus (model, mode), each on the same documents.
PAIRS = (
    (("base", "full"), ("base", "anchor-cache")),
    (("ep", "full"), ("ep", "anchor-cache")),
    (("ac", "full"), ("ac", "anchor-cache")),
    (("ep", "anchor-cache"), ("base", "anchor-cache")),
    (("ac", "anchor-cache"), ("base", "anchor-cache")),
    (("control", "full"), ("base", "full")),
    (("control", "full"), ("ep", "full")),
    (("control", "full"), ("ac", "full")),
)
BOOTSTRAP = 2000


def paired_differences(out: Path, task_names: list[str], k: int, limit: int | None) -> list[dict[str, Any]]:
    """Per pair of PAIRS at `k` shots: the difference of 8-task average accuracies (points) and its 95% interval
    from a paired bootstrap (documents resampled within each task, the same draw for both sides), read from
    DIR/eval/<model>/loglikelihoods.json and each document's gold answer."""
    import numpy as np

    from anllm_jax import tasks

    lls = {m: json.loads((out / "eval" / m / "loglikelihoods.json").read_text())[str(k)] for m in MODELS}
    correct: dict[tuple[str, str], list[np.ndarray]] = {}
    for t in task_names:
        docs = tasks.fewshot(tasks.load_task(t), k)[1][:limit]
        for m in MODELS:
            for mode in MODEL_MODES[m]:
                rows = lls[m][t][mode]
                acc = [tasks.score(doc, np.asarray(ll))["acc"] for doc, ll in zip(docs, rows, strict=True)]
                correct.setdefault((m, mode), []).append(np.asarray(acc, float))
    rng = np.random.default_rng(0)
    draws = [rng.integers(0, len(c), (BOOTSTRAP, len(c))) for c in correct[("base", "full")]]
    out_rows = []
    for a, b in PAIRS:
        diff = [x - y for x, y in zip(correct[a], correct[b], strict=True)]
        boot = np.mean([d[i].mean(axis=1) for d, i in zip(diff, draws, strict=True)], axis=0)
        low, high = np.percentile(100 * boot, [2.5, 97.5])
        out_rows.append(
            {"a": list(a), "b": list(b), "points": 100 * float(np.mean([d.mean() for d in diff])),
             "ci95": [float(low), float(high)]}
        )  # fmt: skip
    return out_rows


def _cell(x: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _table(report: dict[str, Any], k: int) -> list[str]:
    task_names = report["tasks"]
    lines = [
        "| model | mode | " + " | ".join(task_names) + " | avg | KV red. % rows | KV red. % prefix | time ratio |",
        "|---|---|" + "---|" * len(task_names) + "---|---|---|---|",
    ]
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
    return lines


def markdown(report: dict[str, Any]) -> str:
    profile = report["profile"]
    label = {"smoke": "SMOKE RUN (pipeline check only; the numbers are not results)", "cpu": "CPU profile"}
    lines = [
        f"# AnLLM small-scale reproduction: {label.get(profile, 'full run')}",
        "",
        f"commit {report['commit']} | {report['hardware']} | jax {report['jax']} | "
        f"total wall time {report['total_seconds']:.0f} s | n per task: {report['limit'] or 'all'}",
        "",
        "acc in %; avg = mean over the tasks shown; KV red. rows = share of cache entries removed against full "
        "caching over all scored rows (demonstrations + question + option); KV red. prefix = the same over the "
        "cached prefixes only (the demonstrations at 5 shots, each question's shared context at 0 shots); "
        "time ratio = scoring time without a cache (one AnSAN forward per row) / with the anchor cache, "
        f"compilation excluded, 5 shots, first {report['timing_limit'] or 'all'} documents per task, one model at a "
        "time. anchor-cache scores equal AnSAN scores. Base uses '.' as anchors without having been trained for them.",
    ]
    for k in report["shots"]:
        lines += ["", f"## {k}-shot", "", *_table(report, k)]
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
        f"| base 5-shot: full avg - anchor-cache avg (points, untrained mask) | "
        f"{c['full_minus_anchor_cache_5shot']['base']:.1f} | - |",
        "| control avg, full attention | "
        + " / ".join(f"{c['control_avg'][k]:.1f}" for k in report["shots"])
        + " | base "
        + " / ".join(f"{c['base_avg'][k]:.1f}" for k in report["shots"])
        + f" ({' / '.join(f'{k}' for k in report['shots'])} shots) |",
        f"| max time ratio (no cache / anchor cache) | {_cell(max_ratio, '{:.2f}x')} | "
        f"paper up to {p['max_time_ratio']}x |",
        "| max abs log-likelihood difference, anchor-cache vs no-cache | "
        + ", ".join(f"{m} {t['max_abs_loglik_diff']:.1e}" for m, t in report["timing"].items())
        + " | 0 up to rounding (same function) |",
        "",
        "## Paired differences",
        "",
        f"Differences of 8-task average accuracy on the same documents, {report['shots'][-1]} shots, with 95% "
        f"intervals from a paired bootstrap ({BOOTSTRAP} draws, documents resampled within each task).",
        "",
        "| comparison | points | 95% interval |",
        "|---|---|---|",
        *(
            f"| {MODEL_LABELS[p['a'][0]]} {p['a'][1]} - {MODEL_LABELS[p['b'][0]]} {p['b'][1]} | {p['points']:+.1f} | "
            f"{p['ci95'][0]:+.1f} to {p['ci95'][1]:+.1f} |"
            for p in report.get("paired", [])
        ),
        "",
        "## Training",
        "",
        "| run | training mask | steps | tokens | first loss | final loss | held-out ppl full / AnSAN mask, before "
        "-> after | AnSAN/full ratio, before -> after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, t in report["training"].items():
        before, after = t["heldout_ppl_before"], t["heldout_ppl_after"]
        ppl = ratio = "-"
        if before and after:
            ppl = f"{before['full']:.2f} / {before['ansan']:.2f} -> {after['full']:.2f} / {after['ansan']:.2f}"
            ratio = f"{before['ansan'] / before['full']:.2f} -> {after['ansan'] / after['full']:.2f}"
        lines.append(
            f"| {name} | {t['anchor_mode']} | {t['steps']} | {t['tokens']:,} | {_cell(t['first_loss'], '{:.3f}')} | "
            f"{_cell(t['final_loss'], '{:.3f}')} | {ppl} | {ratio} |"
        )
    lines += ["", "## Wall time", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {s} | {v:.1f} |" for s, v in report["stage_seconds"].items()]
    lines += [f"| **total** | {report['total_seconds']:.1f} |", ""]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(training: dict[str, dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, t in training.items():
        by_step = {row["step"]: row["loss"] for row in _jsonl(Path(t["run_dir"]) / "metrics.jsonl")}
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


def plot_curves(run_dirs: dict[str, Path], path: Path) -> bool:
    """Held-out perplexity under the full and the AnSAN mask, and their ratio, against the step, one line per run
    (from each run's eval.jsonl); False when no run has evaluated yet."""
    curves = {name: _jsonl(d / "eval.jsonl") for name, d in run_dirs.items()}
    curves = {name: rows for name, rows in curves.items() if rows}
    if not curves:
        return False
    plt = _pyplot()
    from matplotlib.ticker import ScalarFormatter

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    panels = (
        ("held-out ppl, full mask", lambda r: r["ppl_full"]),
        ("held-out ppl, AnSAN mask", lambda r: r["ppl_ansan"]),
        ("AnSAN / full perplexity", lambda r: r["ppl_ansan"] / r["ppl_full"]),
    )
    for ax, (title, value) in zip(axes, panels, strict=True):
        for name, rows in curves.items():
            by_step = {r["step"]: value(r) for r in rows}
            steps = sorted(by_step)
            ax.plot(steps, [by_step[s] for s in steps], marker=".", label=MODEL_LABELS[name])
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend()
    fig.suptitle(
        "continual pretraining of SmolLM2-135M: held-out perplexity (the control's AnSAN mask uses '.'; "
        "AC's held-out text carries its <AC> tokens)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def publish(out: Path, dest: Path) -> None:
    """Copy the small outputs (run metrics and learning curves, evaluation and timing results, the report and its
    plots) from `out` to `dest`, keeping their relative paths."""
    plot_curves({name: out / "runs" / name for name in RUNS}, out / "learning_curves.png")
    patterns = [
        "runs/*/metrics.jsonl", "runs/*/eval.jsonl", "runs/*/config.yaml", "eval/*/results.json", "eval/*/results.md",
        "eval/*/loglikelihoods.json", "timing/*/results.json", "results.json", "results.md", "learning_curves.png",
        "loss_curves.png",
    ]  # fmt: skip
    for pattern in patterns:
        for src in out.glob(pattern):
            target = dest / src.relative_to(out)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)


# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/reproduce.sh", description=__doc__.split("\n")[0])
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--cpu", action="store_true", help="the CPU profile: 2 cores, about 110 minutes")
    kind.add_argument("--smoke", action="store_true", help="the CPU profile at toy size, a few minutes")
    p.add_argument("--out", default=None, help="output folder (default runs/reproduce, -cpu or -smoke)")
    p.add_argument("--limit", type=int, default=None, help="documents per task (default: the profile's); 0: all")
    p.add_argument("--tasks", default=None, help="comma-separated tasks (default all 8; smoke winogrande)")
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="1: train and evaluate in this process, one model at a time; N > 1: trainings, then evaluations, as up "
        "to N subprocesses at once sharing the accelerator (default 4 on GPU, 1 on CPU)",
    )
    p.add_argument("--publish", default=None, help="copy the small outputs here after every stage (e.g. docs/...)")
    p.add_argument(
        "--report", action="store_true", help="only rebuild the report of the finished run in --out from its files"
    )
    args = p.parse_args(argv)
    args.profile = PROFILES["smoke" if args.smoke else "cpu" if args.cpu else "gpu"]
    if args.jobs is None:
        args.jobs = args.profile.jobs
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.limit is not None and args.limit < 0:
        p.error(f"--limit must be >= 0, got {args.limit}")
    if args.limit is not None:
        args.profile = dataclasses.replace(args.profile, limit=args.limit)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    profile: Profile = args.profile
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    if args.jobs > 1:
        # Before JAX starts: this process must leave the accelerator's memory to its worker processes.
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(DRIVER_MEMORY))
    import jax

    from anllm_jax import eval, records, tasks

    on_cpu = jax.devices()[0].platform == "cpu"
    if on_cpu and profile.accelerator:
        print(
            "reproduce: error: the default profile needs a GPU (~8 min on one H100); on CPU run "
            "scripts/reproduce.sh --cpu (about 110 minutes on 2 cores) or --smoke",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out or {"gpu": "runs/reproduce"}.get(profile.name, f"runs/reproduce-{profile.name}")).absolute()
    if args.report:
        return report_again(out, args.publish)
    try:
        task_names = tasks.resolve_tasks(args.tasks) if args.tasks else list(profile.tasks or tasks.TASKS)
        eval.check_shots(task_names, profile.shots)
    except (ValueError, FileNotFoundError) as e:
        print(f"reproduce: error: {e}", file=sys.stderr)
        return 2
    dtype = "float32" if on_cpu else "bfloat16"
    out.mkdir(parents=True, exist_ok=True)
    if args.jobs > 1:
        # Worker processes compile the same functions for the same shapes; they and reruns share the compilations.
        os.environ["JAX_COMPILATION_CACHE_DIR"] = str(out / "jax_cache")
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        jax.config.update("jax_compilation_cache_dir", str(out / "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    commit, hardware = records.commit(), records.hardware()
    log.info("profile %s | output %s | commit %s | %s | tasks %s | limit %s", profile.name, out, commit, hardware,
             task_names, profile.limit)  # fmt: skip

    timer = Timer(after=(lambda: publish(out, Path(args.publish).absolute())) if args.publish else None)
    starts = timer.run("convert", convert, out)
    corpus = timer.run("prepare", prepare, out, profile)
    if args.jobs > 1:
        training = timer.run("train", train_parallel, out, starts, corpus, profile, args.jobs)
    else:
        training = {
            name: timer.run(f"train-{name}", train_in_process, name, out, starts[STARTS[name]], corpus, profile)
            for name in RUNS
        }
    checkpoints_by_model = {"base": starts["full"]} | {name: t["checkpoint"] for name, t in training.items()}
    if args.jobs > 1:
        evals = timer.run("eval", evaluate_parallel, checkpoints_by_model, out, task_names, profile, dtype, args.jobs)
    else:
        evals = {
            name: timer.run(f"eval-{name}", evaluate, name, checkpoints_by_model[name], out, task_names, profile, dtype)
            for name in MODELS
        }
    timing = timer.run("timing", time_alone, checkpoints_by_model, out, task_names, profile, dtype)

    t0 = time.perf_counter()
    report = {
        "profile": profile.name,
        "smoke": profile.name == "smoke",
        "commit": commit,
        "hardware": hardware,
        "jax": jax.__version__,
        "eval_dtype": dtype,
        "tasks": task_names,
        "shots": list(profile.shots),
        "limit": profile.limit or None,
        "timing_limit": profile.timing_limit or None,
        "model_modes": {m: list(MODEL_MODES[m]) for m in MODELS},
        "jobs": args.jobs,
        "training": training,
        "timing": timing,
        "paper": PAPER,
    }
    build_report(out, report, evals)
    timer.stages["report"] = time.perf_counter() - t0
    report |= {"stage_seconds": timer.stages, "total_seconds": timer.total()}
    finish_report(out, report, args.publish)
    return 0


def build_report(out: Path, report: dict[str, Any], evals: dict[str, dict]) -> None:
    """The table, checks and paired differences from the evaluations, and the plots from the runs."""
    shots = tuple(report["shots"])
    report["rows"] = table_rows(evals, report["tasks"], shots, report["timing"])
    report["checks"] = checks(report["rows"], shots)
    report["paired"] = paired_differences(out, report["tasks"], max(shots), report["limit"])
    plot_losses(report["training"], out / "loss_curves.png")
    plot_curves({name: Path(t["run_dir"]) for name, t in report["training"].items()}, out / "learning_curves.png")


def finish_report(out: Path, report: dict[str, Any], publish_to: str | None) -> None:
    from anllm_jax import records

    records.write_json(out / "results.json", report)
    records.write_text(out / "results.md", markdown(report))
    if publish_to:
        publish(out, Path(publish_to).absolute())
    print(markdown(report))
    for stage, seconds in report["stage_seconds"].items():
        print(f"{stage:>14}: {seconds:7.1f} s")
    print(f"{'total':>14}: {report['total_seconds']:7.1f} s | commit {report['commit']} | {report['hardware']}")
    print(f"wrote {out}/results.json, results.md, learning_curves.png, loss_curves.png")


def report_again(out: Path, publish_to: str | None) -> int:
    """--report: rebuild the report of a finished run from its files (tables, checks, paired differences,
    plots), keeping the run's own commit, hardware and stage times."""
    from anllm_jax import records

    path = out / "results.json"
    if not path.exists():
        print(f"reproduce: error: {path} is missing; --report needs a finished run in --out", file=sys.stderr)
        return 2
    report = json.loads(path.read_text())
    for name, t in report["training"].items():  # the run may have moved since (a published copy)
        t["run_dir"] = str(out / "runs" / name)
    build_report(out, report, {m: json.loads((out / "eval" / m / "results.json").read_text()) for m in MODELS})
    report["report_commit"] = records.commit()
    finish_report(out, report, publish_to)
    return 0


if __name__ == "__main__":
    from anllm_jax.hostmem import preload_tcmalloc

    preload_tcmalloc()
    sys.exit(main())
