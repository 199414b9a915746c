"""The plot of `sparsejax longeval`: retrieval accuracy against context length, one line per
task and their mean."""
from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure

from sparsejax.analysis.plots import distinct_colors


def longeval_figure(result: dict[str, Any], title: str = "") -> Figure:
    """Accuracy (± its standard error over examples) of each task against the length in
    tokens (log2 axis), and the mean over tasks in black."""
    lengths = [int(n) for n in result["lengths"]]
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for color, task in zip(distinct_colors(len(result["tasks"])), result["tasks"]):
        cells = [result["accuracy"][task][str(n)] for n in lengths]
        ax.errorbar(lengths, [c["mean"] for c in cells], yerr=[c["stderr"] for c in cells],
                    marker="o", capsize=3, color=color, label=task)
    ax.plot(lengths, [result["mean_accuracy"][str(n)] for n in lengths], color="black", lw=2,
            label="mean")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("accuracy (string match, mean over examples)")
    ax.set_title(title or "longeval")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_longeval(result: dict[str, Any], path: str, title: str = "") -> str:
    """Writes longeval_figure(result) to `path` and returns it."""
    longeval_figure(result, title).savefig(path, dpi=100)
    return path
