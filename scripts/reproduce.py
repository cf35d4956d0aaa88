"""Small-scale AnLLM reproduction: SmolLM2-135M continually pretrained as a full-attention control, AnLLM-EP and
AnLLM-AC, then all four models (base included) evaluated on the paper's 8 QA tasks.

    scripts/reproduce.sh [--smoke] [--out DIR] [--limit N] [--tasks LIST]

Stages, each timed:
1. convert: the packaged SmolLM2-135M GGUF to native checkpoints, one per starting point: base (full attention),
   base-ep ("." tokens are anchors), base-ac (<AC> added, its rows copied from ".").
2. prepare: the registry English corpus (Wikipedia leads + King James Bible) as a tfds dataset.
3. train-control, train-ep, train-ac: configs/reproduce-{full,ep,ac}.yaml, identical but for the anchor mode;
   each run is exported as a native checkpoint under DIR/models/.
4. eval-base, eval-control, eval-ep, eval-ac: 0 and 5 shots in modes full (causal forward), no-cache (one AnSAN
   forward per row: the timing baseline) and anchor-cache (demonstrations prefilled once into the anchor cache).
   Base and control have no trained anchors; they are evaluated with "." as anchors.
5. report: DIR/results.json and DIR/results.md (the combined table beside the paper's numbers), DIR/loss_curves.png.

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
)

# Pang et al. 2024 (Llama-2-7B, 1B tokens of RedPajama), averages over the same 8 tasks.
PAPER = {
    "source": "Pang et al. 2024, Anchor-based Large Language Models (Llama-2-7B base)",
    "avg_0shot_full": {"Llama-2-7B": 65.8, "AnLLM-EP": 64.6, "AnLLM-AC": 65.1},
    "ansan_5shot_avg_loss_points": 1.5,
    "max_kv_reduction_pct": 99.0,
    "max_time_ratio": 3.5,
}
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


def train_run(name: str, out: Path, start: str, corpus: str, smoke: bool) -> dict[str, Any]:
    """One continual-pretraining run; exports the final weights to DIR/models/<name> and returns its summary."""
    import jax
    from flax import nnx

    from anllm_jax import checkpoints, train
    from anllm_jax.config import load_train_config
    from anllm_jax.model import Llama
    from anllm_jax.tokenizer import Tokenizer

    mode = RUNS[name]
    overrides = [
        f"run_name={name}",
        f"output_dir={out / 'runs'}",
        f"load_parameters_path={start}",
        f"data.path={corpus}",
        *(SMOKE_TRAIN if smoke else ()),
    ]
    cfg = load_train_config(str(REPO / "configs" / f"reproduce-{mode}.yaml"), overrides)
    result = train.train(cfg)
    mcfg = result["model_config"]
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Llama(mcfg, rngs=nnx.Rngs(0))))
    # Host round trip: the exported weights carry no training-mesh sharding, so all models of one shape share the
    # evaluation's compiled functions.
    nnx.replace_by_pure_dict(abstract, jax.device_put(jax.device_get(result["state"]["params"])))
    model = nnx.merge(graphdef, abstract)
    tokenizer = Tokenizer.load(str(result["run_dir"] / "tokenizer"))
    export = out / "models" / name
    checkpoints.save(model, tokenizer, str(export))
    rows = [json.loads(line) for line in (result["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    return {
        "anchor_mode": mode,
        "checkpoint": str(export),
        "run_dir": str(result["run_dir"]),
        "steps": cfg.steps,
        "tokens": cfg.steps * cfg.global_batch_size * cfg.data.seq_len,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "heldout_ppl_before": result.get("eval_before"),
        "heldout_ppl_after": result.get("eval_after"),
    }


def evaluate(
    name: str, checkpoint: str, out: Path, task_names: list[str], limit: int | None, dtype: str
) -> tuple[dict, dict]:
    """eval.run over every task, 0 and 5 shots, in EVAL_MODES; writes DIR/eval/<name>/results.*."""
    from anllm_jax import checkpoints, eval

    model, tokenizer = checkpoints.load(checkpoint, dtype=dtype)
    if model.cfg.anchor_mode == "full":
        checkpoints.set_anchor_mode(model, tokenizer, "ep")
    results, lls = eval.run(
        model, tokenizer, task_names, SHOTS, EVAL_MODES, limit, progress=False, checkpoint=checkpoint
    )
    eval.write_outputs(results, lls, str(out / "eval" / name))
    return results, lls


# ---------------------------------------------------------------------------------------------------------------------
# Report


def table_rows(evals: dict[str, dict], task_names: list[str]) -> list[dict[str, Any]]:
    """One row per (shots, model, table mode): acc per task (%), their mean, KV reduction over all scored rows (%);
    for anchor-cache also the KV reduction of the cached prefixes (the demonstrations at 5 shots, each question's
    shared context at 0 shots) and the no-cache / anchor-cache time ratio over all tasks (compilation excluded)."""
    rows = []
    for k in SHOTS:
        for name in MODELS:
            per_task = evals[name]["results"][str(k)]
            for mode in TABLE_MODES:
                acc = {t: 100 * per_task[t]["modes"][mode]["acc"] for t in task_names}
                kv_full = sum(per_task[t]["modes"][mode]["kv_full"] for t in task_names)
                kv_kept = sum(per_task[t]["modes"][mode]["kv_kept"] for t in task_names)
                ratio = prefix_reduction = None
                if mode == "anchor-cache":
                    prefix = sum(per_task[t]["modes"][mode]["prefix_tokens"] for t in task_names)
                    prefix_kept = sum(per_task[t]["modes"][mode]["prefix_entries_kept"] for t in task_names)
                    prefix_reduction = 100 * (1 - prefix_kept / prefix) if prefix else None
                    base_s = sum(per_task[t]["modes"]["no-cache"]["seconds"] for t in task_names)
                    cache_s = sum(per_task[t]["modes"]["anchor-cache"]["seconds"] for t in task_names)
                    ratio = base_s / cache_s if cache_s > 0 else None
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
                a, b = per_shots[str(k)][t]["anchor-cache"], per_shots[str(k)][t]["no-cache"]
                worst = max([worst] + [abs(x - y) for da, db in zip(a, b, strict=True) for x, y in zip(da, db)])
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
        "cached prefixes only (the demonstrations at 5 shots, each question's shared context at 0 shots); time ratio = scoring time without a cache (one AnSAN forward per row) / "
        "with the anchor cache, compilation excluded. anchor-cache scores equal AnSAN scores. Base and control use "
        "'.' as anchors without having been trained for them.",
    ]
    for k in SHOTS:
        lines += ["", f"## {k}-shot", "", head, sep]
        for r in report["rows"]:
            if r["shots"] != k:
                continue
            cells = [_cell(r["acc"][t]) for t in task_names]
            lines.append(
                f"| {MODEL_LABELS[r['model']]} | {r['mode']} | " + " | ".join(cells) + f" | {_cell(r['average'])} | "
                f"{_cell(r['kv_reduction'])} | {_cell(r['prefix_kv_reduction'])} | {_cell(r['time_ratio'], '{:.2f}x')} |"
            )
        if k == 0:
            blank = " | ".join("-" for _ in task_names)
            for model, avg in PAPER["avg_0shot_full"].items():
                lines.append(f"| paper: {model} (7B) | full | {blank} | {avg} | - | - | - |")
    c, p = report["checks"], PAPER
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
        f"| max time ratio (no cache / anchor cache) | "
        f"{_cell(max((r['time_ratio'] or 0) for r in report['rows']), '{:.2f}x')} | paper up to {p['max_time_ratio']}x |",
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
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 0:
        p.error(f"--limit must be >= 0, got {args.limit}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    import jax

    from anllm_jax import eval, tasks

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
    log.info("output %s | commit %s | %s | tasks %s | limit %s", out, eval._commit(), eval._device(), task_names, limit)

    timer = Timer()
    starts = timer.run("convert", convert, out)
    corpus = timer.run("prepare", prepare, out, args.smoke)
    training = {
        name: timer.run(f"train-{name}", train_run, name, out, starts[mode], corpus, args.smoke)
        for name, mode in RUNS.items()
    }
    checkpoints_by_model = {"base": starts["full"]} | {name: t["checkpoint"] for name, t in training.items()}
    evals, lls = {}, {}
    for name in MODELS:
        evals[name], lls[name] = timer.run(
            f"eval-{name}", evaluate, name, checkpoints_by_model[name], out, task_names, limit, dtype
        )

    t0 = time.perf_counter()
    rows = table_rows(evals, task_names)
    plot_losses(training, out / "loss_curves.png")
    timer.stages["report"] = time.perf_counter() - t0
    report = {
        "smoke": args.smoke,
        "commit": eval._commit(),
        "hardware": eval._device(),
        "jax": jax.__version__,
        "eval_dtype": dtype,
        "tasks": task_names,
        "shots": list(SHOTS),
        "limit": limit,
        "eval_modes": list(EVAL_MODES),
        "training": training,
        "rows": rows,
        "checks": checks(rows),
        "loglik_consistency": consistency(lls, task_names),
        "paper": PAPER,
        "stage_seconds": timer.stages,
        "total_seconds": timer.total(),
    }
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "results.md").write_text(markdown(report))
    print(markdown(report))
    for stage, seconds in timer.stages.items():
        print(f"{stage:>14}: {seconds:7.1f} s")
    print(f"{'total':>14}: {report['total_seconds']:7.1f} s | commit {report['commit']} | {report['hardware']}")
    print(f"wrote {out}/results.json, results.md, loss_curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
