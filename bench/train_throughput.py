"""Training throughput of the real train step: tokens/s, TFLOP/s per device and MFU, full vs AnSAN mask.

Runs `anllm_jax.train`'s compiled step (AdamW, FSDP over all devices, bf16 compute over float32 master weights)
on synthetic rows (random tokens, 1-3 packed documents per row, anchors at ~1 in 12 positions) for each
(model, sequence length, mask/attention path). Nothing is written to disk but the JSON result.

FLOP accounting (as the trainer's progress line): per token 6 * N_matmul + 6 * n_layers * n_heads * head_dim * T
(causal dense attention, forward + backward); the AnSAN rows count the same FLOPs, so their TFLOP/s compare
directly with the full-mask rows. Rematerialisation is not counted. MFU = TFLOP/s per device / the device's
dense bf16 peak (`trainstep.PEAK_FLOPS`; n/a on CPUs).

    python bench/train_throughput.py                     # GPU: SmolLM2-135M and Llama-3.2-1B, T = 2048, 4096
    python bench/train_throughput.py --quick             # CPU: 2-layer SmolLM2 shape and the small preset
    python bench/train_throughput.py --models llama3.2-1b --seqs 4096 --cases full:cudnn --out r.json
    python bench/train_throughput.py --cpu-peer                # CPU: SmolLM2-135M at 4 x 256 and 4 x 512, float32,
                                                               # beside PyTorch eager (transformers), same shapes

Case `full:torch` is the peer a user would otherwise pick: transformers' LlamaForCausalLM (sdpa attention, eager
PyTorch, random weights of the same config), AdamW with the same settings and gradient clipping, on the same token
rows, in the same process, so both run under the same host allocator (tcmalloc when installed, see
anllm_jax/hostmem.py; ANLLM_TCMALLOC=0 keeps glibc's).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from anllm_jax.hostmem import preload_tcmalloc  # noqa: E402

if __name__ == "__main__":
    preload_tcmalloc()  # as the CLIs do, before JAX allocates anything

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from anllm_jax import config, data, formats, records, sharding, trainstate, trainstep  # noqa: E402
from anllm_jax.config import MeshConfig, OptimizerConfig  # noqa: E402
from anllm_jax.model import Llama  # noqa: E402

ANCHOR = 13
GPU_CASES = ("full:cudnn_causal", "full:cudnn", "ansan:cudnn", "ansan:anchor", "ansan:anchor_pallas")
CPU_CASES = ("full:xla", "ansan:xla", "ansan:anchor")
CPU_PEER_CASES = ("full:xla", "ansan:xla", "full:torch")


def run_torch_case(model: str, overrides: dict, seq: int, batch: int, steps: int, warmup: int) -> dict:
    """PyTorch eager with transformers: forward, loss, backward, clipping and AdamW on the same rows as the JAX
    cases (full causal attention; transformers has no AnSAN mask)."""
    import torch
    import transformers

    mcfg = config.preset(model, **overrides)
    if mcfg.dtype != "float32":
        raise ValueError("the torch peer runs float32 only (CPU)")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**formats.hf_config(mcfg)))
    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    rows = data.SyntheticIterator(mcfg.vocab_size, (ANCHOR,), seq, batch)
    batches = [torch.from_numpy(next(rows)["tokens"]).long() for _ in range(2)]

    def step(ids: torch.Tensor) -> float:
        loss = hf(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for i in range(warmup):
        step(batches[i % 2])
    t0 = time.time()
    for i in range(steps):
        loss = step(batches[i % 2])
    dt = (time.time() - t0) / steps
    tokens = batch * seq
    return {
        "step_s": dt,
        "tokens_per_s": tokens / dt,
        "tflops_per_device": trainstep.flops_per_token(mcfg, seq) * tokens / dt / 1e12,
        "mfu": None,
        "loss": loss,
        "compile_s": 0.0,
        "temp_gib": None,
        "params_m": mcfg.num_params() / 1e6,
        "peer": f"transformers {transformers.__version__}, torch {torch.__version__} (eager, sdpa), "
        f"{torch.get_num_threads()} threads",
    }


def run_case(model: str, overrides: dict, seq: int, mask: str, impl: str, batch: int, steps: int, warmup: int) -> dict:
    mcfg = config.preset(
        model,
        attention=impl,
        anchor_mode="full" if mask == "full" else "ac",
        anchor_ids=() if mask == "full" else (ANCHOR,),
        **overrides,
    )
    mesh = sharding.make_mesh(MeshConfig())
    rules = sharding.axis_rules(MeshConfig())
    tx = trainstep.make_optimizer(OptimizerConfig(lr=1e-5, warmup_steps=1), steps + warmup)
    abstract = trainstate.abstract_state(mcfg, tx, mesh, rules)
    state = trainstate.fresh_state(mcfg, tx, abstract, seed=0)
    graphdef = nnx.split(nnx.eval_shape(lambda: Llama(mcfg, rngs=nnx.Rngs(0))))[0]
    t0 = time.time()
    compiled = trainstep.compile_step(
        graphdef, mcfg, tx, trainstep.lr_schedule(OptimizerConfig(), steps), 1, abstract, mesh, rules, (batch, seq)
    )
    compile_s = time.time() - t0
    mem = compiled.memory_analysis()
    b_shard = sharding.batch_sharding(mesh, rules)
    rows = data.SyntheticIterator(mcfg.vocab_size, mcfg.anchor_ids or (ANCHOR,), seq, batch)
    batches = [
        {k: jax.make_array_from_process_local_data(b_shard, v, (batch, seq)) for k, v in next(rows).items()}
        for _ in range(2)
    ]
    for i in range(warmup):
        state, metrics = compiled(state, batches[i % 2])
    jax.block_until_ready(state)
    t0 = time.time()
    for i in range(steps):
        state, metrics = compiled(state, batches[i % 2])
    jax.block_until_ready((state, metrics))
    dt = (time.time() - t0) / steps
    n_dev = mesh.devices.size
    tokens = batch * seq
    tflops = trainstep.flops_per_token(mcfg, seq) * tokens / dt / n_dev / 1e12
    peak = trainstep.peak_flops(jax.devices()[0].device_kind)
    return {
        "step_s": dt,
        "tokens_per_s": tokens / dt,
        "tflops_per_device": tflops,
        "mfu": tflops * 1e12 / peak if peak else None,
        "loss": float(metrics["loss"]),
        "compile_s": compile_s,
        "temp_gib": mem.temp_size_in_bytes / 2**30 if mem else None,
        "params_m": mcfg.num_params() / 1e6,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke sizes: 2-layer SmolLM2 shape and 'small', T=256/512")
    p.add_argument(
        "--cpu-peer", action="store_true", help="CPU: SmolLM2-135M, 4 rows of 256 and 512, float32, beside PyTorch"
    )
    p.add_argument("--models", default=None, help="comma-separated presets (default smollm2-135m,llama3.2-1b)")
    p.add_argument("--seqs", default=None, help="comma-separated sequence lengths (default 2048,4096)")
    p.add_argument("--cases", default=None, help=f"mask:attention pairs (GPU default {','.join(GPU_CASES)})")
    p.add_argument("--tokens-per-device", type=int, default=16384, help="batch = this * devices / T rows")
    p.add_argument("--remat", default="full", help="none | full | dots | dots_no_batch")
    p.add_argument("--dtype", default=None, help="compute dtype (default bfloat16; float32 with --quick)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default="artifacts/train_throughput.json")
    args = p.parse_args()

    on_cpu = jax.devices()[0].platform == "cpu"
    if args.quick:
        models = [("smollm2-135m", {"n_layers": 2}), ("small", {})]
        seqs = [256, 512]
        tokens_per_device, steps, warmup, dtype, remat = 512, 2, 1, args.dtype or "float32", "none"
    elif args.cpu_peer:
        models = [("smollm2-135m", {})]
        seqs = [256, 512]
        tokens_per_device, steps, warmup, dtype, remat = 0, args.steps, args.warmup, "float32", "none"
    else:
        models = [(m, {}) for m in (args.models or "smollm2-135m,llama3.2-1b").split(",")]
        seqs = [int(s) for s in (args.seqs or "2048,4096").split(",")]
        tokens_per_device, steps, warmup = args.tokens_per_device, args.steps, args.warmup
        dtype, remat = args.dtype or "bfloat16", args.remat
    default_cases = CPU_PEER_CASES if args.cpu_peer else CPU_CASES if on_cpu else GPU_CASES
    cases = args.cases.split(",") if args.cases else list(default_cases)
    n_dev = len(jax.devices())
    rows = []
    result = {
        "device": jax.devices()[0].device_kind,
        "devices": n_dev,
        "platform": platform.platform(),
        "jax": jax.__version__,
        "dtype": dtype,
        "remat": remat,
        "allocator": os.environ.get("LD_PRELOAD") or "system",
        "commit": records.commit(),
        "rows": rows,
    }

    def save() -> None:  # after every row: a run cut short keeps what it measured
        records.write_json(args.out, result)

    header = (
        f"{'model':<26} {'T':>5} {'mask':<6} {'attention':<14} {'tokens/s':>10} {'TFLOP/s/dev':>11} {'MFU':>6} "
        f"{'step ms':>9} {'temp GiB':>8}"
    )
    print(f"device: {jax.devices()[0].device_kind} x {n_dev}, dtype {dtype}, remat {remat}")
    print(header)
    print("-" * len(header))
    for model, shape in models:
        label = model + "".join(f"[{k}={v}]" for k, v in shape.items())
        for seq in seqs:
            batch = 4 if args.cpu_peer else max(1, tokens_per_device * n_dev // seq)
            batch += -batch % n_dev
            for case in cases:
                mask, impl = case.split(":")
                row = {"model": label, "seq_len": seq, "batch": batch, "mask": mask, "attention": impl}
                overrides = {**shape, "dtype": dtype, "remat": remat}
                try:
                    if impl == "torch":
                        row.update(run_torch_case(model, overrides, seq, batch, steps, warmup))
                    else:
                        row.update(run_case(model, overrides, seq, mask, impl, batch, steps, warmup))
                except Exception as e:  # an unsupported path or OOM is a result row, not the end of the table
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                rows.append(row)
                save()
                if "error" in row:
                    print(f"{label:<26} {seq:>5} {mask:<6} {impl:<14} {row['error']}")
                    continue
                mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
                temp = f"{row['temp_gib']:.2f}" if row["temp_gib"] is not None else "?"
                print(
                    f"{label:<26} {seq:>5} {mask:<6} {impl:<14} {row['tokens_per_s']:>10.0f} "
                    f"{row['tflops_per_device']:>11.3f} {mfu:>6} {1000 * row['step_s']:>9.1f} {temp:>8}"
                )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
