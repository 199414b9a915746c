"""The two activation-sparsity reproductions of experiments/reproduce.py.

* `activation`: SiLU vs ReLU vs ReLU^2 vs ProSparse on the small model (grids
  activation_functions and prosparse): final eval loss, and the exact-zero fraction of the
  MLP intermediates at every eval over training; each final checkpoint's PPL-1% sparsity
  (`sparsejax eval --gin.PplSparsity.percents=(1.0,)`, cached as ppl.json in the trial).
* `training_free`: TEAL vs CATS vs WINA on a model trained with base.gin (SiLU, 200 steps):
  eval loss (on 32,768 eval tokens) at 25/40/50/65% sparsity from `sparsejax act-curves`, at each method's own sites
  (curves_all: TEAL and WINA on all seven projections) and on the MLP intermediate alone
  (curves_mlp: TEAL and WINA on the down projection's input, the entries CATS zeroes too).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Any

import numpy as np

GRIDS = ("activation_functions", "prosparse")
TARGETS = (0.25, 0.4, 0.5, 0.65)
EVAL_TOKENS = 32768  # act-curves eval sample: 128 rows of 256 tokens (13 evals per curve file)
CURVES = {"curves_all": None, "curves_mlp": ("down",)}


def _cli(args: list[str]) -> dict[str, Any]:
    """Runs `sparsejax ARGS` in-process; its JSON result (ValueError on failure)."""
    import gin
    from sparsejax import cli
    gin.clear_config()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(args)
    if rc != 0:
        raise ValueError(f"sparsejax {' '.join(args)} exited {rc}")
    return json.loads(buf.getvalue().strip().splitlines()[-1])


# --- 1: activation functions and ProSparse ---------------------------------------------------


def _label(v) -> str:
    point = dict(v.point)
    if "ModelConfig.mlp_activation" in point:
        return point["ModelConfig.mlp_activation"].strip("'")
    return f"prosparse {point.get('ProSparseRegularizer.factors', '')}"


def ppl_sparsity(trial: str) -> dict[str, Any]:
    """PPL-1% sparsity of a finished trial's final checkpoint (cached in trial/ppl.json)."""
    path = os.path.join(trial, "ppl.json")
    if not os.path.exists(path):
        out = _cli(["eval", f"--workdir={trial}", "--gin.PplSparsity.percents=(1.0,)",
                    "--gin.evaluate_checkpoint.eval_tokens=32768"])
        with open(path, "w") as f:
            json.dump(out, f)
    with open(path) as f:
        return json.load(f)


def activation_rows(out: str) -> tuple[list[dict[str, Any]], dict[str, dict]]:
    """Table rows and per-variant curves {label: {'steps', 'loss', 'zero'} (seed means)}."""
    from sparsejax.sweep import compare
    from sparsejax.sweep.runner import trial_dir
    variants = compare.collect([os.path.join(out, g) for g in GRIDS])
    base = {r["_trial"].seed: r["final_eval_loss"] for v in variants if _label(v) == "silu"
            for r in v.results}
    rows, curves = [], {}
    for v in variants:
        if not v.results:
            continue
        evals = [[r for r in recs if "eval_loss" in r] for recs in v.metrics]
        steps = [r["step"] for r in evals[0]]
        zero = np.mean([[r.get("act/zero_fraction", 0.0) for r in e] for e in evals], axis=0)
        loss = np.mean([[r["eval_loss"] for r in e] for e in evals], axis=0)
        curves[_label(v)] = {"steps": steps, "zero": zero.tolist(), "loss": loss.tolist()}
        finals = [r["final_eval_loss"] for r in v.results]
        deltas = [r["final_eval_loss"] - base[r["_trial"].seed] for r in v.results
                  if r["_trial"].seed in base]
        ppl = [ppl_sparsity(trial_dir(v.sweep_dir, r["_trial"])) for r in v.results]
        last = [e[-1] for e in evals]
        rows.append({
            "variant": _label(v), "seeds": len(finals),
            "loss": (np.mean(finals), np.std(finals, ddof=1) if len(finals) > 1 else 0.0),
            "delta": (np.mean(deltas), np.std(deltas, ddof=1) if len(deltas) > 1 else 0.0)
            if deltas else None,
            "stderr": np.mean([e["eval_loss_stderr"] for e in last]),
            "zero_first": zero[0], "zero_final": zero[-1],
            "below": np.mean([e.get("act/below_0.01", 0.0) for e in last]),
            "chunk": np.mean([e.get("act/chunk8_zero_fraction", 0.0) for e in last]),
            "ppl1": np.mean([p["act/ppl_1%_sparsity"] for p in ppl]),
        })
    return rows, curves


