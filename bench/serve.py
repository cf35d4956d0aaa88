"""Serving at one KV-cache memory budget: how many concurrent long-context sequences fit, and their tokens/s,
anchor cache against full cache.

For each policy the slot capacity is the peak a request needs (engine.entries_needed: room for a prefill chunk,
and the entries kept after the prompt plus the new tokens), and the budget holds as many slots of it as fit, plus
the engine's prefill row. That many requests, each its own random prompt, are submitted to the slot engine
(anllm_jax.engine, no HTTP) at once and decoded greedily to exactly --max-tokens tokens (no stop token). Prompts
are random tokens in sentences of 8-40 tokens, each ending with the model's first anchor ("." for SmolLM2 with EP
anchors), so about 4% of a prompt are anchors. A first request of the same shape compiles before the timing.

Reported per policy: sequences that fit, entries per slot, MiB allocated, peak entries in use (and what full caches
of the same tokens would hold), wall time from submission to the last token, median time to first token, generated
tokens/s of all sequences together over the wall time, processed tokens/s (prompt + generated), and of the decode
steps alone: sequences per step on average (prompts are prefilled one chunk per engine step, so early sequences
decode while later ones still prefill), tokens per second of decode-step time, and milliseconds per step.

    python bench/serve.py                                   # SmolLM2-135M, EP anchors, 1024-token contexts, 256 MiB
    python bench/serve.py --checkpoint runs/ep/export --anchor-mode ep --context 2048 --cache-memory 1024
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from anllm_jax import checkpoints, engine, kvcache, records  # noqa: E402
from anllm_jax.model import Llama  # noqa: E402
from anllm_jax.tokenizer import Tokenizer  # noqa: E402


def prompts(rng: np.random.Generator, n: int, length: int, model: Llama, tok: Tokenizer) -> list[list[int]]:
    """n prompts of `length` ids: sentences of 8-40 random ordinary tokens, each closed by the first anchor."""
    avoid = {*model.cfg.anchor_ids, tok.eos_id, tok.bos_id, tok.pad_id}
    pool = np.array([i for i in range(10, model.cfg.vocab_size) if i not in avoid])
    out = []
    for _ in range(n):
        ids: list[int] = []
        while len(ids) < length:
            ids += rng.choice(pool, int(rng.integers(7, 40))).tolist() + [model.cfg.anchor_ids[0]]
        out.append(ids[:length])
    return out


def run_batch(eng: engine.Engine, batch: list[list[int]], max_tokens: int) -> dict[str, float]:
    """Submit every prompt at once and wait for all: wall time, median time to first token, and the engine's decode
    steps, tokens and seconds in that time."""
    done = threading.Semaphore(0)
    failed: list[str] = []

    def emit(ev: engine.Event) -> None:
        if ev.error:
            failed.append(ev.error)
        if ev.error or ev.finish_reason:
            done.release()

    reqs = [engine.Request(p, max_tokens, emit) for p in batch]
    before = eng.stats()
    t0 = time.perf_counter()
    for r in reqs:
        eng.submit(r)
    for _ in reqs:
        done.acquire()
    wall = time.perf_counter() - t0
    if failed:
        raise SystemExit(f"bench/serve.py: error: generation failed: {failed[0]}")
    after = eng.stats()
    decode = {k: after[k] - before[k] for k in ("decode_steps", "decode_tokens", "decode_seconds")}
    return {"wall_s": wall, "ttft_median_s": statistics.median(r.first_token_at - t0 for r in reqs), **decode}


def bench_policy(model: Llama, tok: Tokenizer, policy: str, pool: list[list[int]], args) -> dict:
    spec = engine.cache_spec(model, policy)
    need = max(engine.entries_needed(p, args.max_tokens, spec[0], policy, args.prefill_chunk, spec[1]) for p in pool)
    capacity = -(-need // 16) * 16
    per_row = capacity * kvcache.bytes_per_entry(model.cfg)
    slots = min(int(args.cache_memory * 2**20) // per_row - 1, len(pool) - 1)
    row = {"policy": policy, "sequences": max(slots, 0), "entries_per_slot": capacity}
    if slots < 1:
        return row | {"note": f"one sequence needs {per_row / 2**20:.1f} MiB with the prefill row; none fit"}
    eng = engine.Engine(model, tok, policy=policy, slots=slots, capacity=capacity, prefill_chunk=args.prefill_chunk)
    eng.start()
    try:
        run_batch(eng, pool[-1:], args.max_tokens)  # compiles the prefill chunks
        t = run_batch(eng, pool[:slots], args.max_tokens)
    finally:
        eng.stop()
    generated = slots * args.max_tokens
    return row | {
        "cache_mib_allocated": eng.stats()["cache_allocated_bytes"] / 2**20,
        "peak_entries_in_use": eng.stats()["cache_entries_peak"],
        "full_entries": slots * (args.context + args.max_tokens - 1),
        "wall_s": t["wall_s"],
        "ttft_median_s": t["ttft_median_s"],
        "generated_tokens_per_s": generated / t["wall_s"],
        "mean_sequences_per_step": t["decode_tokens"] / t["decode_steps"],
        "decode_tokens_per_s": t["decode_tokens"] / t["decode_seconds"],
        "ms_per_decode_step": 1000 * t["decode_seconds"] / t["decode_steps"],
        "processed_tokens_per_s": (generated + slots * args.context) / t["wall_s"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="smollm2", help="native/HF dir, GGUF file, or 'smollm2' (packaged)")
    p.add_argument("--anchor-mode", default="ep", choices=("ep", "ac"), help="anchors of the anchor cache")
    p.add_argument("--context", type=int, default=1024, help="prompt tokens per sequence")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per sequence")
    p.add_argument("--cache-memory", type=float, default=256.0, help="MiB of KV cache for every policy")
    p.add_argument("--prefill-chunk", type=int, default=128)
    p.add_argument("--max-sequences", type=int, default=64, help="at most this many sequences per policy")
    p.add_argument(
        "--policies", nargs="+", default=["anchor", "full"], help="cache policies or specs, e.g. streaming:window=124"
    )
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "bench/results"), "serve.json"))
    args = p.parse_args()
    model, tok = checkpoints.load(args.checkpoint, dtype=args.dtype)
    if model.cfg.anchor_mode != args.anchor_mode:
        checkpoints.set_anchor_mode(model, tok, args.anchor_mode)
    pool = prompts(np.random.default_rng(0), args.max_sequences + 1, args.context, model, tok)
    report = {
        "date": datetime.date.today().isoformat(),
        "commit": records.commit(),
        "hardware": records.hardware(),
        "jax": jax.__version__,
        "checkpoint": args.checkpoint,
        "anchor_mode": args.anchor_mode,
        "dtype": args.dtype,
        "context": args.context,
        "max_tokens": args.max_tokens,
        "cache_memory_mib": args.cache_memory,
        "prefill_chunk": args.prefill_chunk,
        "bytes_per_entry": kvcache.bytes_per_entry(model.cfg),
        "rows": [],
    }
    print(
        f"{args.checkpoint} ({args.anchor_mode} anchors, {args.dtype}), {report['hardware']}: {args.context}-token "
        f"contexts, {args.max_tokens} new tokens, {args.cache_memory:g} MiB of KV cache, prefill chunk "
        f"{args.prefill_chunk}\n"
        f"| policy | sequences | entries/slot | MiB allocated | peak entries (full caches) | wall s | median TTFT s | "
        f"generated tok/s | processed tok/s | sequences/step | decode tok/s | ms/step |\n"
        f"|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        flush=True,
    )
    for policy in args.policies:
        r = bench_policy(model, tok, policy, pool, args)
        report["rows"].append(r)
        records.write_json(args.out, report)
        if "note" in r:
            print(f"| {policy} | 0 | {r['entries_per_slot']} | {r['note']} ||||||||", flush=True)
            continue
        print(
            f"| {policy} | {r['sequences']} | {r['entries_per_slot']} | {r['cache_mib_allocated']:.1f} | "
            f"{r['peak_entries_in_use']:,} ({r['full_entries']:,}) | {r['wall_s']:.1f} | {r['ttft_median_s']:.1f} | "
            f"{r['generated_tokens_per_s']:.1f} | {r['processed_tokens_per_s']:.0f} | "
            f"{r['mean_sequences_per_step']:.1f} | {r['decode_tokens_per_s']:.1f} | {r['ms_per_decode_step']:.0f} |",
            flush=True,
        )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
