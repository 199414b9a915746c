"""Plots of activation sparsity: eval loss against training-free sparsity per thresholding
method (`sparsejax act-curves`)."""
from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure

from sparsejax.analysis.plots import distinct_colors


def plot_curves(result: dict[str, Any], path: str, title: str = "") -> str:
    """Eval loss (± its standard error) against the achieved sparsity (mean over sites) for
    each method of an act-curves result, with the model's own loss as a line; returns path."""
    points = result["points"]
    dense = [p for p in points if p["method"] == "dense"]
    methods = [m for m in dict.fromkeys(p["method"] for p in points) if m != "dense"]
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for color, m in zip(distinct_colors(len(methods)), methods):
        pts = sorted((p for p in points if p["method"] == m), key=lambda p: p["sparsity"])
        ax.errorbar([p["sparsity"] for p in pts], [p["eval_loss"] for p in pts],
                    yerr=[p["eval_loss_stderr"] or 0.0 for p in pts], marker="o", capsize=3,
                    color=color, label=m)
    if dense:
        ax.axhline(dense[0]["eval_loss"], color="black", lw=1, ls="--", label="no thresholds")
    ax.set_xlabel("achieved sparsity (fraction of entries zeroed, mean over sites)")
    ax.set_ylabel("eval loss (nats/token)")
    ax.set_title(title or f"training-free activation sparsity (step {result.get('step')})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
