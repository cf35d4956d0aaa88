"""The HF export's transformers model (modeling_anllm.py, trust_remote_code) against `anllm_jax.generate` with the
anchor cache on a real model: greedy tokens, per-step logits, and the KV entries and bytes each cache holds.

    python bench/hf_anchor_cache.py --new-tokens 32 --json hf_anchor_cache.json

SmolLM2-135M-Instruct (the packaged GGUF) in float32, put in EP mode ("." anchors, no AnSAN training), exported to
an HF folder with its modeling file; 10 prompts of 2-5 sentences (SciQ support passages), generated as one
left-padded batch by transformers' `generate` and one right-padded batch by anllm-jax. Every step's transformers
logits are compared with one AnSAN forward of anllm-jax over the prompt and the generated tokens. No timing: both
run the same function, and this checks that they do.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from anllm_jax import checkpoints, formats, generate, kvcache, records, sentences, tasks


def prompts(tok, n: int = 10) -> list[list[int]]:
    """The first `n` SciQ support passages with at least 3 sentences, cut to their first 2-5 sentences."""
    out = []
    for doc in tasks.load_task("sciq").docs:
        support = doc.query.split("\nQuestion:")[0]
        spans = sentences.sentence_spans(support)
        if len(spans) >= 3:
            out.append(tok.encode(support[: spans[min(len(spans), 2 + len(out) % 4) - 1][1]]))
        if len(out) == n:
            return out
    raise ValueError(f"fewer than {n} SciQ passages with 3 sentences")


def run(new_tokens: int) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM

    model, tok = checkpoints.load("smollm2", dtype="float32")
    model, tok = checkpoints.set_anchor_mode(model, tok, "ep")
    folder = os.path.join(tempfile.mkdtemp(prefix="hf_anchor_cache_"), "smollm2-ep")
    formats.export_hf(model, tok, folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    rows = prompts(tok)
    ours = generate.generate(model, rows, policy="anchor", max_new_tokens=new_tokens)
    width = max(map(len, rows))
    ids, pad = torch.zeros(len(rows), width, dtype=torch.long), torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r) :], pad[b, width - len(r) :] = torch.tensor(r), 1
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids,
            attention_mask=pad,
            max_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=tok.eos_id,
            eos_token_id=None,
        )
    cache = out.cache if "cache" in out else out.past_key_values
    full_rows = [r + t for r, t in zip(rows, ours.tokens, strict=True)]
    tokens = np.zeros((len(rows), width + new_tokens), np.int32)
    segments = np.zeros_like(tokens)
    for b, r in enumerate(full_rows):
        tokens[b, : len(r)], segments[b, : len(r)] = r, 1
    masked = np.asarray(model(jnp.asarray(tokens), segment_ids_BT=jnp.asarray(segments), mask="anchor"))
    per_row = []
    for b, r in enumerate(rows):
        hf_tokens = out.sequences[b, width:].tolist()
        steps = min(len(hf_tokens), len(ours.tokens[b]))
        diff = max(float(np.abs(out.logits[t][b].numpy() - masked[b, len(r) - 1 + t]).max()) for t in range(steps))
        per_row.append(
            {
                "prompt_tokens": len(r),
                "same_tokens": hf_tokens == ours.tokens[b],
                "max_abs_logit_diff": diff,
                "hf_cache_entries": int(cache.valid[b].sum()),
                "anllm_jax_cache_entries": int(ours.cache.length[b]),
                "full_cache_entries": len(r) + new_tokens - 1,
            }
        )
    return {
        "commit": records.commit(),
        "device": records.hardware(),
        "new_tokens": new_tokens,
        "bytes_per_entry": kvcache.bytes_per_entry(model.cfg),
        "rows": per_row,
        "hf_cache": cache.stats(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)
    report = run(args.new_tokens)
    print("| prompt tokens | same greedy tokens | max abs Δ logit | HF cache entries | anllm-jax entries | full |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in report["rows"]:
        print(
            f"| {r['prompt_tokens']} | {r['same_tokens']} | {r['max_abs_logit_diff']:.1e} | {r['hf_cache_entries']} | "
            f"{r['anllm_jax_cache_entries']} | {r['full_cache_entries']} |"
        )
    s = report["hf_cache"]
    print(
        f"\nHF anchor cache: {s['cache_entries']:,} entries, {s['cache_bytes']:,} bytes; a full cache: "
        f"{s['full_cache_entries']:,} entries, {s['full_cache_bytes']:,} bytes (reduction {s['reduction']:.1%})"
    )
    if args.json:
        records.write_json(args.json, report, indent=2)
    ok = all(r["same_tokens"] and r["hf_cache_entries"] == r["anllm_jax_cache_entries"] for r in report["rows"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
