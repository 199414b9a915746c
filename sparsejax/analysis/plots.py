"""Plots written at the end of a run, from metrics.jsonl."""
from __future__ import annotations

import os
from typing import Sequence

from matplotlib.figure import Figure

from sparsejax.train.metrics import read_metrics

# Figures are drawn with matplotlib's object API (no pyplot), so writing plots never switches
# the global backend (a notebook keeps its inline plots).


def plot_loss_curve(metrics_path: str, out_path: str) -> str:
    """Training loss (and eval loss where logged) against step."""
    records = read_metrics(metrics_path)
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(os.path.basename(os.path.dirname(os.path.abspath(metrics_path))) or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    return out_path


def plot_vector_metric(metrics_path: str, prefix: str, out_path: str, ylabel: str,
                       title: str, contains: str = "") -> str | None:
    """One line per entry of every vector-valued (or scalar) metric whose name starts with
    `prefix` (e.g. per-layer density, per-expert load). Returns None if there is none."""
    records = read_metrics(metrics_path)
    series: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for k, v in r.items():
            if not k.startswith(prefix) or contains not in k or v is None:
                continue
            values: Sequence = v if isinstance(v, list) else [v]
            for i, x in enumerate(values):
                if isinstance(x, (int, float)):
                    name = k[len(prefix):].strip("/") + (f"[{i}]" if isinstance(v, list) else "")
                    series.setdefault(name, []).append((r["step"], x))
    if not series:
        return None
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for name, pts in sorted(series.items()):
        ax.plot(*zip(*pts), label=name if len(series) <= 16 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) <= 16:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    return out_path


def write_run_plots(workdir: str) -> None:
    """A run's loss curve, plus expert-load and density plots when those metrics were logged."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    plot_loss_curve(path, os.path.join(workdir, "loss.png"))
    plot_vector_metric(path, "model/", os.path.join(workdir, "expert_load.png"),
                       "fraction of tokens", "expert load over training", contains="expert_load")
    plot_vector_metric(path, "sparsity/density/", os.path.join(workdir, "density.png"),
                       "density", "per-layer density over training")
