"""Inference with the none / full / anchor KV cache policies, a 5-shot QA-like workload, and HF generate.

Per model and context length: prefill time, decode tokens/s and allocated KV bytes for each policy
("none" recomputes the whole prefix for every token: the paper's no-cache baseline). Prompts are random
tokens in sentences of 8-40 tokens, each ending with the anchor token (AnLLM-AC text), so about 4% of a
long prompt are anchors. Timings are of the second of two identical calls (the first compiles).

5-shot workload (the paper's acceleration protocol): 5 demonstrations form a shared prefix; each question
has 4 options. No cache: one masked forward over prefix + question + option per option. Anchor cache: the
prefix is prefilled once (its time included), then every question + option is scored against the cache
(`generate.score_continuations`). Reported: KV reduction of the prefix and T = time(no cache) / time(anchor).

HF transformers `generate` (greedy, same shapes, random weights of the same config) runs side by side when
torch and transformers import.

    python bench/inference.py --quick                 # CPU: SmolLM2-135M, contexts 256 and 1024
    python bench/inference.py                         # GPU: SmolLM2-135M and Llama-3.2-1B, 1k-32k
    python bench/inference.py --models smollm2-135m --contexts 4096,32768 --out results.json
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from anllm_jax import checkpoints, formats, kvcache, records  # noqa: E402
from anllm_jax import generate as gen_lib  # noqa: E402
from anllm_jax.config import preset  # noqa: E402
from anllm_jax.model import Llama, init_model  # noqa: E402

ANCHOR = 3  # the anchor token id of the synthetic AC text


def sentences(rng: np.random.Generator, n: int, vocab: int) -> list[int]:
    """n token ids: sentences of 8-40 random tokens, each ending with the anchor."""
    out: list[int] = []
    while len(out) < n:
        out += rng.integers(10, vocab, int(rng.integers(7, 40))).tolist() + [ANCHOR]
    return out[:n]


def load_model(name: str, dtype: str, attention: str) -> tuple[Llama, str]:
    """The real SmolLM2-135M when asked for and installed, else the preset with random weights; AC anchors."""
    overrides = {"dtype": dtype, "attention": attention, "anchor_mode": "ac", "anchor_ids": (ANCHOR,)}
    if name == "smollm2-135m":
        try:
            model, _ = checkpoints.load(checkpoints.smollm2_gguf_path(), dtype=dtype, attention=attention)
            # Contexts past the trained 8k measure speed and memory only.
            model.cfg = model.cfg.replace(anchor_mode="ac", anchor_ids=(ANCHOR,), max_seq_len=1 << 16)
            return model, "SmolLM2-135M-Instruct (GGUF weights)"
        except (ImportError, FileNotFoundError) as e:
            print(f"note: real SmolLM2 unavailable ({e}); using random weights", file=sys.stderr)
    cfg = preset(name, **overrides)
    return init_model(cfg.replace(max_seq_len=max(cfg.max_seq_len, 1 << 16))), f"{name} (random weights)"


def timed_twice(fn):
    """Run fn twice (the first compiles); return the second result and its wall time."""
    fn()
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def bench_generate(model: Llama, prompt: list[int], args, policy: str) -> dict:
    run = lambda: gen_lib.generate(
        model, [prompt] * args.batch, policy=policy, max_new_tokens=args.decode_tokens, chunk_size=args.chunk
    )
    g, _ = timed_twice(run)
    steps = args.decode_tokens - 1  # the first token comes from the prefill logits
    per = kvcache.bytes_per_entry(model.cfg)
    kv_entries = kvcache.kept_after(np.asarray(prompt), (ANCHOR,), policy) if policy != "none" else 0
    return {
        "prefill_s": g.stats["prefill_s"],
        "decode_tokens_per_s": args.batch * steps / g.stats["decode_s"],
        "decode_ms_per_step": 1e3 * g.stats["decode_s"] / steps,
        "kv_entries_after_prompt": kv_entries,
        "kv_bytes_after_prompt": kv_entries * per * args.batch,
        "kv_allocated_bytes": int(g.stats.get("allocated_bytes", 0)),
    }


def bench_hf(model: Llama, T: int, args) -> dict | None:
    try:
        import torch
        import transformers
    except ImportError:
        return None
    c = model.cfg
    hf_cfg = transformers.LlamaConfig(
        **formats.hf_config(c.replace(max_seq_len=T + args.decode_tokens + 8)), attn_implementation="sdpa"
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if c.dtype == "bfloat16" else torch.float32
    hf = transformers.LlamaForCausalLM(hf_cfg).to(device=device, dtype=dtype).eval()
    ids = torch.randint(10, c.vocab_size, (args.batch, T), device=device)

    def run(n: int) -> float:
        """Best of three timed calls after a warm-up (the difference of two runs is noisy otherwise)."""
        times = []
        for _ in range(4):
            t = time.perf_counter()
            with torch.no_grad():
                hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return min(times[1:])

    prefill_s = run(1)
    total_s = run(args.decode_tokens)
    steps = args.decode_tokens - 1
    # On a busy machine the difference of the two timings can drown in noise: report NaN, not a made-up rate.
    decode_s = total_s - prefill_s if total_s > prefill_s else float("nan")
    result = {
        "prefill_s": prefill_s,
        "decode_tokens_per_s": args.batch * steps / decode_s,
        "decode_ms_per_step": 1e3 * decode_s / steps,
        "kv_bytes_after_prompt": 2 * c.n_layers * c.n_kv_heads * c.head_dim * args.batch * T * dtype.itemsize,
        "version": f"transformers {transformers.__version__}, torch {torch.__version__}, {device}",
    }
    return result


@functools.partial(jax.jit, static_argnums=(0,))
def _logprob_sums(graphdef, state, tokens_BT, seg_BT, start_B):
    """Sum over each row of log p(token) for the tokens at or after start_B[b] (one masked forward)."""
    logits = nnx.merge(graphdef, state)(tokens_BT, segment_ids_BT=seg_BT)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    lp = jnp.take_along_axis(logp, tokens_BT[:, 1:, None], axis=-1)[..., 0]
    t = jnp.arange(1, tokens_BT.shape[1])[None]
    return jnp.sum(jnp.where((t >= start_B[:, None]) & (seg_BT[:, 1:] > 0), lp, 0.0), axis=1)


def bench_five_shot(model: Llama, args, rng: np.random.Generator) -> dict:
    V = model.cfg.vocab_size
    prefix = [t for _ in range(5) for t in sentences(rng, args.shot_tokens - 1, V) + [ANCHOR]]
    questions = [sentences(rng, args.question_tokens, V) for _ in range(args.questions)]
    options = [[rng.integers(10, V, args.option_tokens).tolist() for _ in range(4)] for _ in range(args.questions)]
    graphdef, state = nnx.split(model)

    def no_cache():
        width = gen_lib.bucket(len(prefix) + args.question_tokens + args.option_tokens)
        sums = []
        for q, opts in zip(questions, options, strict=True):
            rows = [prefix + q + o for o in opts]
            tokens = np.zeros((4, width), np.int32)
            seg = np.zeros((4, width), np.int32)
            for b, r in enumerate(rows):
                tokens[b, : len(r)], seg[b, : len(r)] = r, 1
            start = np.full((4,), len(prefix) + len(q))
            sums.append(_logprob_sums(graphdef, state, jnp.asarray(tokens), jnp.asarray(seg), jnp.asarray(start)))
        return np.asarray(jax.device_get(sums))

    def cached(policy: str):
        def run():
            cache, last = gen_lib.prefill(model, [prefix], policy=policy, chunk_size=args.chunk)
            sums = []
            for q, opts in zip(questions, options, strict=True):
                lps, _ = gen_lib.score_continuations(model, cache, last, [q + o for o in opts], batch_size=4)
                sums.append([float(np.sum(lp[len(q) :])) for lp in lps])
            return np.asarray(sums), int(jax.device_get(cache.length)[0])

        return run

    ref, t_none = timed_twice(no_cache)
    (got, kept), t_anchor = timed_twice(cached("anchor"))
    (_, _), t_full = timed_twice(cached("full"))
    return {
        "prefix_tokens": len(prefix),
        "questions": args.questions,
        "prefix_kv_entries_anchor": kept,
        "kv_reduction": 1.0 - kept / len(prefix),
        "time_no_cache_s": t_none,
        "time_full_cache_s": t_full,
        "time_anchor_cache_s": t_anchor,
        "T_no_cache_over_anchor": t_none / t_anchor,
        "max_abs_diff_option_logprob": float(np.max(np.abs(ref - got))),
    }


def main() -> None:
    gpu = jax.default_backend() == "gpu"
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small CPU sizes (the default without a GPU)")
    p.add_argument("--models", default=None, help="comma list of presets (default GPU: smollm2-135m,llama3.2-1b)")
    p.add_argument("--contexts", default=None, help="comma list of prompt lengths (default GPU: 1k,4k,16k,32k)")
    p.add_argument("--policies", default="none,full,anchor")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--decode-tokens", type=int, default=None)
    p.add_argument("--chunk", type=int, default=None, help="prefill chunk length")
    p.add_argument("--none-max-context", type=int, default=8192, help="skip the no-cache policy above this length")
    p.add_argument("--dtype", default=None, help="compute dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--attention", default="xla")
    p.add_argument("--questions", type=int, default=None)
    p.add_argument("--shot-tokens", type=int, default=None, help="tokens per demonstration (default 160, CPU 64)")
    p.add_argument("--question-tokens", type=int, default=40)
    p.add_argument("--option-tokens", type=int, default=6)
    p.add_argument("--no-hf", action="store_true", help="skip HF transformers generate")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "bench/results"), "inference.json"))
    args = p.parse_args()
    quick = args.quick or not gpu
    models = (args.models or ("smollm2-135m" if quick else "smollm2-135m,llama3.2-1b")).split(",")
    contexts = [int(c) for c in (args.contexts or ("256,1024" if quick else "1024,4096,16384,32768")).split(",")]
    args.decode_tokens = args.decode_tokens or (8 if quick else 64)
    args.chunk = args.chunk or (512 if quick else 2048)
    args.questions = args.questions or (2 if quick else 32)
    args.shot_tokens = args.shot_tokens or (64 if quick else 160)
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    report = {
        "date": datetime.date.today().isoformat(),
        "commit": records.commit(),
        "device": str(jax.devices()[0].device_kind),
        "platform": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "dtype": dtype,
        "batch": args.batch,
        "decode_tokens": args.decode_tokens,
        "chunk": args.chunk,
        "rows": [],
        "five_shot": [],
    }

    def save() -> None:
        records.write_json(args.out, report)

    rng = np.random.default_rng(0)
    head = (
        f"{'model':<14} {'ctx':>6} {'policy':<7} {'prefill s':>10} {'decode tok/s':>13} {'ms/step':>9} {'KV bytes':>13}"
    )
    for name in models:
        model, desc = load_model(name, dtype, args.attention)
        print(f"\n{desc}, {report['device']}, {dtype}, batch {args.batch}, {args.decode_tokens} new tokens\n{head}")
        for T in contexts:
            prompt = sentences(rng, T, model.cfg.vocab_size)
            runs = {p: None for p in args.policies.split(",")}
            if not args.no_hf:
                runs["hf"] = None
            for policy in runs:
                if policy == "none" and args.none_max_context < T:
                    continue
                r = bench_hf(model, T, args) if policy == "hf" else bench_generate(model, prompt, args, policy)
                if r is None:
                    continue
                kv = r.get("kv_bytes_after_prompt", 0)
                print(
                    f"{name:<14} {T:>6} {policy:<7} {r['prefill_s']:>10.3f} {r['decode_tokens_per_s']:>13.1f} "
                    f"{r['decode_ms_per_step']:>9.2f} {kv:>13,}",
                    flush=True,
                )
                report["rows"].append({"model": desc, "context": T, "policy": policy, **r})
                save()
        fs = bench_five_shot(model, args, rng)
        report["five_shot"].append({"model": desc, **fs})
        save()
        print(
            f"5-shot: prefix {fs['prefix_tokens']} tokens, anchor cache keeps {fs['prefix_kv_entries_anchor']} "
            f"(KV reduction {fs['kv_reduction']:.1%}); {fs['questions']} questions x 4 options: no cache "
            f"{fs['time_no_cache_s']:.3f}s, full cache {fs['time_full_cache_s']:.3f}s, anchor cache "
            f"{fs['time_anchor_cache_s']:.3f}s, T = {fs['T_no_cache_over_anchor']:.2f}x "
            f"(max |diff| of option log-probs {fs['max_abs_diff_option_logprob']:.2e})"
        )
        del model
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