def activation_markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| variant | seeds | final eval loss | Δ vs silu (paired) | eval stderr | zero "
            "fraction, first eval → final | \\|h\\| < 0.01 | chunk-8 zero fraction | PPL-1% "
            "sparsity |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        delta = "—" if r["delta"] is None or r["variant"] == "silu" else \
            f"{r['delta'][0]:+.4f} ± {r['delta'][1]:.4f}"
        lines.append(f"| {r['variant']} | {r['seeds']} | {r['loss'][0]:.4f} ± {r['loss'][1]:.4f} "
                     f"| {delta} | {r['stderr']:.4f} | {r['zero_first']:.3f} → "
                     f"{r['zero_final']:.3f} | {r['below']:.3f} | {r['chunk']:.3f} | "
                     f"{r['ppl1']:.3f} |")
    return "\n".join(lines)


def activation_plot(curves: dict[str, dict], path: str) -> str:
    from matplotlib.figure import Figure
    from sparsejax.analysis.plots import distinct_colors
    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    for color, (label, c) in zip(distinct_colors(len(curves)), curves.items()):
        ax1.plot(c["steps"], c["loss"], marker="o", color=color, label=label)
        ax2.plot(c["steps"], c["zero"], marker="o", color=color, label=label)
    ax1.set(xlabel="step", ylabel="eval loss (nats/token)", title="eval loss (mean over seeds)")
    ax2.set(xlabel="step", ylabel="fraction of MLP intermediate entries exactly 0",
            title="activation sparsity over training")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


# --- 2: training-free thresholding -----------------------------------------------------------


def base_dir(out: str) -> str:
    return os.path.join(out, "training_free", "base")


def run_training_free(out: str) -> None:
    """Trains the base model (resumable) and writes both act-curves files."""
    w = base_dir(out)
    from sparsejax.train.metrics import read_metrics
    done = os.path.exists(os.path.join(w, "metrics.jsonl")) and any(
        r.get("step") == 200 and "eval_loss" in r
        for r in read_metrics(os.path.join(w, "metrics.jsonl")))
    if not done:
        os.makedirs(w, exist_ok=True)
        _cli(["train", "--gin_file=base.gin", f"--workdir={w}", "--quiet",
              "--gin.TrainConfig.progress_bar=False", "--gin.TrainConfig.eval_every=200"])
    targets = "(" + ", ".join(str(t) for t in TARGETS) + ")"
    for name, proj in CURVES.items():
        if os.path.exists(os.path.join(w, name + ".json")):
            continue
        args = ["act-curves", f"--workdir={w}", f"--gin.ThresholdCurves.targets={targets}",
                f"--gin.ThresholdCurves.name='{name}'", f"--gin.TrainConfig.eval_tokens={EVAL_TOKENS}"]
        if proj:
            args.append(f"--gin.ThresholdCurves.projections={proj!r}")
        _cli(args)


def training_free_markdown(out: str) -> str:
    w = base_dir(out)
    parts = []
    for name, proj in CURVES.items():
        path = os.path.join(w, name + ".json")
        if not os.path.exists(path):
            continue
        data = json.load(open(path))
        pts = data["points"]
        dense = pts[0]
        sites = "each method's own sites (TEAL, WINA: q, k, v, o, gate, up, down inputs; CATS: " \
                "the gate activation)" if proj is None else \
            "the MLP intermediate only (TEAL, WINA: the down projection's input; CATS: the gate activation)"
        lines = [f"**{name}** — {sites}; no thresholds: eval loss {dense['eval_loss']:.4f} ± "
                 f"{dense['eval_loss_stderr']:.4f} ({data['eval_rows']} eval rows).", "",
                 "| target | " + " | ".join(f"{m}: loss (Δ ± paired stderr), achieved"
                                           for m in ("teal", "cats", "wina")) + " |",
                 "|---|---|---|---|"]
        for t in TARGETS:
            cells = []
            for m in ("teal", "cats", "wina"):
                p = [q for q in pts if q["method"] == m and abs(q["target"] - t) < 1e-9]
                cells.append("—" if not p else
                             f"{p[0]['eval_loss']:.4f} ({p[0]['delta_vs_dense']:+.4f} ± "
                             f"{p[0]['delta_stderr']:.4f}), {p[0]['sparsity']:.3f}")
            lines.append(f"| {t:.0%} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def training_free_plot(out: str, path: str) -> str | None:
    from matplotlib.figure import Figure
    from sparsejax.analysis.plots import distinct_colors
    w = base_dir(out)
    files = [(n, os.path.join(w, n + ".json")) for n in CURVES]
    files = [(n, f) for n, f in files if os.path.exists(f)]
    if not files:
        return None
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, len(files), squeeze=False)[0]
    for ax, (name, f) in zip(axes, files):
        pts = json.load(open(f))["points"]
        for color, m in zip(distinct_colors(3), ("teal", "cats", "wina")):
            q = sorted((p for p in pts if p["method"] == m), key=lambda p: p["target"])
            ax.errorbar([p["target"] for p in q], [p["delta_vs_dense"] for p in q],
                        yerr=[p["delta_stderr"] for p in q], marker="o", capsize=3, color=color,
                        label=m)
        ax.axhline(0, color="black", lw=1, ls="--")
        ax.set(xlabel="target sparsity per site", ylabel="eval loss − no thresholds (paired)",
               title=name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
