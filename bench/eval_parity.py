"""Per-option log-likelihoods of the eval pipeline (full mode) against HF transformers on the same prompts.

For each task, the first N documents are turned into lm-evaluation-harness prompt strings
(`tasks.harness_requests`). The reference tokenizes those strings with the HF tokenizer read from the GGUF
file and scores them with the transformers Llama (float32, torch); anllm_jax tokenizes them its own way
(`tasks.encode_task`) and scores them with `eval.score_masked(..., "full")`. Prints a table and writes JSON.

    python bench/eval_parity.py --n 20 --shots 0 --json parity.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from anllm_jax import checkpoints, tasks
from anllm_jax import eval as ev


def load_hf_reference(gguf_path: str):
    """(transformers model, tokenizer) from the GGUF file, offline, float32."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # One intra-op thread: on a small shared CPU, more threads make torch slower, not faster.
    torch.set_num_threads(1)
    folder, name = str(Path(gguf_path).parent), Path(gguf_path).name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
    return model.eval(), tokenizer


def hf_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) as lm-evaluation-harness computes it for an HF causal LM."""
    import torch

    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx) :]
    ids = torch.tensor([(ctx + cont)[:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    rows = logp[-len(cont) :]
    return float(rows[torch.arange(len(cont)), torch.tensor(cont)].sum())


def compare(
    names: Sequence[str], n: int, shots: int, jax_model=None, jax_tokenizer=None, hf=None
) -> dict[str, dict[str, float]]:
    """Per task: documents, options, max |difference| of log-likelihoods, and prediction agreement."""
    if jax_model is None:
        jax_model, jax_tokenizer = checkpoints.load(checkpoints.smollm2_gguf_path(), dtype="float32")
    hf_model, hf_tokenizer = hf or load_hf_reference(checkpoints.smollm2_gguf_path())
    # One encoded "task" holding every document (demonstrations folded into the contexts) keeps the
    # number of padded shapes, and so of compilations, small.
    docs, options, refs = [], [], []
    for name in names:
        demos, task_docs = tasks.fewshot(tasks.load_task(name), shots)
        enc = tasks.encode_task(jax_tokenizer, name, demos, task_docs[:n])
        for doc, opts in zip(enc.docs, enc.options, strict=True):
            docs.append((name, doc))
            options.append([(enc.prefix + ctx, cont) for ctx, cont in opts])
            refs.append([hf_loglikelihood(hf_model, hf_tokenizer, c, k) for c, k in tasks.harness_requests(doc, demos)])
    mixed = tasks.EncodedTask("parity", [d for _, d in docs], [], options)
    ours = ev.score_masked(jax_model, mixed, "full", progress=False)[0]
    report: dict[str, dict[str, float]] = {}
    for (name, doc), mine, ref in zip(docs, ours, refs, strict=True):
        r = report.setdefault(name, {"docs": 0, "options": 0, "max_abs_diff": 0.0, "same_acc": 0, "same_acc_norm": 0})
        a, b = tasks.score(doc, np.asarray(mine)), tasks.score(doc, np.asarray(ref))
        r["docs"] += 1
        r["options"] += len(ref)
        r["max_abs_diff"] = max(r["max_abs_diff"], float(np.max(np.abs(np.asarray(mine) - np.asarray(ref)))))
        r["same_acc"] += int(np.argmax(mine) == np.argmax(ref))
        r["same_acc_norm"] += int(a["acc_norm"] == b["acc_norm"])
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="all")
    p.add_argument("--n", type=int, default=20, help="documents per task")
    p.add_argument("--shots", type=int, default=0)
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)
    t0 = time.time()
    report = compare(tasks.resolve_tasks(args.tasks), args.n, args.shots)
    print("| task | docs | options | max abs diff | same prediction (acc) | same prediction (acc_norm) |")
    print("|---|---|---|---|---|---|")
    for name, r in report.items():
        print(
            f"| {name} | {r['docs']} | {r['options']} | {r['max_abs_diff']:.2e} | "
            f"{r['same_acc']}/{r['docs']} | {r['same_acc_norm']}/{r['docs']} |"
        )
    print(f"{time.time() - t0:.0f} s", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"shots": args.shots, "n": args.n, "report": report}, indent=2))
    worst = max(r["max_abs_diff"] for r in report.values())
    agree = all(r["same_acc"] == r["docs"] and r["same_acc_norm"] == r["docs"] for r in report.values())
    return 0 if worst < 1e-3 and agree else 1


if __name__ == "__main__":
    sys.exit(main())
