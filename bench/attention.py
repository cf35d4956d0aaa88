"""Attention under the AnSAN mask: forward and forward+backward time, TFLOP/s and memory per path and length.

Paths: cudnn_causal (plain causal flash attention, the speed to beat), cudnn_mask (cuDNN with the dense
anchor mask), xla_dense (the float32-softmax reference under the anchor mask), anchor (the sparse exact
path, anllm_jax.anchor_attention, pure JAX), anchor_pallas (the same with its Pallas forward kernel; GPU,
or interpret mode on CPU when named with --paths). Inputs: B rows of random sentences of 8-40 tokens, each
ending with an anchor.

FLOP accounting (two columns): `causal` counts 4*B*N*H * T(T+1)/2 per forward, the work of causal
attention, so it is comparable across paths and with published flash-attention figures; `mask` counts
4*B*N*H * (allowed entries of the anchor mask), the useful work. Forward+backward counts 3x the forward
(two matmuls forward, four backward; recomputation is not counted). Memory is the compiled temporaries
of the timed function (XLA's memory analysis), which excludes inputs and outputs.

    python bench/attention.py                       # GPU: B=4, 32 heads, head_dim 128, bf16, T=2k..32k
    python bench/attention.py --quick               # CPU: small sizes, float32, no cuDNN rows
    python bench/attention.py --lengths 4096 --paths anchor,cudnn_causal --out results.json
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from anllm_jax import anchor_attention, attention, masks, records  # noqa: E402

ANCHOR = 1
PATHS = ("anchor_pallas", "anchor", "cudnn_causal", "cudnn_mask", "xla_dense")
GPU_ONLY = ("cudnn_causal", "cudnn_mask", "anchor_pallas")


def sentence_tokens(rng: np.random.Generator, B: int, T: int, lo: int, hi: int) -> np.ndarray:
    """[B, T] token ids: sentences of lo..hi tokens, each ending with the anchor id."""
    toks = np.full((B, T), 2, np.int32)
    for b in range(B):
        ends = np.cumsum(rng.integers(lo, hi + 1, size=T // lo + 1)) - 1
        toks[b, ends[ends < T]] = ANCHOR
    return toks


def attention_fn(path: str, info: masks.TokenInfo):
    """q, k, v -> output under the anchor mask of `info` (cudnn_causal ignores the mask)."""
    if path == "cudnn_causal":
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    if path == "cudnn_mask":
        return lambda q, k, v: attention._cudnn(q, k, v, masks.allowed(info, info))
    if path == "xla_dense":
        return lambda q, k, v: attention._xla(q, k, v, masks.allowed(info, info))
    if path == "anchor":
        return lambda q, k, v: anchor_attention.anchor_attention(q, k, v, info)
    if path == "anchor_pallas":
        kernel = "pallas" if jax.default_backend() == "gpu" else "pallas_interpret"
        return lambda q, k, v: anchor_attention.anchor_attention(q, k, v, info, kernel=kernel)
    raise ValueError(f"unknown path {path!r}; choose from {', '.join(PATHS)}")


def time_compiled(compiled, args, iters: int) -> float:
    """Median wall time in ms of `iters` calls after one warm-up call."""
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def temp_bytes(compiled) -> int | None:
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # some backends report no memory analysis
        return None


def dense_bytes(path: str, B: int, N: int, T: int) -> int:
    """Rough lower bound of the T x T buffers a dense path needs (to skip sizes that cannot fit)."""
    if path == "xla_dense":
        return B * N * T * T * 4 * 2  # float32 scores and probabilities
    if path == "cudnn_mask":
        return B * T * T * 2  # the mask as a bf16 bias
    return 0


def run_one(path: str, B: int, T: int, N: int, K: int, H: int, dtype, iters: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    toks = sentence_tokens(rng, B, T, 8, 40)
    info = masks.token_info(jnp.asarray(toks), jnp.array([ANCHOR]))
    allowed_entries = int(jnp.sum(masks.allowed(info, info))) if T <= 8192 else None
    if allowed_entries is None:  # count row by row blocks to stay within memory
        allowed_entries = sum(
            int(jnp.sum(masks.allowed(jax.tree.map(lambda a, s=s: a[:, s : s + 1024], info), info)))
            for s in range(0, T, 1024)
        )
    key = jax.random.key(seed)
    kq, kk, kv, kd = jax.random.split(key, 4)
    q = jax.random.normal(kq, (B, T, N, H), dtype)
    k = jax.random.normal(kk, (B, T, K, H), dtype)
    v = jax.random.normal(kv, (B, T, K, H), dtype)
    do = jax.random.normal(kd, (B, T, N, H), dtype)
    fn = attention_fn(path, info)

    def fwd_bwd(q, k, v, do):
        o, vjp = jax.vjp(fn, q, k, v)
        return vjp(do)

    fwd_flops_causal = 4 * B * N * H * T * (T + 1) / 2
    fwd_flops_mask = 4 * N * H * allowed_entries
    row = {
        "path": path,
        "B": B,
        "T": T,
        "heads": N,
        "kv_heads": K,
        "head_dim": H,
        "dtype": jnp.dtype(dtype).name,
        "mask_density": allowed_entries / (B * T * T),
    }
    if path.startswith("anchor"):
        cap = anchor_attention.default_capacity(T)
        row["anchor_path"] = int(
            anchor_attention.select_path(info, anchor_attention.DEFAULT_BLOCK, cap, anchor_attention.DEFAULT_TIERS)
        )
    for name, f, args, mult in (("fwd", fn, (q, k, v), 1), ("fwd_bwd", fwd_bwd, (q, k, v, do), 3)):
        try:
            compiled = jax.jit(f).lower(*args).compile()
            ms = time_compiled(compiled, args, iters)
        except Exception as e:  # out of memory or an unsupported backend: record and go on
            row[f"{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            continue
        row[f"{name}_ms"] = ms
        row[f"{name}_tflops_causal"] = mult * fwd_flops_causal / (ms * 1e-3) / 1e12
        row[f"{name}_tflops_mask"] = mult * fwd_flops_mask / (ms * 1e-3) / 1e12
        tb = temp_bytes(compiled)
        row[f"{name}_temp_mib"] = None if tb is None else tb / 2**20
    return row


def fmt(x, spec: str) -> str:
    return "-".rjust(int(spec.split(".")[0])) if x is None else format(x, spec)


def print_table(rows: list[dict]) -> None:
    head = (
        f"{'path':<13}{'T':>7}{'fwd ms':>10}{'f+b ms':>10}{'f+b TF/s':>10}{'(mask)':>9}"
        f"{'fwd MiB':>10}{'f+b MiB':>10}  note"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        note = r.get("fwd_bwd_error") or r.get("fwd_error") or r.get("skipped") or ""
        if "anchor_path" in r:
            note = f"path {r['anchor_path']} " + note
        print(
            f"{r['path']:<13}{r['T']:>7}{fmt(r.get('fwd_ms'), '10.3f')}{fmt(r.get('fwd_bwd_ms'), '10.3f')}"
            f"{fmt(r.get('fwd_bwd_tflops_causal'), '10.3g')}{fmt(r.get('fwd_bwd_tflops_mask'), '9.3g')}"
            f"{fmt(r.get('fwd_temp_mib'), '10.0f')}{fmt(r.get('fwd_bwd_temp_mib'), '10.0f')}  {note}"
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small CPU sizes: B=1, 4 heads, head_dim 64, float32")
    p.add_argument("--lengths", default=None, help="comma-separated T values (default 2048..32768)")
    p.add_argument("--paths", default=None, help=f"comma-separated subset of {','.join(PATHS)}")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"])
    p.add_argument("--iters", type=int, default=None)
    p.add_argument(
        "--max-dense-gib",
        type=float,
        default=None,
        help="skip dense paths needing more (default: 60%% of device memory)",
    )
    p.add_argument("--out", default="attention_bench.json", help="JSON results file")
    a = p.parse_args(argv)

    backend = jax.default_backend()
    if a.quick:
        lengths, B, N, H, dtype, iters = (512, 1024, 2048), 1, 4, 64, "float32", 3
        paths = [x for x in PATHS if x not in GPU_ONLY]
    else:
        # The target length (4096) first, then the longest, so that a run cut short keeps what matters most.
        lengths, B, N, H, dtype, iters = (4096, 32768, 2048, 8192, 16384), 4, 32, 128, "bfloat16", 10
        paths = list(PATHS) if backend == "gpu" else [x for x in PATHS if x not in GPU_ONLY]
    lengths = [int(x) for x in a.lengths.split(",")] if a.lengths else lengths
    paths = a.paths.split(",") if a.paths else paths
    for x in paths:
        if x not in PATHS:
            p.error(f"unknown path {x!r}; choose from {', '.join(PATHS)}")
    B = a.batch or B
    N = a.heads or N
    K = a.kv_heads or N
    H = a.head_dim or H
    dtype = jnp.dtype(a.dtype or dtype)
    iters = a.iters or iters
    device = jax.devices()[0]
    if a.max_dense_gib is not None:
        max_dense = a.max_dense_gib * 2**30
    else:
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        limit = (stats or {}).get("bytes_limit")
        max_dense = 0.6 * limit if limit else math.inf

    meta = {
        "device": device.device_kind,
        "backend": backend,
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "commit": records.commit(),
        "host": platform.node(),
        "shape": {"B": B, "heads": N, "kv_heads": K, "head_dim": H, "dtype": dtype.name, "sentences": "8-40"},
        "flops": "causal: 4*B*N*H*T(T+1)/2 per forward; mask: 4*B*N*H*allowed entries; fwd+bwd = 3x fwd",
        "memory": "compiled temporaries (XLA memory analysis), inputs and outputs excluded",
    }
    rows = []
    for T in lengths:
        for path in paths:
            need = dense_bytes(path, B, N, T)
            if need > max_dense:
                rows.append({"path": path, "T": T, "skipped": f"needs ~{need / 2**30:.0f} GiB of T x T buffers"})
                print_row_progress(rows[-1])
                continue
            rows.append(run_one(path, B, T, N, K, H, dtype, iters, seed=T))
            print_row_progress(rows[-1])
            # After every row: a run cut short keeps what it measured.
            records.write_json(a.out, {"meta": meta, "rows": rows})
    print(f"\n{meta['device']} ({backend}), jax {meta['jax']}, {meta['date']}, commit {meta['commit']}")
    print(f"B={B} heads={N} kv_heads={K} head_dim={H} {dtype.name}, sentences 8-40 tokens")
    print_table(sorted(rows, key=lambda r: (r["T"], PATHS.index(r["path"]))))
    records.write_json(a.out, {"meta": meta, "rows": rows})
    print(f"wrote {a.out}")


def print_row_progress(r: dict) -> None:
    done = {k: round(v, 3) for k, v in r.items() if k.endswith("_ms")}
    errs = {k: v for k, v in r.items() if k.endswith("_error") or k == "skipped"}
    print(f"  {r['path']} T={r['T']}: {done} {errs}", flush=True)


if __name__ == "__main__":
    main()
