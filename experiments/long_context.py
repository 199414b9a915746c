"""The sparse frontier of the prefill methods on one trained model: for each method and a sweep
of its budget, how much of the dense attention it keeps and what that costs in quality.

    python experiments/long_context.py --workdir=W [--seq_len 4096] [--rows 4]
        [--lengths 1K,2K,4K] [--num_samples 8]

Per setting (and dense), on the model's full-attention layers:
* density: the kept tiles' share of the causal tiles (mean over layers, heads and rows);
* attention recall: the share of the dense attention mass inside the layout, per layer and
  head (mean and minimum), over `--rows` validation rows of `--seq_len` tokens;
* output error: ||sparse - dense|| / ||dense|| of each layer's attention output (mean);
* eval loss on long rows: `sparsejax eval --text_file --protocol=concat --seq_len` over the
  first `--eval_chars` characters of the corpus's validation text, with the method bound by
  gin;
* `sparsejax longeval` accuracy per length (mean over its tasks), with the method.

Writes experiments/results/long_context.md (between the frontier markers; the text around
them is kept), long_context_frontier.png (accuracy and loss against sparsity), and the raw
records to OUT/frontier.jsonl (a rerun skips finished settings).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from pallas_kernels.block_sparse_attention import (CausalMask, block_sparse_attention,  # noqa: E402
                                                   make_mask)
from posttrain import heldout_text  # noqa: E402
from sparsejax.infer.prefill_calibration import calibration_rows, method_layers  # noqa: E402
from sparsejax.infer.workdir import load_workdir  # noqa: E402
from sparsejax.models.prefill_search import tile_mass  # noqa: E402
from sparsejax.models.qkv_capture import capture_qkv  # noqa: E402
from sparsejax.models.transformer import ModelConfig  # noqa: E402
from sparsejax.parallel.rules import LOGICAL_RULES  # noqa: E402
from sparsejax.train.commands import parse_workdir_config  # noqa: E402
from sparsejax.train.step import model_variables  # noqa: E402
from sparsejax.train.trainer import TrainConfig  # noqa: E402

RESULTS = os.path.join(HERE, "results")
BEGIN, END = "<!-- frontier:begin -->", "<!-- frontier:end -->"
SWEEP = {"xattention": [{"threshold": t, "stride": 8} for t in (0.5, 0.7, 0.9, 0.95)],
         "flexprefill": [{"gamma": g, "tau": 0.1} for g in (0.5, 0.7, 0.9, 0.95)],
         "minference": [{"vertical_size": v, "slash_size": 2 * v} for v in (32, 64, 128, 256)]
         # the paper's always-kept 30 first tokens and 100 nearest offsets, scaled down for
         # short rows, where they alone cover most of the map
         + [{"vertical_size": v, "slash_size": 2 * v, "keep_global": 4, "keep_local": 16}
            for v in (8, 16, 32)]}


def spec_of(method: str, setting: dict, block: int) -> dict:
    return {"kind": method, "block_size": block, **setting}


def layer_quality(qkv: list, layers: list[int], segment_ids, spec: dict | None,
                  block: int) -> dict:
    """Density, recall (mean, min) and output error of `spec` (None: dense) over `layers`."""
    recalls, errors, densities = [], [], []
    seg = jnp.asarray(segment_ids, jnp.int32)
    for layer in layers:
        q, k, v = qkv[layer]
        s = q.shape[1]
        qb = s // block
        if spec is None:
            recalls.append(np.ones(q.shape[2]))
            errors.append(0.0)
            densities.append(1.0)
            continue
        mask = make_mask(**{key: val for key, val in spec.items() if key != "block_size"})
        mask = mask.bind(layer, s)
        layout = jax.jit(lambda a, b: mask.block_layout_dynamic(a, b, block, block))(q, k)
        mass = tile_mass(q, k, seg, block)  # [b, h, qb, kb]
        queries = float(jnp.sum(seg > 0))
        recalls.append(np.asarray(jnp.sum(jnp.where(layout, mass, 0.0), axis=(0, 2, 3)))
                       / queries)  # per head: kept mass over the real queries of all rows
        densities.append(float(np.asarray(layout).sum()
                               / (layout.shape[0] * layout.shape[1] * qb * (qb + 1) / 2)))
        run = lambda m: jax.jit(lambda a, b, c: block_sparse_attention(
            a, b, c, m, segment_ids=seg, block_q=block, block_k=block))(q, k, v)
        dense, sparse = run(CausalMask()), run(mask)
        errors.append(float(jnp.linalg.norm(sparse - dense) / jnp.linalg.norm(dense)))
    r = np.concatenate(recalls)
    return {"density": float(np.mean(densities)), "recall_mean": float(r.mean()),
            "recall_min": float(r.min()), "output_error": float(np.mean(errors))}


def cli_json(args: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-m", "sparsejax.cli", *args], env=env, cwd=ROOT,
                         capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"sparsejax {args[0]} failed: {res.stderr.strip()[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_setting(workdir: str, text: str, seq_len: int, lengths: str, samples: int,
                spec: dict | None, quality: dict) -> dict:
    gin = [] if spec is None else [f"--gin.attention_kernel.prefill_method={spec}"]
    ev = cli_json(["eval", f"--workdir={workdir}", f"--text_file={text}", "--protocol=concat",
                   f"--seq_len={seq_len}", "--quiet", *gin])
    acc = {}
    if lengths:
        le = cli_json(["longeval", f"--workdir={workdir}", f"--lengths={lengths}",
                       f"--num_samples={samples}", *gin])
        acc = {n: float(np.mean([le["accuracy"][t][n]["mean"] for t in le["tasks"]]))
               for n in map(str, le["lengths"])}
    return {**quality, "eval_loss": ev["eval_loss"], "eval_loss_stderr": ev["eval_loss_stderr"],
            "longeval": acc,
            "longeval_mean": float(np.mean(list(acc.values()))) if acc else float("nan")}


def write_report(records: list[dict], workdir: str, seq_len: int, block: int,
                 results: str) -> str:
    dense = next(r for r in records if r["method"] == "dense")
    lengths = list(dense["longeval"])
    head = ("| method | setting | density | recall (mean / min) | output error | eval loss "
            "(Δ dense) |" + "".join(f" longeval {n} |" for n in lengths))
    rows = [head, "|" + " --- |" * (6 + len(lengths))]
    for r in records:
        setting = ", ".join(f"{k}={v}" for k, v in r["setting"].items()) or "-"
        rows.append(f"| {r['method']} | {setting} | {r['density']:.3f} | "
                    f"{r['recall_mean']:.3f} / {r['recall_min']:.3f} | {r['output_error']:.3f} | "
                    f"{r['eval_loss']:.4f} ({r['eval_loss'] - dense['eval_loss']:+.4f}) |"
                    + "".join(f" {r['longeval'][n]:.2f} |" for n in lengths))
    png = plot(records, results)
    section = "\n".join([BEGIN, f"Model: `{workdir}`; quality over validation rows of {seq_len} "
                       f"tokens; blocks of {block}. `python experiments/long_context.py "
                       f"--workdir=...`", "", *rows, "", f"![frontier]({os.path.basename(png)})",
                       END])
    md = os.path.join(results, "long_context.md")
    text = open(md).read() if os.path.exists(md) else "# Long-context sparse attention\n\n" \
        + BEGIN + "\n" + END + "\n"
    pre, rest = text.split(BEGIN, 1)
    with open(md, "w") as f:
        f.write(pre + section + rest.split(END, 1)[1])
    return md


def plot(records: list[dict], results: str) -> str:
    import matplotlib  # deferred: the plot is the script's last step
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("recall_mean", "attention recall (mean)"), ("eval_loss", "eval loss on long rows")]
    if any(r["longeval"] for r in records):
        panels.append(("longeval_mean", "longeval accuracy (mean)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for method in dict.fromkeys(r["method"] for r in records):
        pts = sorted((1 - r["density"], *(r[k] for k, _ in panels)) for r in records
                     if r["method"] == method)
        cols = list(zip(*pts))
        for ax, ys in zip(axes, cols[1:]):
            ax.plot(cols[0], ys, "*" if method == "dense" else "o-", label=method)
    for ax, (_, label) in zip(axes, panels):
        ax.set(xlabel="sparsity (1 - density)", ylabel=label)
    axes[0].legend()
    fig.tight_layout()
    path = os.path.join(results, "long_context_frontier.png")
    fig.savefig(path, dpi=100)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", default=os.path.join(HERE, "runs", "long_context"))
    p.add_argument("--seq_len", type=int, default=4096)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--block_size", type=int, default=64)
    p.add_argument("--lengths", default="1K,2K,4K", help="longeval lengths ('': no longeval)")
    p.add_argument("--num_samples", type=int, default=8)
    p.add_argument("--eval_chars", type=int, default=262144,
                   help="characters of the validation text scored for the eval loss")
    p.add_argument("--results_dir", default=RESULTS)
    p.add_argument("--report_only", action="store_true", help="redraw from OUT/frontier.jsonl")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "frontier.jsonl")
    records = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    if args.report_only:
        print(write_report(records, args.workdir, args.seq_len, args.block_size,
                           args.results_dir))
        return 0
    done = {(r["method"], json.dumps(r["setting"], sort_keys=True)) for r in records}
    parse_workdir_config(args.workdir, [], [])
    layers = method_layers(ModelConfig())
    loaded = load_workdir(args.workdir)
    batch = calibration_rows(TrainConfig(), args.rows, args.seq_len, seed=0)
    with jax.set_mesh(loaded.run.mesh), nn.logical_axis_rules(LOGICAL_RULES):
        qkv = capture_qkv(loaded.model, model_variables(loaded.params, loaded.moe_state),
                          batch["inputs"], batch["positions"], batch["segment_ids"])
    text = os.path.join(args.out, f"heldout_{args.eval_chars}.txt")
    with open(heldout_text(args.out)) as src, open(text, "w") as dst:
        dst.write(src.read(args.eval_chars))
    todo = [("dense", {})] + [(m, s) for m, settings in SWEEP.items() for s in settings]
    for method, setting in todo:
        if (method, json.dumps(setting, sort_keys=True)) in done:
            continue
        spec = None if method == "dense" else spec_of(method, setting, args.block_size)
        quality = layer_quality(qkv, layers, batch["segment_ids"], spec, args.block_size)
        rec = {"method": method, "setting": setting,
               **run_setting(args.workdir, text, args.seq_len, args.lengths, args.num_samples,
                             spec, quality)}
        records.append(rec)
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)
    print(write_report(records, args.workdir, args.seq_len, args.block_size, args.results_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
