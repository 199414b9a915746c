"""Side-by-side comparison of several sweeps, e.g. a method sweep and its dense baseline:
one row per grid point of each sweep (a *variant*), eval-loss curves averaged over seeds,
and, where present, density schedules and MoE expert-load skew. Sweeps whose trials were
trained on different corpora (corpus fingerprints) are refused unless `allow_mixed_corpora`.

Used by the reproductions in experiments/ (experiments/reproduce.py)::

    variants = collect(["runs/dense_small", "runs/dst"])
    rows = compare_rows(variants, baseline=variants[0].label)
    markdown_table(rows); plot_comparison(variants, "dst.png", title="...")
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import textwrap
from typing import Any, Sequence

from matplotlib.figure import Figure
import numpy as np

from sparsejax.sweep.grid import point_name
from sparsejax.sweep.report import (MEAN_KEYS, STAT_KEYS, _fmt, check_one_corpus, fmt_mean_std,
                                    load_results, mean_std)
from sparsejax.sweep.runner import load_spec, trial_dir
from sparsejax.train.metrics import read_metrics

_LOAD_KEY = re.compile(r"^model/(.+)/expert_load$")
DENSITY_KEY = "sparsity/density"


@dataclasses.dataclass
class Variant:
    """One grid point of one sweep, with its finished seeds."""

    label: str
    sweep_dir: str
    point: tuple[tuple[str, str], ...]
    results: list[dict[str, Any]]  # result.json of each finished seed (with '_trial')

    @functools.cached_property
    def metrics(self) -> list[list[dict[str, Any]]]:
        """metrics.jsonl records of each finished seed (read once)."""
        return [read_metrics(os.path.join(trial_dir(self.sweep_dir, r["_trial"]),
                                          "metrics.jsonl")) for r in self.results]


def collect(sweep_dirs: Sequence[str], allow_mixed_corpora: bool = False) -> list[Variant]:
    """Variants of every sweep dir, in order; labelled `<dir name>: <grid point>`. Raises a
    ValueError if the finished trials were trained on different corpora, unless
    `allow_mixed_corpora`."""
    variants = []
    for d in sweep_dirs:
        spec = load_spec(d)
        results = load_results(d, spec)
        stem = os.path.basename(os.path.normpath(d))
        for point in spec.points():
            rs = [r for r in results if r["_trial"].point == point]
            variants.append(Variant(f"{stem}: {point_name(point)}", d, point, rs))
    check_one_corpus([r for v in variants for r in v.results], allow_mixed_corpora)
    return variants


def corpus_fingerprints(variants: Sequence[Variant]) -> list[str]:
    """The distinct corpus fingerprints of the variants' finished trials."""
    return check_one_corpus([r for v in variants for r in v.results], allow_mixed=True)


def expert_load_skew(record: dict[str, Any]) -> float | None:
    """max / mean expert load, averaged over the MoE layers of one metrics record (1.0 is a
    perfectly even load; E/top_k means all tokens go to top_k experts). None without MoE."""
    skews = []
    for key, load in record.items():
        if _LOAD_KEY.match(key) and isinstance(load, list) and load:
            arr = np.asarray(load, np.float64)
            if arr.mean() > 0:
                skews.append(float(arr.max() / arr.mean()))
    return float(np.mean(skews)) if skews else None


def _series(records: list[dict[str, Any]], fn) -> list[tuple[int, float]]:
    out = []
    for r in records:
        v = fn(r)
        if v is not None:
            out.append((int(r["step"]), float(v)))
    return out


def eval_curve(records):
    return _series(records, lambda r: r.get("eval_loss"))


def density_curve(records):
    return _series(records, lambda r: r.get(DENSITY_KEY))


def skew_curve(records):
    return _series(records, expert_load_skew)


def _last(series: list[tuple[int, float]]) -> float | None:
    return series[-1][1] if series else None


def compare_rows(variants: Sequence[Variant], baseline: str | None = None) -> list[dict[str, Any]]:
    """One row per variant: final/best eval loss (mean ± std over seeds, and each seed's value),
    the difference of the final eval loss to the baseline variant's with the same seed (mean ±
    std over the seeds both have), parameter counts, FLOPs, throughput, and the final density
    and expert-load skew where logged."""
    labels = [v.label for v in variants]
    if baseline is not None and baseline not in labels:
        raise ValueError(f"baseline={baseline!r} is not a variant; valid: {labels}")
    rows = []
    for v in variants:
        finals = [r.get("final_eval_loss") for r in v.results]
        row: dict[str, Any] = {"variant": v.label, "n_seeds": len(v.results),
                               "seeds": [r["_trial"].seed for r in v.results],
                               "final_eval_losses": finals}
        for k in STAT_KEYS:
            row[f"{k}_mean"], row[f"{k}_std"] = mean_std([r.get(k) for r in v.results])
        for k in MEAN_KEYS:
            row[k] = mean_std([r.get(k) for r in v.results])[0]
        recs = v.metrics
        row["density"] = mean_std([_last(density_curve(m)) for m in recs])[0]
        row["expert_load_skew"] = mean_std([_last(skew_curve(m)) for m in recs])[0]
        rows.append(row)
    base = next((r for r in rows if r["variant"] == baseline), None)
    base_by_seed = dict(zip(base["seeds"], base["final_eval_losses"])) if base else {}
    for row in rows:  # paired by seed: a seed fixes the data order of every variant
        deltas = [x - base_by_seed[s] for s, x in zip(row["seeds"], row["final_eval_losses"])
                  if x is not None and base_by_seed.get(s) is not None]
        row["delta_vs_baseline_mean"], row["delta_vs_baseline_std"] = mean_std(deltas)
    return rows


