"""Sweep results table (CSV + Markdown) and plots, from the finished trials of a sweep dir.

Per grid point: final and best eval loss as mean ± std over the finished seeds (sample std,
ddof=1; blank with one seed), the eval's own standard error over its sample rows (mean over
seeds; how far one run's eval loss is from its value on the whole split), params (final
nonzero; the mask-aware logged count for sparsity runs), average params over the run, forward
FLOPs per token and tokens/s (means over seeds).

Trials trained on different corpora (different `corpus_fingerprint`s: another Python's
standard library, edited files) are refused in one table unless `allow_mixed_corpora`.
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Any

from matplotlib.figure import Figure
import numpy as np

from sparsejax.sweep.grid import SweepSpec, point_name, short_key
from sparsejax.sweep.runner import load_spec, trial_dir
from sparsejax.sweep.summary import RESULT_FILE
from sparsejax.train.metrics import read_metrics

CSV_FILE, MD_FILE = "results.csv", "results.md"
LOSS_CURVES_PNG = "loss_curves.png"
STAT_KEYS = ("final_eval_loss", "best_eval_loss")
MEAN_KEYS = ("final_eval_loss_stderr", "params", "avg_params", "flops_per_token", "tokens_per_s")
NOT_RECORDED = "not recorded"


def column_keys(spec: SweepSpec) -> list[str]:
    """Table column per swept binding: its parameter name, or the full binding if two clash."""
    keys = [short_key(b) for b, _ in spec.sweeps]
    return keys if len(set(keys)) == len(keys) else [b for b, _ in spec.sweeps]


def load_results(out: str, spec: SweepSpec | None = None) -> list[dict[str, Any]]:
    """result.json of every finished trial, in grid order."""
    spec = spec or load_spec(out)
    results = []
    for t in spec.trials():
        path = os.path.join(trial_dir(out, t), RESULT_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                results.append({**json.load(f), "_trial": t})
    return results


def check_one_corpus(results: list[dict[str, Any]], allow_mixed: bool = False) -> list[str]:
    """The corpus fingerprints of `results` (finished trials); a ValueError naming each
    fingerprint and its trials if there is more than one, unless `allow_mixed`."""
    groups: dict[str, list[str]] = {}
    for r in results:
        name = r.get("trial") or (r["_trial"].name if "_trial" in r else "?")
        groups.setdefault(r.get("corpus_fingerprint") or NOT_RECORDED, []).append(name)
    if len(groups) > 1 and not allow_mixed:
        listed = "; ".join(f"{fp}: {len(ts)} trials ({', '.join(ts[:3])}{', ...' if len(ts) > 3 else ''})"
                           for fp, ts in sorted(groups.items()))
        raise ValueError(f"these trials were trained on different corpora (corpus_fingerprint {listed}); "
                         "rerun them on one Python / dataset, or pass --allow_mixed_corpora to put them "
                         "in one table anyway")
    return sorted(groups)


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) > 1 else None)


def aggregate(spec: SweepSpec, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per grid point (all points, with n_seeds=0 where nothing has finished)."""
    rows = []
    for point in spec.points():
        rs = [r for r in results if r["_trial"].point == point]
        row: dict[str, Any] = dict(zip(column_keys(spec), (v for _, v in point)))
        row["n_seeds"] = len(rs)
        for k in STAT_KEYS:
            row[f"{k}_mean"], row[f"{k}_std"] = mean_std([r.get(k) for r in rs])
        for k in MEAN_KEYS:
            row[k] = mean_std([r.get(k) for r in rs])[0]
        rows.append(row)
    return rows


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isfinite(v) and abs(v) >= 1e5:
            return f"{v:.4g}"
        return f"{v:.{digits}f}"
    return str(v)


def fmt_mean_std(row: dict[str, Any], key: str) -> str:
    """'mean ± std' of row[key_mean] and row[key_std] ('' when there is no mean)."""
    m, s = row[f"{key}_mean"], row[f"{key}_std"]
    return "" if m is None else _fmt(m) + ("" if s is None else f" ± {_fmt(s)}")


