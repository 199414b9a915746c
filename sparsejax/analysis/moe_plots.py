"""Plots of `sparsejax moe-report` (moe_report.py) from its result: <stem>.png (expert load
per layer, super-expert ratios, segment coverage and cache hit rates) and
<stem>_coactivation.png (one co-activation matrix per MoE layer)."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sparsejax.analysis.plots import distinct_colors


def _label(r: dict) -> str:
    return f"layer {r['layer']}"


def overview_figure(result: dict[str, Any]) -> Figure:
    layers = result["layers"]
    fig = Figure(figsize=(13, 9))
    (ax_load, ax_super), (ax_cov, ax_hit) = fig.subplots(2, 2)
    width = max(r["num_experts"] for r in layers)
    load = np.full((len(layers), width), np.nan)
    for i, r in enumerate(layers):
        load[i, :r["num_experts"]] = r["load"]
    im = ax_load.imshow(load, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax_load, label="share of assignments")
    ax_load.set_yticks(range(len(layers)), [_label(r) for r in layers], fontsize=7)
    ax_load.set(xlabel="expert", title="expert load")

    colors = distinct_colors(len(layers))
    for i, r in enumerate(layers):
        ratio = np.array([np.nan if v is None else v for v in r["super_experts"]
                          ["ratio_to_median"]], float)
        ax_super.scatter(np.arange(len(ratio)), ratio, s=10, color=colors[i], label=_label(r))
        for e in r["super_experts"]["candidates"]:
            ax_super.annotate(f"L{r['layer']}/E{e}", (e, ratio[e]), fontsize=7)
    multiple = result["super_expert_settings"]["multiple"]
    ax_super.axhline(multiple, color="red", ls="--", lw=1, label=f"candidate: > {multiple:g}x")
    ax_super.set_yscale("log")
    ax_super.set(xlabel="expert", ylabel="max |down_proj output| / layer median",
                 title="super-expert candidates")
    ax_super.legend(fontsize=6, ncol=2)

    sizes = sorted({c for r in layers for c in r["cache_sizes"]})
    size_colors = dict(zip(sizes, distinct_colors(len(sizes))))
    segs = layers[0]["segment_lengths"]
    for c in sizes:
        ys = [[r["segment_coverage"][str(s)].get(str(c)) for s in segs] for r in layers
              if str(c) in r["segment_coverage"][str(segs[0])]]
        mean = [np.mean([y[j] for y in ys if y[j] is not None]) if any(
            y[j] is not None for y in ys) else np.nan for j in range(len(segs))]
        ax_cov.plot(segs, mean, "o-", color=size_colors[c], label=f"C = {c}")
    ax_cov.set_xscale("log", base=2)
    ax_cov.set(xlabel="segment length S (tokens)", ylabel="coverage (mean over layers)",
               title="one expert set of size C per segment", ylim=(0, 1.02))
    ax_cov.legend(fontsize=7)

    for i, r in enumerate(layers):
        cs = [int(c) for c in r["cache_hit_rate"]]
        ax_hit.plot(cs, [r["cache_hit_rate"][str(c)]["optimal"] for c in cs], "o-",
                    color=colors[i], label=f"{_label(r)} optimal")
        ax_hit.plot(cs, [r["cache_hit_rate"][str(c)]["lru"] for c in cs], "x--",
                    color=colors[i], alpha=0.6, label=f"{_label(r)} LRU")
    ax_hit.set(xlabel="cache size C (experts)", ylabel="hit rate",
               title="expert cache hit rate: optimal (Belady) and LRU", ylim=(0, 1.02))
    ax_hit.legend(fontsize=6, ncol=2)
    for ax in (ax_load, ax_super, ax_hit):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (ax_super, ax_cov, ax_hit):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def coactivation_figure(result: dict[str, Any]) -> Figure:
    layers = result["layers"]
    cols = min(4, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig = Figure(figsize=(3.6 * cols, 3.3 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols)).reshape(-1)
    for ax, r in zip(axes, layers):
        co = np.asarray(r["coactivation"], float) / max(r["tokens"], 1)
        im = ax.imshow(co, cmap="magma", interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046)
        ax.set(title=f"{_label(r)}: tokens on both / tokens", xlabel="expert",
               ylabel="expert")
        ax.title.set_fontsize(8)
    for ax in axes[len(layers):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_report(result: dict[str, Any], stem: str) -> list[str]:
    """Writes <stem>.png and <stem>_coactivation.png; returns their paths."""
    out = []
    for fig, path in ((overview_figure(result), stem + ".png"),
                      (coactivation_figure(result), stem + "_coactivation.png")):
        fig.savefig(path, dpi=90)
        out.append(path)
    return out
