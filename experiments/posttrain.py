"""Reproduction: post-training pruning of a model trained here (magnitude, Wanda, SparseGPT; with
and without DSnoT; uniform vs OWL allocation; then a short sparse recovery fine-tune).

    python experiments/posttrain.py                 # trains the source if needed, then the grid
    python experiments/posttrain.py --report_only   # redraw results/posttrain.md and .png
    python experiments/posttrain.py --papers_only   # only the papers' protocols (below)

The source is configs/base.gin trained for 600 steps (`--source` takes an existing workdir).
Every grid point prunes the source with `prune_model` (the library behind `sparsejax prune`)
on 128 calibration sequences of 256 tokens drawn from the training split with calibration
seed s, and scores the result on the run's fixed eval sample (512 validation rows). Points
are appended to OUT/results.jsonl as they finish (a rerun skips finished points). The
fine-tunes run the CLI: `sparsejax prune ... --finetune_steps=N`, then `sparsejax train` on
the pruned workdir (masks fixed).

The papers' numbers (`run_papers`, PAPERS: each method at 50% and 2:4, calibration seed 0,
through the CLI as a researcher runs it): `sparsejax prune` into a workdir, its perplexity
under the SparseGPT/Wanda protocol on the held-out text (the corpus's validation files joined
with a blank line, non-overlapping windows of 256 tokens: `sparsejax eval --text_file
--protocol=concat`), and zero-shot accuracy through the lm-evaluation-harness model on the
local multiple-choice tasks of experiments/tasks/ (`sparsejax lm-eval`).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
RESULTS = os.path.join(HERE, "results")
SOURCE_FLAGS = ["--gin_file=base.gin", "--gin.TrainConfig.num_steps=600",
                "--gin.TrainConfig.eval_every=200", "--gin.TrainConfig.checkpoint_every=100",
                "--gin.TrainConfig.progress_bar=False", "--gin.learning_rate_schedule.warmup_steps=40"]
METHODS = ("magnitude", "wanda", "sparsegpt")
LEVELS = ("0.5", "0.6", "0.7", "2:4")
PAPERS = tuple(itertools.product(METHODS, ("0.5", "2:4")))
TASKS_DIR = os.path.join(HERE, "tasks")
TASKS = ("sj_next_line", "sj_next_token")
WINDOW = 256


def grid(seeds: list[int]) -> list[dict]:
    """The points: every method x level x DSnoT (uniform) at every seed (magnitude alone needs
    no calibration: one seed), and OWL at 60% / 70% without DSnoT."""
    out = []
    for method, level, dsnot in itertools.product(METHODS, LEVELS, (False, True)):
        for seed in (seeds[:1] if method == "magnitude" and not dsnot else seeds):
            out.append(dict(method=method, level=level, dsnot=dsnot, allocation="uniform",
                            seed=seed))
    for method, level in itertools.product(METHODS, ("0.6", "0.7")):
        for seed in (seeds[:1] if method == "magnitude" else seeds):
            out.append(dict(method=method, level=level, dsnot=False, allocation="owl", seed=seed))
    return out


def key(p: dict) -> str:
    return f"{p['method']}|{p['level']}|{'dsnot' if p['dsnot'] else '-'}|{p['allocation']}|{p['seed']}"


def prune_config(p: dict, samples: int):
    from sparsejax.sparsity.posttrain.config import PruneConfig
    level = dict(nm="2:4") if ":" in p["level"] else dict(sparsity=float(p["level"]))
    return PruneConfig(method=p["method"], dsnot=p["dsnot"], allocation=p["allocation"],
                       calibration_samples=samples, calibration_seed=p["seed"], **level)


def run_grid(source: str, out: str, seeds: list[int], samples: int,
             methods: list[str] = METHODS) -> None:
    """Prunes and scores every grid point not yet in OUT/results.jsonl (one process)."""
    import flax.linen as nn
    import jax
    from sparsejax.models.transformer import padded_params
    from sparsejax.parallel.rules import LOGICAL_RULES
    from sparsejax.sparsity.posttrain.driver import prune_model
    from sparsejax.sparsity.posttrain.plan import build_plan
    from sparsejax.sparsity.posttrain import workdir as wd
    from sparsejax.train import evaluation, trainer
    from sparsejax.train.build import build_run
    from sparsejax.train.commands import parse_workdir_config
    path = os.path.join(out, "results.jsonl")
    done = {json.loads(l)["key"] for l in open(path)} if os.path.exists(path) else set()
    todo = [p for p in grid(seeds) if key(p) not in done and p["method"] in methods]
    parse_workdir_config(source, [], [])
    cfg = trainer.TrainConfig()
    run = build_run(cfg)
    step, state = wd.restore(run, source)
    eval_set = evaluation.eval_set_for(cfg)
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(LOGICAL_RULES):
        params = state.params
        dense = wd.eval_params(run, params, None, eval_set)
    _append(path, {"key": "dense", "step": int(step), **dense})
    calibs, programs = {}, {}
    for p in todo:
        pc = prune_config(p, samples)
        if p["seed"] not in calibs:
            calibs[p["seed"]] = wd.calibration_set(cfg, pc)
        t0 = time.perf_counter()
        plan = build_plan(run.model_config, params, None, pc, valid=padded_params(run.model_config),
                          loss_fn=None, num_samples=samples, batch_size=cfg.global_batch_size,
                          mesh=run.mesh)
        plan.programs = programs  # one gin config: compiled block programs are shared
        r = prune_model(run.model_config, params, None, calibs[p["seed"]], pc, mesh=run.mesh,
                        plan=plan)
        with jax.set_mesh(run.mesh), nn.logical_axis_rules(LOGICAL_RULES):
            ev = wd.eval_params(run, r.params, None, eval_set)
        rec = {"key": key(p), **p, "density": r.report["density"], **ev,
               "prune_seconds": time.perf_counter() - t0 - ev["eval_seconds"],
               "block_output_error": [b["output_error_rel"] for b in r.report["blocks"]],
               "block_density": [b["density"] for b in r.report["blocks"]]}
        _append(path, rec)
        print(f"{key(p)}: eval loss {ev['eval_loss']:.4f} (ppl {ev['eval_perplexity']:.2f}), "
              f"density {r.report['density']:.4f}, {rec['prune_seconds']:.0f} s", flush=True)


def _append(path: str, rec: dict) -> None:
    if rec["key"] == "dense" and os.path.exists(path) and any(
            json.loads(l)["key"] == "dense" for l in open(path)):
        return
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


FINETUNES = (("magnitude", "0.5"), ("wanda", "0.5"), ("sparsegpt", "0.5"), ("sparsegpt", "2:4"))


def run_finetunes(source: str, out: str, steps: int, samples: int) -> None:
    """`sparsejax prune` + `sparsejax train` (fixed masks) for FINETUNES, via the CLI."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    path = os.path.join(out, "finetune.jsonl")
    done = {json.loads(l)["key"] for l in open(path)} if os.path.exists(path) else set()
    for method, level in FINETUNES:
        k = f"{method}|{level}"
        if k in done:
            continue
        dst = os.path.join(out, "finetune", f"{method}_{level.replace(':', 'of')}")
        flag = f"--nm={level}" if ":" in level else f"--sparsity={level}"
        if not os.path.exists(os.path.join(dst, "prune_report.json")):
            subprocess.run([sys.executable, "-m", "sparsejax.cli", "prune", f"--workdir={source}",
                            f"--out={dst}", f"--method={method}", flag, "--quiet",
                            f"--calibration_samples={samples}", f"--finetune_steps={steps}"],
                           check=True, env=env, cwd=ROOT)
        subprocess.run([sys.executable, "-m", "sparsejax.cli", "train", f"--workdir={dst}",
                        "--quiet"], check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        report = json.load(open(os.path.join(dst, "prune_report.json")))
        evals = [json.loads(l) for l in open(os.path.join(dst, "metrics.jsonl"))
                 if "eval_loss" in l]
        rec = {"key": k, "method": method, "level": level, "steps": steps,
               "before": report["eval_before"]["eval_loss"],
               "pruned": report["eval_after"]["eval_loss"],
               "finetuned": evals[-1]["eval_loss"], "finetuned_stderr": evals[-1]["eval_loss_stderr"],
               "density": report["density"]}
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"fine-tune {k}: {rec['pruned']:.4f} -> {rec['finetuned']:.4f}", flush=True)