def write_table(out: str, spec: SweepSpec, rows: list[dict[str, Any]],
                corpora: list[str] | None = None) -> tuple[str, str]:
    keys = column_keys(spec)
    cols = keys + ["n_seeds"] + [f"{k}_{s}" for k in STAT_KEYS for s in ("mean", "std")] + list(
        MEAN_KEYS)
    csv_path = os.path.join(out, CSV_FILE)
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for row in rows:
            w.writerow(["" if row[c] is None else row[c] for c in cols])
    md_cols = keys + ["seeds", "final eval loss", "eval stderr", "best eval loss", "params",
                      "avg params", "FLOPs/token", "tokens/s"]
    lines = ["| " + " | ".join(md_cols) + " |", "|" + "---|" * len(md_cols)]
    n_seeds = len(spec.seeds)
    for row in rows:
        cells = [str(row[k]) for k in keys] + [f"{row['n_seeds']}/{n_seeds}"]
        cells += [fmt_mean_std(row, "final_eval_loss"), _fmt(row["final_eval_loss_stderr"]),
                  fmt_mean_std(row, "best_eval_loss")]
        cells += [_fmt(row["params"], 0), _fmt(row["avg_params"], 0),
                  _fmt(row["flops_per_token"], 0), _fmt(row["tokens_per_s"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    md_path = os.path.join(out, MD_FILE)
    with open(md_path, "w") as f:
        f.write(f"# Sweep results\n\ngin files: {', '.join(spec.gin_files)}; seeds: "
                f"{list(spec.seeds)}; loss columns: mean ± std over seeds (nats/token); eval "
                f"stderr: standard error of one trial's final eval loss over its eval sample's "
                f"rows (mean over seeds); corpus fingerprint: {', '.join(corpora or []) or 'n/a'}"
                f"\n\n")
        f.write("\n".join(lines) + "\n")
    return csv_path, md_path


def _figure(figsize):
    """A figure from matplotlib's object API: no pyplot, so the global backend is untouched."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots()


def plot_loss_curves(out: str, results: list[dict[str, Any]]) -> str | None:
    """Train loss (lines) and eval loss (markers) of every finished trial."""
    if not results:
        return None
    fig, ax = _figure((8, 5))
    for i, r in enumerate(results):
        recs = read_metrics(os.path.join(trial_dir(out, r["_trial"]), "metrics.jsonl"))
        color = f"C{i % 10}"
        tr = [(x["step"], x["loss"]) for x in recs if x.get("loss") is not None]
        ev = [(x["step"], x["eval_loss"]) for x in recs if x.get("eval_loss") is not None]
        if tr:
            ax.plot(*zip(*tr), color=color, label=r["trial"])
        if ev:
            ax.plot(*zip(*ev), "o--", color=color, alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token); o = eval")
    ax.set_title("loss curves per trial")
    ax.grid(alpha=0.3)
    if len(results) <= 20:
        ax.legend(fontsize=6)
    fig.tight_layout()
    path = os.path.join(out, LOSS_CURVES_PNG)
    fig.savefig(path, dpi=100)
    return path


def _as_number(v: str) -> float | None:
    try:
        return float(v)
    except ValueError:
        return None


def plot_vs_swept(out: str, spec: SweepSpec, rows: list[dict[str, Any]]) -> list[str]:
    """For each swept binding: final eval loss (mean, std error bars) against its values,
    one line per combination of the other swept bindings."""
    paths = []
    keys = column_keys(spec)
    for i, (binding, values) in enumerate(spec.sweeps):
        nums = [_as_number(v) for v in values]
        numeric = all(n is not None for n in nums)
        xpos = {v: (n if numeric else j) for j, (v, n) in enumerate(zip(values, nums))}
        groups: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            other = tuple((b, row[k]) for j, (b, k) in enumerate(zip(
                [b for b, _ in spec.sweeps], keys)) if j != i)
            groups.setdefault(point_name(other) if other else "", []).append(row)
        fig, ax = _figure((6, 4))
        drew = False
        for label, grp in groups.items():
            pts = [(xpos[r[keys[i]]], r["final_eval_loss_mean"], r["final_eval_loss_std"] or 0.0)
                   for r in grp if r["final_eval_loss_mean"] is not None]
            if not pts:
                continue
            pts.sort()
            x, y, e = zip(*pts)
            ax.errorbar(x, y, yerr=e, fmt="o-", capsize=3, label=label or None)
            drew = True
        if not drew:
            continue
        if not numeric:
            ax.set_xticks(list(xpos.values()), [str(v) for v in values])
        ax.set_xlabel(binding)
        ax.set_ylabel("final eval loss (mean ± std over seeds)")
        ax.grid(alpha=0.3)
        if len(groups) > 1:
            ax.legend(fontsize=6)
        fig.tight_layout()
        path = os.path.join(out, f"eval_loss_vs_{keys[i]}.png")
        fig.savefig(path, dpi=100)
        paths.append(path)
    return paths


def write_report(out: str, allow_mixed_corpora: bool = False) -> dict[str, Any]:
    """Regenerates the table and plots of the sweep in `out` from its finished trials (refused
    if they were trained on different corpora, unless `allow_mixed_corpora`)."""
    spec = load_spec(out)
    results = load_results(out, spec)
    corpora = check_one_corpus(results, allow_mixed_corpora)
    rows = aggregate(spec, results)
    csv_path, md_path = write_table(out, spec, rows, corpora)
    plots = [p for p in [plot_loss_curves(out, results)] if p] + plot_vs_swept(out, spec, rows)
    return {"finished": len(results), "total": len(spec.trials()), "csv": csv_path,
            "markdown": md_path, "plots": plots, "corpus_fingerprints": corpora}
