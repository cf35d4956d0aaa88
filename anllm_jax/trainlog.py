"""What a training run reports: the progress line (loss, throughput, MFU, ETA), metrics.jsonl, eval.jsonl,
TensorBoard scalars, jax.profiler traces of chosen steps, the compiled step's memory, and loss.png.

Only the first process writes files; every process keeps the same numbers.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import jax

from anllm_jax.config import ProfileConfig

log = logging.getLogger("anllm_jax.train")


def format_eta(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def _tensorboard_writer(logdir: Path) -> Any:
    # tensorboardX imports torch, when installed, only to accept torch tensors; keep torch (seconds of import, and
    # its CUDA runtime on GPU hosts) out of the JAX process.
    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        from tensorboardX import SummaryWriter
    finally:
        if blocked:
            del sys.modules["torch"]
    return SummaryWriter(str(logdir))


class RunLog:
    """Per-step metrics and held-out evaluations of one run: appended to <run dir>/metrics.jsonl and eval.jsonl,
    written as TensorBoard scalars and logged every `log_every` steps with throughput and ETA."""

    def __init__(
        self,
        run_dir: Path,
        primary: bool,
        steps: int,
        log_every: int,
        tokens_per_step: int,
        flops_per_step: float,
        n_devices: int,
        peak: float | None,
    ) -> None:
        self.steps, self.log_every, self.n_devices, self.peak = steps, log_every, n_devices, peak
        self.tokens_per_step, self.flops_per_step = tokens_per_step, flops_per_step
        self.run_start = self.last_time = time.time()
        self.done = 0
        self.writer = _tensorboard_writer(run_dir / "tensorboard") if primary else None
        self.metrics_file = open(run_dir / "metrics.jsonl", "a") if primary else None  # noqa: SIM115
        self.eval_file = open(run_dir / "eval.jsonl", "a") if primary else None  # noqa: SIM115

    def pause(self, seconds: float) -> None:
        """Keep time spent outside training steps (evaluation) out of the next step's throughput."""
        self.last_time += seconds

    def step(self, row: dict[str, Any]) -> None:
        """Derive throughput from `row["time"]`, then record and (every log_every steps) log the row."""
        now = row["time"]
        step_time, self.last_time = now - self.last_time, now
        self.done += 1
        row["step_time"] = step_time
        row["tokens_per_s"] = self.tokens_per_step / step_time
        row["tflops_per_device"] = self.flops_per_step / step_time / self.n_devices / 1e12
        row["mfu"] = row["tflops_per_device"] * 1e12 / self.peak if self.peak else None
        row["anchor_density"] = row["anchors"] / max(row["real_tokens"], 1.0)
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps(row) + "\n")
            self.metrics_file.flush()
        if self.writer is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_device", "anchor_density"):
                self.writer.add_scalar(f"train/{key}", row[key], row["step"])
            if row["mfu"] is not None:
                self.writer.add_scalar("train/mfu", row["mfu"], row["step"])
        if row["step"] % self.log_every == 0 or row["step"] == self.steps:
            eta = (self.steps - row["step"]) * (now - self.run_start) / self.done
            mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
            log.info(
                "step %d/%d | loss %.4f | lr %.2e | grad norm %.3f | %.0f tok/s | %.3f TFLOP/s/device | MFU %s | "
                "anchors %.1f%% | ETA %s",
                row["step"],
                self.steps,
                row["loss"],
                row["lr"],
                row["grad_norm"],
                row["tokens_per_s"],
                row["tflops_per_device"],
                mfu,
                100 * row["anchor_density"],
                format_eta(eta),
            )

    def evaluation(self, step: int, ppl: dict[str, float], tokens: int, when: str) -> None:
        log.info(
            "held-out perplexity %s: full mask %.3f | AnSAN mask %.3f (%d tokens)",
            when,
            ppl["full"],
            ppl["ansan"],
            tokens,
        )
        if self.eval_file is not None:
            self.eval_file.write(json.dumps({"step": step, "ppl_full": ppl["full"], "ppl_ansan": ppl["ansan"]}) + "\n")
            self.eval_file.flush()
        if self.writer is not None:
            for mask in ("full", "ansan"):
                self.writer.add_scalar(f"eval/ppl_{mask}", ppl[mask], step)

    def close(self) -> None:
        for f in (self.writer, self.metrics_file, self.eval_file):
            if f is not None:
                f.close()


class StepProfiler:
    """Traces steps [first_step, first_step + steps) with jax.profiler on the first process."""

    def __init__(self, cfg: ProfileConfig, logdir: Path, primary: bool) -> None:
        self.first, self.last = cfg.first_step, cfg.first_step + cfg.steps - 1
        self.enabled = primary and cfg.steps > 0
        self.logdir, self.active = logdir, False

    def before(self, step: int) -> None:
        if self.enabled and step == self.first:
            jax.profiler.start_trace(str(self.logdir))
            self.active = True

    def after(self, step: int, metrics: Any) -> None:
        if self.active and step == self.last:
            jax.block_until_ready(metrics)  # the trace must hold the whole step, not just its dispatch
            self.stop()

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            log.info(
                "profile of steps %d-%d written to %s (open with xprof or TensorBoard)",
                self.first,
                self.last,
                self.logdir,
            )


def log_compiled(compiled: Any, seconds: float) -> None:
    """The compiled step's compile time and per-device memory."""
    stats = compiled.memory_analysis()
    if stats is None:
        log.info("compiled train step in %.1f s", seconds)
        return
    gib = 1 / 2**30
    log.info(
        "compiled train step in %.1f s; per device: arguments %.3f GiB, outputs %.3f GiB, temporaries %.3f GiB, "
        "aliased (donated) %.3f GiB, code %.3f GiB",
        seconds,
        stats.argument_size_in_bytes * gib,
        stats.output_size_in_bytes * gib,
        stats.temp_size_in_bytes * gib,
        stats.alias_size_in_bytes * gib,
        stats.generated_code_size_in_bytes * gib,
    )


def plot_loss(run_dir: Path) -> None:
    """<run dir>/loss.png from metrics.jsonl (the last row of each step, after resumes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_step: dict[int, float] = {}
    with open(run_dir / "metrics.jsonl") as f:
        for line in f:
            row = json.loads(line)
            by_step[row["step"]] = row["loss"]
    steps = sorted(by_step)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [by_step[s] for s in steps])
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (next-token CE)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png", dpi=100)
    plt.close(fig)
