"""Drop-Upcycling (Nakamura et al. 2025) next to plain sparse upcycling, small scale.

    python experiments/drop_upcycle.py [--out experiments/runs/drop_upcycle] [--seeds 2]
    python experiments/drop_upcycle.py --report_only

One dense run of configs/experiments/small.gin (300 steps), then, from its checkpoint, MoE
runs with every MLP upcycled into 8 experts (top-2, each a copy of the dense MLP) for
`--steps` steps: plain upcycling (reinit_fraction 0) and Drop-Upcycling (r = 0.5), paired by
seed (the seed sets the data order, the router init and the re-drawn dimensions). Reported:
eval loss at each eval (with its standard error), and how unevenly the experts are used
(coefficient of variation of each MoE layer's expert load, mean over layers, and the router
entropy). Writes experiments/results/drop_upcycle.md (between the markers) and .png.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
VARIANTS = {"plain upcycling": 0.0, "drop-upcycling r=0.5": 0.5}
COMMON = ["--gin_file=experiments/small.gin", "--quiet", "--gin.make_mesh.num_devices=1",
          "--gin.TrainConfig.async_checkpoints=False"]
UPCYCLE = ["--gin_file=moe/upcycle.gin", "--gin.MoeMlp.mlp_dim=512",
           "--gin.MoeMlp.router_jitter=0.0"]


def train(workdir: str, *extra: str) -> None:
    if os.path.exists(os.path.join(workdir, "plots")):  # finished earlier
        return
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "sparsejax.cli", "train", f"--workdir={workdir}", *COMMON,
           *extra]
    print("+", " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)


def records(workdir: str) -> list[dict]:
    from sparsejax.train.metrics import read_metrics
    return read_metrics(os.path.join(workdir, "metrics.jsonl"))


def load_skew(record: dict) -> tuple[float, float] | None:
    """(mean over MoE layers of std/mean of the expert load, mean router entropy)."""
    loads = [np.asarray(v) for k, v in record.items() if k.endswith("/moe/expert_load")]
    ents = [v for k, v in record.items() if k.endswith("/moe/router_entropy")]
    if not loads:
        return None
    return float(np.mean([x.std() / x.mean() for x in loads])), float(np.mean(ents))


def summarize(out: str, seeds: int) -> dict:
    table = {}
    for name, r in VARIANTS.items():
        rows = []
        for seed in range(seeds):
            recs = records(os.path.join(out, f"r{r}_seed{seed}"))
            evals = {x["step"]: (x["eval_loss"], x["eval_loss_stderr"]) for x in recs
                     if "eval_loss" in x}
            skews = {x["step"]: load_skew(x) for x in recs if load_skew(x) is not None}
            losses = {x["step"]: x["loss"] for x in recs if x.get("loss") is not None}
            rows.append({"evals": evals, "skew": skews, "loss": losses})
        table[name] = rows
    return table


def write_report(out: str, seeds: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    table = summarize(out, seeds)
    dense = records(os.path.join(out, "dense"))
    dense_eval = [x for x in dense if "eval_loss" in x][-1]
    steps = sorted(table[next(iter(table))][0]["evals"])
    lines = [f"Dense start: eval loss {dense_eval['eval_loss']:.4f} ± "
             f"{dense_eval['eval_loss_stderr']:.4f} after {dense_eval['step']} steps.", "",
             "Eval loss of the upcycled MoE (mean over seeds; ± the eval's standard error, "
             "[per-seed values]):", "",
             "| step | " + " | ".join(VARIANTS) + " | Δ drop − plain (per seed) |",
             "|---|" + "---|" * (len(VARIANTS) + 1)]
    for t in steps:
        cells, per = [], {}
        for name in VARIANTS:
            vals = [row["evals"][t] for row in table[name]]
            per[name] = [v for v, _ in vals]
            cells.append(f"{np.mean(per[name]):.4f} ± {np.mean([s for _, s in vals]):.4f} "
                         f"[{', '.join(f'{v:.4f}' for v in per[name])}]")
        a, b = per["plain upcycling"], per["drop-upcycling r=0.5"]
        cells.append(", ".join(f"{y - x:+.4f}" for x, y in zip(a, b)))
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines += ["", "Expert-load skew (coefficient of variation of each layer's expert load, "
              "mean over the 4 MoE layers and seeds; 0 = uniform) and router entropy (nats; "
              "ln 8 = 2.079 is uniform routing):", "",
              "| step | " + " | ".join(f"{n}: load CV / entropy" for n in VARIANTS) + " |",
              "|---|" + "---|" * len(VARIANTS)]
    skew_steps = sorted(table[next(iter(table))][0]["skew"])
    for t in [s for s in skew_steps if s in (10, 50, 100) or s == skew_steps[-1]]:
        cells = []
        for name in VARIANTS:
            cv = np.mean([row["skew"][t][0] for row in table[name]])
            ent = np.mean([row["skew"][t][1] for row in table[name]])
            cells.append(f"{cv:.3f} / {ent:.3f}")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, color in zip(VARIANTS, ("tab:blue", "tab:orange")):
        for i, row in enumerate(table[name]):
            s = sorted(row["evals"])
            ax1.errorbar(s, [row["evals"][t][0] for t in s], [row["evals"][t][1] for t in s],
                         color=color, marker="o", label=name if i == 0 else None, alpha=0.8)
            k = sorted(row["skew"])
            ax2.plot(k, [row["skew"][t][0] for t in k], color=color,
                     label=name if i == 0 else None, alpha=0.8)
    ax1.axhline(dense_eval["eval_loss"], color="gray", ls="--", label="dense start")
    ax1.set(xlabel="step after upcycling", ylabel="eval loss", title="eval loss")
    ax2.set(xlabel="step after upcycling", ylabel="expert load CV (mean over layers)",
            title="expert-load skew")
    ax1.legend(), ax2.legend()
    fig.tight_layout()
    os.makedirs(RESULTS, exist_ok=True)
    fig.savefig(os.path.join(RESULTS, "drop_upcycle.png"), dpi=110)
    path = os.path.join(RESULTS, "drop_upcycle.md")
    body = "\n".join(lines)
    text = open(path).read() if os.path.exists(path) else \
        f"# Drop-Upcycling vs plain upcycling\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    with open(path, "w") as f:
        f.write(f"{head}{BEGIN}\n{body}\n\n![eval loss and expert-load skew](drop_upcycle.png)\n"
                f"{END}{tail}")
    print(body)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(HERE, "runs", "drop_upcycle"))
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--report_only", action="store_true")
    args = ap.parse_args()
    if not args.report_only:
        dense = os.path.join(args.out, "dense")
        train(dense)
        for seed in range(args.seeds):
            for r in VARIANTS.values():
                train(os.path.join(args.out, f"r{r}_seed{seed}"), *UPCYCLE,
                      f"--gin.warm_start.from_workdir='{dense}'",
                      f"--gin.upcycle_params.reinit_fraction={r}",
                      f"--gin.TrainConfig.seed={seed}",
                      f"--gin.TrainConfig.num_steps={args.steps}")
    write_report(args.out, args.seeds)


if __name__ == "__main__":
    main()
