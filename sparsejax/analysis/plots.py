"""Plots written at the end of a run, from metrics.jsonl: loss.png (interval-mean train loss and
eval loss with its standard error), density.png (per-layer mask density as a step function
from the first step), expert_load.png (one panel per MoE layer, experts in numeric order)."""
from __future__ import annotations

import os
import re
from typing import Any, Sequence

from matplotlib import colormaps
import numpy as np
from matplotlib.figure import Figure

from sparsejax.train.metrics import read_metrics

# Figures are drawn with matplotlib's object API (no pyplot), so writing plots never switches
# the global backend (a notebook keeps its inline plots).

_LOAD_KEY = re.compile(r"^model/(.+)/expert_load$")
DENSITY_PREFIX = "sparsity/density/"


def natural_key(text: str) -> list[Any]:
    """Sort key that orders the numbers inside names numerically (layer_2 before layer_10)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def distinct_colors(n: int) -> list[Any]:
    """`n` colours that stay distinguishable: tab10 / tab20, then evenly spaced hues."""
    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["hsv"](i / n) for i in range(n)]


def _title(metrics_path: str) -> str:
    return os.path.basename(os.path.dirname(os.path.abspath(metrics_path))) or "run"


def _save(fig: Figure | None, out_path: str) -> str | None:
    if fig is None:
        return None
    fig.savefig(out_path, dpi=100)
    return out_path


def plot_loss_curve(metrics_path: str, out_path: str) -> str:
    """Writes loss_figure(metrics) to `out_path`."""
    return _save(loss_figure(read_metrics(metrics_path), _title(metrics_path)), out_path)


def plot_density(metrics_path: str, out_path: str) -> str | None:
    """Writes density_figure(metrics) to `out_path` (None: no per-layer density logged)."""
    return _save(density_figure(read_metrics(metrics_path), _title(metrics_path)), out_path)


def plot_expert_load(metrics_path: str, out_path: str) -> str | None:
    """Writes expert_load_figure(metrics) to `out_path` (None: no expert load logged)."""
    return _save(expert_load_figure(read_metrics(metrics_path), _title(metrics_path)), out_path)


def loss_figure(records: list[dict[str, Any]], title: str = "") -> Figure:
    """Train loss (the mean over each logging interval) and eval loss with ± 1 standard error
    bars (over the eval sample's rows) against step."""
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"], r.get("eval_loss_stderr") or 0.0, r.get("eval_rows"))
             for r in records if r.get("eval_loss") is not None]
    if train:
        ax.plot(*zip(*train), label="train loss (mean over each logging interval)")
    if evals:
        steps, loss, err, rows = zip(*evals)
        ax.errorbar(steps, loss, yerr=err, fmt="o-", capsize=3, ms=4,
                    label=f"eval loss ± stderr ({rows[-1]} validation rows)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _short_names(paths: Sequence[str]) -> dict[str, str]:
    """Drops the path parts every name shares (e.g. a trailing '/kernel'), keeping the rest."""
    split = {p: p.split("/") for p in paths}
    if len(paths) > 1:
        parts = list(split.values())
        head = 0
        while all(len(p) > head + 1 for p in parts) and len({p[head] for p in parts}) == 1:
            head += 1
        tail = 0
        while all(len(p) > head + tail + 1 for p in parts) and len({p[-1 - tail] for p in parts}) == 1:
            tail += 1
        split = {k: v[head:len(v) - tail] for k, v in split.items()}
    return {k: "/".join(v) for k, v in split.items()}


def _to_end(pts: list[tuple[int, float]], last_step: int) -> tuple[list[int], list[float]]:
    """x, y of a step function that holds its last value up to `last_step`."""
    if pts[-1][0] < last_step:
        pts = pts + [(last_step, pts[-1][1])]
    return [s for s, _ in pts], [v for _, v in pts]


def _step_series(records: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """(step, value) of a scalar metric, one per step (the last record of a step wins), sorted."""
    out: dict[int, float] = {}
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[int(r["step"])] = float(v)
    return sorted(out.items())


def density_figure(records: list[dict[str, Any]], title: str = "") -> Figure | None:
    """Each masked layer's density as a step function from its first record (step 0: the
    initial masks) to the run's last step, changing only where a mask update logged a new
    value; the overall density in black; line styles cycle so that equal densities stay
    visible. None if no per-layer density was logged."""
    keys = sorted({k for r in records for k in r if k.startswith(DENSITY_PREFIX)}, key=natural_key)
    if not keys:
        return None
    last_step = max(int(r["step"]) for r in records)
    names = _short_names([k[len(DENSITY_PREFIX):] for k in keys])
    many = len(keys) > 12
    fig = Figure(figsize=(9 if not many else 11, 4.5))
    ax = fig.subplots()
    styles = ("-", "--", ":", "-.")
    for i, (key, color) in enumerate(zip(keys, distinct_colors(len(keys)))):
        x, y = _to_end(_step_series(records, key), last_step)
        ax.step(x, y, where="post", color=color, lw=1.4, ls=styles[i % len(styles)],
                label=names[key[len(DENSITY_PREFIX):]])
    overall = _step_series(records, "sparsity/density")
    if overall:
        x, y = _to_end(overall, last_step)
        ax.step(x, y, where="post", color="black", lw=2.2, label="overall")
    ax.set_xlim(0, max(last_step, 1))
    ax.set_xlabel("step")
    ax.set_ylabel("density (fraction of weights kept)")
    ax.set_title(f"per-layer density: {title}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), ncol=2 if many else 1,
              frameon=False)
    fig.tight_layout()
    return fig


def expert_load_figure(records: list[dict[str, Any]], title: str = "") -> Figure | None:
    """One panel per MoE layer (numeric layer order): the load of each expert (experts in
    numeric order, distinct colours) against step, and the balanced load 1/E as a dashed line.
    None if no expert load was logged."""
    layers = sorted({m.group(1) for r in records for k in r if (m := _LOAD_KEY.match(k))},
                    key=natural_key)
    if not layers:
        return None
    cols = min(len(layers), 3)
    rows = -(-len(layers) // cols)
    fig = Figure(figsize=(4.8 * cols + 1.2, 3.4 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, layer in zip(axes, layers):
        key = f"model/{layer}/expert_load"
        pts = [(int(r["step"]), r[key]) for r in records if isinstance(r.get(key), list)]
        steps = [s for s, _ in pts]
        loads = np.array([v for _, v in pts], np.float64)  # [records, E]
        e = loads.shape[1]
        for i, color in zip(range(e), distinct_colors(e)):
            ax.plot(steps, loads[:, i], color=color, lw=1.2, label=f"expert {i}")
        ax.axhline(1.0 / e, color="black", ls="--", lw=1.2, label=f"1/E = {1.0 / e:.3g}")
        ax.set_title(layer, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("fraction of assignments")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    for ax in axes[len(layers):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center right", frameon=False,
               ncol=1 if len(labels) <= 17 else 2)
    fig.suptitle(f"expert load: {title}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - (1.0 if len(labels) <= 17 else 2.0) / (4.8 * cols + 1.2), 1))
    return fig


def write_run_plots(workdir: str) -> None:
    """A run's loss curve, plus expert-load and density plots when those metrics were logged."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    plot_loss_curve(path, os.path.join(workdir, "loss.png"))
    plot_expert_load(path, os.path.join(workdir, "expert_load.png"))
    plot_density(path, os.path.join(workdir, "density.png"))
