"""The expert_pruning reproduction of experiments/reproduce.py: which expert reduction keeps a
MoE model's quality, before and after a short recovery fine-tune? (REAP's claim: pruning
by router-weighted expert activation beats merging experts at generative quality.)

    python experiments/reproduce.py expert_pruning                 # run (resumable), report
    python experiments/reproduce.py expert_pruning --report_only   # redraw the page

1. The source: configs/experiments/small.gin with configs/moe/top2.gin and 16 experts of
   width 128 (every other layer MoE, top-2 softmax routing, dropless), trained once into
   <out>/expert_pruning/source (SOURCE_STEPS steps).
2. Every point (reducer x kept experts x calibration seed) is `sparsejax prune --method=none
   --experts=R --num_experts=K --calibration_seed=S` into its own workdir (128 calibration
   rows of the training split; super experts protected, the default), which scores the
   reduced model on the run's fixed eval sample, then `sparsejax train` on that workdir: the
   recovery fine-tune (FINETUNE_STEPS steps), scored on the same sample. Points are appended
   to <out>/expert_pruning/results.jsonl as they finish; a rerun skips finished points.
3. The page: eval loss after reduction and after the fine-tune, mean ± standard error over
   the calibration seeds, and each reducer's difference to REAP paired by seed.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Sequence

import gin
import numpy as np
from matplotlib.figure import Figure

from sparsejax import cli
from sparsejax.analysis.plots import distinct_colors
from sparsejax.train.metrics import read_metrics

WORK_DIR = "expert_pruning"
SOURCE_FLAGS = ("--gin_file=experiments/small.gin", "--gin_file=moe/top2.gin",
                "--gin.MoeMlp.num_experts=16", "--gin.MoeMlp.mlp_dim=128")
SOURCE_STEPS = 300
METHODS = ("frequency", "reconstruction", "merge", "reap")
FRACTIONS = (0.25, 0.5)  # of the experts pruned
SEEDS = (0, 1, 2)
FINETUNE_STEPS = 50
FINETUNE_FLAGS = ("--gin.learning_rate_schedule.warmup_steps=5",)
REFERENCE = "reap"
NUM_EXPERTS = 16


def key(p: dict) -> str:
    return f"{p['method']}|{p['num_experts']}|{p['seed']}"


def points(methods: Sequence[str], fractions: Sequence[float], seeds: Sequence[int],
           num_experts: int) -> list[dict]:
    return [dict(method=m, fraction=f, num_experts=round(num_experts * (1 - f)), seed=s)
            for f in fractions for m in methods for s in seeds]


def _cli(args: list[str]) -> None:
    gin.clear_config()  # each command parses its own config
    rc = cli.main(args)
    if rc != 0:
        raise RuntimeError(f"`sparsejax {' '.join(args)}` exited {rc}")


def train_source(out: str, flags: Sequence[str] = SOURCE_FLAGS,
                 steps: int = SOURCE_STEPS) -> str:
    """<out>/expert_pruning/source, trained if it has no finished run (resumes a cut one)."""
    src = os.path.join(out, WORK_DIR, "source")
    metrics = os.path.join(src, "metrics.jsonl")
    finished = os.path.isfile(metrics) and any(
        r.get("step") == steps and "eval_loss" in r for r in read_metrics(metrics))
    if not finished:
        _cli(["train", f"--workdir={src}", "--quiet", *flags,
              f"--gin.TrainConfig.num_steps={steps}"])
    return src


def run_point(src: str, out: str, p: dict, finetune_steps: int,
              finetune_flags: Sequence[str], prune_flags: Sequence[str]) -> dict:
    """Prunes (reduces experts) and fine-tunes one point; returns its record."""
    t0 = time.perf_counter()
    dst = os.path.join(out, WORK_DIR, "points", key(p).replace("|", "_"))
    report_path = os.path.join(dst, "prune_report.json")
    if not os.path.isfile(report_path):
        if os.path.isdir(dst):  # a prune cut short: start it again
            shutil.rmtree(dst)
        _cli(["prune", f"--workdir={src}", f"--out={dst}", "--method=none", "--quiet",
              f"--experts={p['method']}", f"--num_experts={p['num_experts']}",
              f"--calibration_seed={p['seed']}", f"--finetune_steps={finetune_steps}",
              *prune_flags, *finetune_flags])
    _cli(["train", f"--workdir={dst}", "--quiet"])
    report = json.load(open(report_path))
    evals = [r for r in read_metrics(os.path.join(dst, "metrics.jsonl")) if "eval_loss" in r]
    last = evals[-1]
    if last.get("step") != finetune_steps:
        raise RuntimeError(f"{dst}: the fine-tune's last eval is at step {last.get('step')}, "
                           f"not {finetune_steps}")
    return {"key": key(p), **p,
            "dense_loss": report["eval_before"]["eval_loss"],
            "pruned_loss": report["eval_after"]["eval_loss"],
            "pruned_stderr": report["eval_after"]["eval_loss_stderr"],
            "finetuned_loss": last["eval_loss"], "finetuned_stderr": last["eval_loss_stderr"],
            "protected": sum(len(e.get("protected", [])) for e in report["experts"]),
            "finetune_steps": finetune_steps, "seconds": time.perf_counter() - t0}


def results_path(out: str) -> str:
    return os.path.join(out, WORK_DIR, "results.jsonl")


def load_results(out: str) -> list[dict]:
    path = results_path(out)
    return read_metrics(path) if os.path.isfile(path) else []


def run(out: str, parallel: int = 1, methods: Sequence[str] = METHODS,
        fractions: Sequence[float] = FRACTIONS, seeds: Sequence[int] = SEEDS,
        source_flags: Sequence[str] = SOURCE_FLAGS, source_steps: int = SOURCE_STEPS,
        finetune_steps: int = FINETUNE_STEPS, finetune_flags: Sequence[str] = FINETUNE_FLAGS,
        prune_flags: Sequence[str] = (), num_experts: int = NUM_EXPERTS) -> int:
    """Trains the source and runs every point not yet in results.jsonl, one at a time
    (`parallel` is accepted for reproduce.py's interface; the points share one process).
    Returns the number of failed points."""
    del parallel
    src = train_source(out, source_flags, source_steps)
    done = {r["key"] for r in load_results(out)}
    failed = 0
    for p in points(methods, fractions, seeds, num_experts):
        if key(p) in done:
            continue
        try:
            rec = run_point(src, out, p, finetune_steps, finetune_flags, prune_flags)
        except RuntimeError as e:
            print(f"{key(p)} failed: {e}", flush=True)
            failed += 1
            continue
        with open(results_path(out), "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"{key(p)}: pruned {rec['pruned_loss']:.4f}, fine-tuned {rec['finetuned_loss']:.4f}"
              f" ({rec['seconds']:.0f} s)", flush=True)
    return failed


# --- report ------------------------------------------------------------------------------------


def _mean_se(values: Sequence[float]) -> tuple[float, float | None]:
    v = np.asarray(values, float)
    return float(v.mean()), (float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None)


def _fmt(mean: float, se: float | None, sign: bool = False) -> str:
    m = f"{mean:+.4f}" if sign else f"{mean:.4f}"
    return m if se is None else f"{m} ± {se:.4f}"


def summary_rows(records: Sequence[dict], reference: str = REFERENCE) -> list[dict[str, Any]]:
    """One row per (kept experts, reducer): losses over seeds and differences to `reference`
    paired by calibration seed (seeds both have)."""
    by = {}
    for r in records:
        by.setdefault((r["num_experts"], r["method"]), {})[r["seed"]] = r
    rows = []
    for (k, m), runs in sorted(by.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        ref = by.get((k, reference), {})
        row = {"experts kept": k, "reducer": m, "seeds": len(runs)}
        for stage in ("pruned", "finetuned"):
            row[stage] = _mean_se([r[f"{stage}_loss"] for r in runs.values()])
            common = sorted(set(runs) & set(ref))
            row[f"{stage}_delta"] = None if m == reference or not common else _mean_se(
                [runs[s][f"{stage}_loss"] - ref[s][f"{stage}_loss"] for s in common])
        row["eval_stderr"] = float(np.mean([r["finetuned_stderr"] for r in runs.values()]))
        row["protected"] = float(np.mean([r["protected"] for r in runs.values()]))
        rows.append(row)
    return rows


def markdown(records: Sequence[dict], reference: str = REFERENCE) -> str:
    if not records:
        return "(no finished points yet)"
    dense = records[0]["dense_loss"]
    head = ("| experts kept | reducer | seeds | loss after reduction | Δ vs " + reference +
            " (paired) | after fine-tune | Δ vs " + reference + " (paired) | eval stderr | "
            "super experts kept |")
    lines = [f"Dense 16-expert source: eval loss {dense:.4f}.", "", head,
             "|" + "---|" * 9]
    for r in summary_rows(records, reference):
        d = lambda x: "—" if x is None else _fmt(*x, sign=True)
        lines.append(f"| {r['experts kept']} | {r['reducer']} | {r['seeds']} | "
                     f"{_fmt(*r['pruned'])} | {d(r['pruned_delta'])} | {_fmt(*r['finetuned'])} | "
                     f"{d(r['finetuned_delta'])} | {r['eval_stderr']:.4f} | {r['protected']:g} |")
    return "\n".join(lines) + "\n"


def plot(records: Sequence[dict], path: str) -> str | None:
    """Eval loss against experts kept, after reduction and after the fine-tune, per reducer
    (mean ± standard error over seeds)."""
    if not records:
        return None
    rows = summary_rows(records)
    methods = sorted({r["reducer"] for r in rows})
    colors = dict(zip(methods, distinct_colors(len(methods))))
    fig = Figure(figsize=(11, 4.5))
    axes = fig.subplots(1, 2, sharey=False)
    for ax, stage, title in zip(axes, ("pruned", "finetuned"),
                                ("after reduction", "after the recovery fine-tune")):
        for i, m in enumerate(methods):
            mine = [r for r in rows if r["reducer"] == m]
            x = np.array([r["experts kept"] for r in mine], float) + (i - 1.5) * 0.08
            y = [r[stage][0] for r in mine]
            err = [r[stage][1] or 0.0 for r in mine]
            ax.errorbar(x, y, yerr=err, fmt="o-", color=colors[m], capsize=3, label=m)
        ax.axhline(records[0]["dense_loss"], color="gray", ls="--", lw=1, label="16 experts")
        ax.set(xlabel="experts kept per MoE layer", ylabel="eval loss (nats/token)", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