def heldout_text(out: str) -> str:
    """OUT/heldout.txt: the corpus's validation files joined with a blank line (written once)."""
    from sparsejax.data.sources import text_source
    path = os.path.join(out, "heldout.txt")
    if not os.path.exists(path):
        src = text_source("stdlib", "validation")
        with open(path, "w") as f:
            f.write("\n\n".join(src[i].decode("utf-8", errors="replace")
                                  for i in range(len(src))))
    return path


def _cli_json(args: list[str], env: dict) -> dict:
    res = subprocess.run([sys.executable, "-m", "sparsejax.cli", *args], check=True, env=env,
                         cwd=ROOT, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_papers(source: str, out: str, samples: int, limit: int | None = None,
               window: int = WINDOW) -> None:
    """The dense source and PAPERS pruned (`sparsejax prune`), each scored under the papers'
    perplexity protocol and on the zero-shot tasks; appended to OUT/papers.jsonl."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    path = os.path.join(out, "papers.jsonl")
    done = {json.loads(l)["key"] for l in open(path)} if os.path.exists(path) else set()
    text = heldout_text(out)
    for method, level in (("dense", None),) + PAPERS:
        k = "dense" if level is None else f"{method}|{level}"
        if k in done:
            continue
        w = source
        if level is not None:
            w = os.path.join(out, "papers", f"{method}_{level.replace(':', 'of')}")
            if not os.path.exists(os.path.join(w, "prune_report.json")):
                flag = f"--nm={level}" if ":" in level else f"--sparsity={level}"
                subprocess.run([sys.executable, "-m", "sparsejax.cli", "prune",
                                f"--workdir={source}", f"--out={w}", f"--method={method}", flag,
                                "--quiet", f"--calibration_samples={samples}"],
                               check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        ppl = _cli_json(["eval", f"--workdir={w}", f"--text_file={text}", "--protocol=concat",
                         f"--seq_len={window}", "--quiet"], env)
        results = os.path.join(w, "lm_eval")
        subprocess.run([sys.executable, "-m", "sparsejax.cli", "lm-eval", "--model_args",
                        f"workdir={w},batch_size=16", "--tasks", ",".join(TASKS),
                        "--include_path", TASKS_DIR, "--output_path", results,
                        *(["--limit", str(limit)] if limit else [])],
                       check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        found = sorted(os.path.join(d, f) for d, _, fs in os.walk(results) for f in fs
                       if f.startswith("results") and f.endswith(".json"))
        acc = json.load(open(found[-1]))["results"]
        rec = {"key": k, "method": method, "level": level, "window": window,
               "perplexity": ppl["eval_perplexity"], "loss": ppl["eval_loss"],
               "loss_stderr": ppl["eval_loss_stderr"], "tokens": ppl["eval_tokens"],
               "windows": ppl["windows"],
               **{f"{t}/acc": acc[t]["acc,none"] for t in TASKS},
               **{f"{t}/acc_stderr": acc[t]["acc_stderr,none"] for t in TASKS}}
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"papers {k}: ppl {rec['perplexity']:.3f}, "
              + ", ".join(f"{t} {rec[t + '/acc']:.3f}" for t in TASKS), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", help="a trained workdir (default: OUT/base, trained if missing)")
    p.add_argument("--out", default=os.path.join(HERE, "runs", "posttrain"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--finetune_steps", type=int, default=100)
    p.add_argument("--skip_finetune", action="store_true")
    p.add_argument("--papers_only", action="store_true",
                   help="only the papers' perplexity protocol and zero-shot tasks")
    p.add_argument("--task_limit", type=int, help="examples per task (default: all)")
    p.add_argument("--window", type=int, default=WINDOW, help="perplexity window in tokens")
    p.add_argument("--report_only", action="store_true")
    p.add_argument("--methods", nargs="+", default=list(METHODS), help=argparse.SUPPRESS)
    p.add_argument("--results_dir", default=RESULTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    source = args.source or os.path.join(args.out, "base")
    if not args.report_only:
        if args.source is None and not os.path.isdir(os.path.join(source, "checkpoints")):
            subprocess.run([sys.executable, "-m", "sparsejax.cli", "train", f"--workdir={source}",
                            "--quiet", *SOURCE_FLAGS], check=True, cwd=ROOT)
        if not args.papers_only:
            run_grid(source, args.out, args.seeds, args.samples, args.methods)
            if not args.skip_finetune:
                run_finetunes(source, args.out, args.finetune_steps, args.samples)
        run_papers(source, args.out, args.samples, args.task_limit, args.window)
    sys.path.insert(0, HERE)
    from posttrain_report import write_report
    print(json.dumps(write_report(args.out, args.results_dir, source)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