def markdown_table(rows: Sequence[dict[str, Any]],
                   extra_columns: Sequence[tuple[str, str]] = ()) -> str:
    """The comparison table; density / expert-load columns only when some variant has them;
    `extra_columns` [(header, row key)] come last, each cell the row's value as text (blank
    where the row has none)."""
    has_density = any(r["density"] is not None for r in rows)
    has_skew = any(r["expert_load_skew"] is not None for r in rows)
    cols = ["variant", "seeds", "final eval loss", "eval stderr", "per seed",
            "Δ vs baseline (same seed)",
            "best eval loss", "params", "avg params", "FLOPs/token", "tokens/s"]
    cols += ["final density"] * has_density + ["expert load max/mean"] * has_skew
    cols += [header for header, _ in extra_columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        dm = r["delta_vs_baseline_mean"]
        sign = "+" if dm is not None and dm >= 0 else ""
        cells = [r["variant"], str(r["n_seeds"]), fmt_mean_std(r, "final_eval_loss"),
                 _fmt(r["final_eval_loss_stderr"]), ", ".join(_fmt(x) for x in r["final_eval_losses"] if x is not None),
                 sign + fmt_mean_std(r, "delta_vs_baseline"),
                 fmt_mean_std(r, "best_eval_loss"),
                 _count(r["params"]), _count(r["avg_params"]),
                 _count(r["flops_per_token"]), _count(r["tokens_per_s"])]
        if has_density:
            cells.append(_fmt(r["density"], 3))
        if has_skew:
            cells.append(_fmt(r["expert_load_skew"], 2))
        cells += ["" if r.get(key) is None else str(r[key]) for _, key in extra_columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _count(v: float | None) -> str:
    return "" if v is None else f"{v:,.0f}"


def _mean_band(curves: list[list[tuple[int, float]]]):
    """Steps logged by every seed, with the mean, min and max over seeds at each."""
    common = sorted(set.intersection(*({s for s, _ in c} for c in curves)))
    if not common:
        return None
    vals = np.array([[dict(c)[s] for s in common] for c in curves])
    return np.array(common), vals.mean(0), vals.min(0), vals.max(0)


def plot_comparison(variants: Sequence[Variant], path: str, title: str = "") -> str | None:
    """Eval loss vs step (mean over seeds, min-max band), final eval loss per seed, and, when
    logged, density vs step (if it changes) and expert-load skew vs step. Returns the path
    (None if nothing has finished)."""
    done = [v for v in variants if v.results]
    if not done:
        return None
    recs = {v.label: v.metrics for v in done}
    panels = [("eval", eval_curve, "eval loss (nats/token)")]
    if any(len({d for _, d in density_curve(m)}) > 1 for ms in recs.values() for m in ms):
        panels.append(("curve", density_curve, "density of the prunable params"))
    if any(skew_curve(m) for ms in recs.values() for m in ms):
        panels.append(("curve", skew_curve, "expert load max/mean (1 = balanced)"))
    panels.append(("final", None, "final eval loss"))
    fig = Figure(figsize=(5.2 * len(panels), 4.6))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (kind, fn, ylabel) in zip(axes, panels):
        if kind == "final":
            for i, v in enumerate(done):
                ys = [r["final_eval_loss"] for r in v.results
                      if r.get("final_eval_loss") is not None]
                ax.scatter(ys, [i] * len(ys), color=f"C{i % 10}", alpha=0.7)
                if ys:
                    ax.plot([np.mean(ys)] * 2, [i - 0.3, i + 0.3], color=f"C{i % 10}", lw=2)
            ax.set_yticks(range(len(done)), [v.label for v in done], fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel(f"{ylabel} (dots: seeds; bar: mean)")
        else:
            late = []  # eval losses after the first third of training set the y range
            for i, v in enumerate(done):
                curves = [c for c in (fn(m) for m in recs[v.label]) if c]
                band = _mean_band(curves) if curves else None
                if band is None:
                    continue
                x, mean, lo, hi = band
                late += list(hi[x >= x.max() / 3]) + list(lo[x >= x.max() / 3])
                ax.plot(x, mean, "o-" if kind == "eval" else "-", ms=3, color=f"C{i % 10}",
                        label=v.label)
                if len(curves) > 1:
                    ax.fill_between(x, lo, hi, color=f"C{i % 10}", alpha=0.15)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            if kind == "eval":
                ax.legend(fontsize=6)
                if late:
                    pad = 0.05 * (max(late) - min(late) or 1.0)
                    ax.set_ylim(min(late) - pad, max(late) + pad)
        ax.grid(alpha=0.3)
    if title:  # wrapped to the figure's width (about 55 characters a panel)
        fig.suptitle(textwrap.fill(title, 55 * len(panels)))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


__all__ = ["Variant", "collect", "compare_rows", "corpus_fingerprints", "density_curve", "eval_curve",
           "expert_load_skew", "markdown_table", "plot_comparison", "skew_curve"]
