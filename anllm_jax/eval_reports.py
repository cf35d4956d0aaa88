"""Reports of an eval run: the markdown table and the accuracy / KV-reduction bar plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _fmt(x, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}" if pct else f"{x:.2f}"


def markdown_table(results: dict) -> str:
    lines = [] if results.get("complete", True) else ["**Partial results**: the run stopped or is still running.", ""]
    for shots, per_task in results["results"].items():
        modes = results["modes"]
        lines += [
            f"### {shots}-shot",
            "",
            "| task | mode | n | acc | acc_norm | kv_full | kv_kept | kv_reduction % | seconds | compile s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in per_task.items():
            for m in modes:
                s = r["modes"][m]
                lines.append(
                    f"| {name} | {m} | {s['n']} | {_fmt(s['acc'], True)} | {_fmt(s['acc_norm'], True)} | "
                    f"{s['kv_full']} | {s['kv_kept']} | {_fmt(s['kv_reduction'], True)} | "
                    f"{s['seconds']:.1f} | {s['compile_seconds']:.1f} |"
                )
        for m in modes:
            accs = [r["modes"][m]["acc"] for r in per_task.values()]
            lines.append(f"| **average** | {m} | | {_fmt(float(np.mean(accs)), True)} | | | | | | |")
        ratios = {n: r.get("time_ratio_no_cache_over_anchor_cache") for n, r in per_task.items()}
        if any(v is not None for v in ratios.values()):
            lines += ["", "| task | time no-cache / anchor-cache |", "|---|---|"]
            lines += [f"| {n} | {_fmt(v)} |" for n, v in ratios.items()]
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(results["results"].items())
    fig, axes = plt.subplots(len(runs), 2, figsize=(13, 3.6 * len(runs)), squeeze=False)
    modes = results["modes"]
    width = 0.8 / len(modes)
    for row, (shots, per_task) in enumerate(runs):
        names = list(per_task)
        x = np.arange(len(names))
        for k, m in enumerate(modes):
            acc = [100 * per_task[n]["modes"][m]["acc"] for n in names]
            red = [100 * per_task[n]["modes"][m]["kv_reduction"] for n in names]
            axes[row, 0].bar(x + k * width, acc, width, label=m)
            axes[row, 1].bar(x + k * width, red, width, label=m)
        for col, title in enumerate(("accuracy (acc, %)", "KV cache reduction (%)")):
            ax = axes[row, col]
            ax.set_title(f"{shots}-shot: {title}")
            ax.set_xticks(x + 0.4 - width / 2, names, rotation=30, ha="right")
            ax.set_ylim(0, 100)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
