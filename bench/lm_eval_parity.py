"""lm-evaluation-harness's own HF backend against the `anllm-jax` model on the same documents, side by side in one
run: accuracy per task, the largest difference of any option's log-likelihood, and wall time.

    python bench/lm_eval_parity.py --tasks arc_easy,piqa,hellaswag --limit 100 --json lm_eval_parity.json

Both score SmolLM2-135M-Instruct from the packaged GGUF (transformers dequantizes it itself, anllm-jax with `gguf`),
float32, 0-shot, on the benchmarks' local task YAMLs (`anllm_jax.lm_eval_model.write_tasks`: lm-eval's own task
definitions over the registry packages' validation rows). anllm-jax runs with cache=full (causal attention, the HF
backend's function); --anchor adds a cache=anchor run ("." anchors on the untrained model: its accuracy is what the
mask costs before AnSAN training, reported with its KV entries, not a parity figure). Wall time counts
`simple_evaluate` only (model loading is timed apart); for anllm-jax it includes JAX's compilations.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from anllm_jax import checkpoints, records, tasks


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _option_lls(samples: list[dict]) -> dict[int, np.ndarray]:
    return {s["doc_id"]: np.asarray([float(r[0][0]) for r in s["resps"]]) for s in samples}


def run(names: Sequence[str], limit: int, hf_batch: int, batch: int, anchor: bool) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from anllm_jax import lm_eval_model

    folder = tempfile.mkdtemp(prefix="lm_eval_parity_")
    local = lm_eval_model.write_tasks(os.path.join(folder, "tasks"), names, limit)
    manager = TaskManager(include_path=os.path.join(folder, "tasks"), include_defaults=False)
    gguf = Path(checkpoints.smollm2_gguf_path())
    backends = {
        "hf": lambda: HFLM(
            pretrained=str(gguf.parent),
            gguf_file=gguf.name,
            dtype="float32",
            device="cpu",
            batch_size=hf_batch,
            add_bos_token=False,
        ),
        "anllm-jax full": lambda: lm_eval_model.AnLLMJax(checkpoint="smollm2", cache="full", batch_size=batch),
    }
    if anchor:
        backends["anllm-jax anchor"] = lambda: lm_eval_model.AnLLMJax(checkpoint="smollm2", cache="anchor")
    report: dict = {"backends": {}}
    for label, make in backends.items():
        lm, load_s = _timed(make)
        out, eval_s = _timed(
            lambda lm=lm: lm_eval.simple_evaluate(
                model=lm, tasks=local, task_manager=manager, limit=limit, log_samples=True, cache_requests=False
            )
        )
        report["backends"][label] = {
            "load_s": load_s,
            "eval_s": eval_s,
            "results": {t: out["results"][t] for t in local},
            "lls": {t: _option_lls(out["samples"][t]) for t in local},
            "kv": {k: v for k, v in out["config"].items() if k.startswith("kv_")},
        }
    return report


def summarize(report: dict, names: Sequence[str]) -> list[dict]:
    """One row per task and anllm-jax backend: accuracies beside the HF backend's, largest |Δ log-likelihood|."""
    from anllm_jax.lm_eval_model import LOCAL_SUFFIX

    hf = report["backends"]["hf"]
    rows = []
    for label, ours in report["backends"].items():
        if label == "hf":
            continue
        for name in names:
            task = name + LOCAL_SUFFIX
            a, b = hf["results"][task], ours["results"][task]
            diff = max(float(np.max(np.abs(ours["lls"][task][d] - hf["lls"][task][d]))) for d in hf["lls"][task])
            rows.append(
                {
                    "task": name,
                    "backend": label,
                    "n": len(hf["lls"][task]),
                    "acc_hf": a["acc,none"],
                    "acc": b["acc,none"],
                    "acc_norm_hf": a.get("acc_norm,none"),
                    "acc_norm": b.get("acc_norm,none"),
                    "max_abs_diff_loglik": diff,
                }
            )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="all", help=f"'all' or a comma-separated list of {', '.join(tasks.TASKS)}")
    p.add_argument("--limit", type=int, default=100, help="documents per task")
    p.add_argument("--hf-batch-size", type=int, default=32, help="lm-eval's HF backend batch size")
    p.add_argument("--batch-size", type=int, default=16, help="anllm-jax rows per batch")
    p.add_argument("--anchor", action="store_true", help="also run anllm-jax with cache=anchor (KV report)")
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)
    names = tasks.resolve_tasks(args.tasks)
    report = run(names, args.limit, args.hf_batch_size, args.batch_size, args.anchor)
    rows = summarize(report, names)
    print("| task | backend | docs | acc HF | acc anllm-jax | acc_norm HF | acc_norm anllm-jax | max abs Δ log-lik |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    fmt = lambda x: "-" if x is None else f"{100 * x:.1f}"
    for r in rows:
        print(
            f"| {r['task']} | {r['backend']} | {r['n']} | {fmt(r['acc_hf'])} | {fmt(r['acc'])} | "
            f"{fmt(r['acc_norm_hf'])} | {fmt(r['acc_norm'])} | {r['max_abs_diff_loglik']:.2e} |"
        )
    hf_s = report["backends"]["hf"]["eval_s"]
    print("\n| backend | load s | eval s | HF eval s / this eval s | KV entries kept / full |")
    print("|---|---:|---:|---:|---:|")
    for label, b in report["backends"].items():
        kv = f"{b['kv']['kv_entries_kept']:,} / {b['kv']['kv_entries_full']:,}" if b["kv"] else "-"
        print(f"| {label} | {b['load_s']:.1f} | {b['eval_s']:.1f} | {hf_s / b['eval_s']:.2f} | {kv} |")
    if args.json:
        summary = {k: {kk: vv for kk, vv in v.items() if kk != "lls"} for k, v in report["backends"].items()}
        meta = {"commit": records.commit(), "device": records.hardware(), "date": time.strftime("%Y-%m-%d")}
        records.write_json(args.json, meta | {"limit": args.limit, "backends": summary, "rows": rows}, indent=2)
    full = [r for r in rows if r["backend"] == "anllm-jax full"]
    same = all(r["acc"] == r["acc_hf"] and r["acc_norm"] == r["acc_norm_hf"] for r in full)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
