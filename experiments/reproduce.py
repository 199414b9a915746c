"""Runs a reproduction of a published claim and writes its results table and plot.

    python experiments/reproduce.py dst                  # one reproduction
    python experiments/reproduce.py all --parallel=2     # all of them, one after another
    python experiments/reproduce.py dst --report_only    # redraw from finished trials

A reproduction is a few sweeps (grid files in experiments/grids/) compared side by side; the
dense baseline grid is shared, so its trials run once for all reproductions. Trials live in
`--out/<grid name>/` and are resumable (a killed run picks up where it stopped). Results go
to experiments/results/<name>.md (between the markers; the claim and observation text around
them is kept) and experiments/results/<name>.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
GRIDS = os.path.join(HERE, "grids")
RESULTS = os.path.join(HERE, "results")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


@dataclasses.dataclass(frozen=True)
class Reproduction:
    title: str
    grids: tuple[str, ...]  # names under experiments/grids/, without .grid
    baseline: str  # label of the variant the Δ column is relative to


DENSE = "dense_small: name=dense"
REPRODUCTIONS = {
    "dst": Reproduction("Dynamic sparse training: RigL vs SET vs static random vs dense "
                        "(ERK, 80% and 90% sparsity)", ("dense_small", "dst"), DENSE),
    "gmp_vs_oneshot": Reproduction("Gradual magnitude pruning vs one-shot pruning "
                                   "(80% sparsity)", ("dense_small", "gmp_vs_oneshot"), DENSE),
    "spdf": Reproduction("Sparse pre-training then dense (SPDF) vs dense vs sparse throughout",
                         ("dense_small", "spdf"), DENSE),
    "moe": Reproduction("MoE (8 experts, top-2) vs dense at equal active parameters, with and "
                        "without load balancing", ("dense_small", "moe_top2"), DENSE),
    "nm": Reproduction("2:4 sparsity: one-shot magnitude vs SR-STE vs learned masks",
                       ("dense_small", "nm_2of4"), DENSE),
    "avg_params": Reproduction("Equal average parameter count: gradual pruning vs a dense "
                               "model of the average size",
                               ("dense_small", "avg_params_gradual", "dense_mlp256"),
                               "dense_mlp256: mlp_dim=256"),
    # Longer variants (configs/experiments/long.gin: 6 layers, 1200 steps) of the claims that
    # 300 steps of the small model cannot resolve.
    "dst_long": Reproduction("Dynamic sparse training, longer variant: RigL vs SET vs static "
                             "random vs dense (ERK, 80% sparsity), and RigL/SET with "
                             "per-weight Adam bias correction",
                             ("dense_long", "dst_long", "dst_long_per_entry"),
                             "dense_long: name=dense"),
    "spdf_long": Reproduction("SPDF, longer variant: sparse pre-training then dense vs dense "
                              "vs sparse throughout", ("dense_long", "spdf_long"),
                              "dense_long: name=dense"),
    "moe_long": Reproduction("MoE vs dense at equal active parameters, longer variant",
                             ("dense_long", "moe_long"), "dense_long: name=dense"),
    "avg_params_long": Reproduction("Equal average parameter count, longer variant: gradual "
                                    "pruning vs a dense model of the average size",
                                    ("dense_long", "avg_params_long_gradual",
                                     "dense_mlp256_long"), "dense_mlp256_long: mlp_dim=256"),
    # Trainable sparse attention: NSA (configs/attention/nsa.gin) vs full causal attention vs a
    # sliding window of NSA's window width, on the small model.
    "nsa": Reproduction("Native Sparse Attention (compressed + selected + sliding-window "
                        "branches, learned gates) vs full attention vs a 32-token sliding "
                        "window", ("dense_small", "nsa_small", "sliding_window_small"), DENSE),
}


# Reproductions with their own runner and results page (experiments/activation_results.py,
# experiments/block_sparse.py).
CUSTOM = {
    "activation": "SiLU vs ReLU vs ReLU² vs ProSparse: eval loss and activation sparsity",
    "training_free": "Training-free activation sparsity: TEAL vs CATS vs WINA",
    "block_sparse": "Block-sparse vs dense at equal steps and at equal wall-clock: unstructured "
                    "RigL, block RigL (16/32/64 blocks), block static and a 2x wider "
                    "block-sparse model (densities 0.2 and 0.1)",
    "expert_pruning": "MoE expert pruning and merging: frequency, reconstruction, merge and "
                      "REAP at 25% and 50% of 16 experts pruned, before and after a recovery "
                      "fine-tune",
}


def _splice(md: str, title: str, block: str) -> str:
    """The page `md` with `block` between the markers (a new page if there is none)."""
    if os.path.isfile(md):
        with open(md) as f:
            text = f.read()
        if BEGIN not in text or END not in text:
            raise ValueError(f"{md} has no {BEGIN} ... {END} markers; add them where the "
                             "table goes")
        head, rest = text.split(BEGIN, 1)
        return head + block + rest.split(END, 1)[1]
    return f"# {title}\n\n{block}\n"


def run_custom(name: str, out: str, parallel: int) -> int:
    import activation_results as ar
    import block_sparse as bs
    import expert_pruning as ep
    if name == "block_sparse":
        return bs.run(out, parallel)
    if name == "expert_pruning":
        return ep.run(out, parallel)
    if name == "activation":
        return sum(run_grid(g, out, parallel) for g in ar.GRIDS)
    ar.run_training_free(out)
    return 0


def write_custom(name: str, out: str, results_dir: str = RESULTS,
                 allow_mixed_corpora: bool = False) -> dict:
    """Writes results_dir/<name>.md (between the markers) and <name>.png."""
    import activation_results as ar
    import block_sparse as bs
    import expert_pruning as ep
    os.makedirs(results_dir, exist_ok=True)
    png = os.path.join(results_dir, f"{name}.png")
    if name == "expert_pruning":
        records = ep.load_results(out)
        table = ep.markdown(records)
        png = ep.plot(records, png)
        how = (f"Command: `{command(name)}` (experiments/expert_pruning.py). Source: "
               "configs/experiments/small.gin + configs/moe/top2.gin with 16 experts of width "
               f"128 (2 MoE layers, top-2), {ep.SOURCE_STEPS} steps. Each point: `sparsejax prune "
               "--method=none --experts=R --num_experts=K` on 128 calibration rows of the "
               "training split drawn with calibration seed 0, 1 or 2 (super experts protected, "
               f"the default), then a {ep.FINETUNE_STEPS}-step recovery fine-tune (`sparsejax "
               "train` on the pruned workdir). Loss in nats/token on the run's fixed eval sample "
               "(1024 validation rows), mean ± standard error over calibration seeds; Δ: "
               f"difference to {ep.REFERENCE} with the same calibration seed, mean ± standard "
               "error of the paired differences; eval stderr: the eval's standard error over "
               "its rows (mean over seeds); super experts kept: protected experts per point.")
    elif name == "block_sparse":
        equal, timed, cal = bs.results(out, allow_mixed_corpora=allow_mixed_corpora)
        table = bs.markdown(equal, timed, cal)
        png = bs.plot(equal, timed, cal, png)
        how = (f"Command: `{command(name)}` (grids: "
               + ", ".join(f"[{g}](../grids/{g}.grid)" for g in bs.GRIDS) + "; the equal "
               "wall-clock runs are those grid points with `TrainConfig.num_steps` set from the "
               "calibration). Loss in nats/token, mean ± sample std over seeds; Δ: difference "
               f"to `{bs.BASELINE}` run with the same seed (same data order); eval stderr: the "
               "final eval's standard error over its fixed sample's rows (mean over seeds); "
               "params: weights that can be nonzero at the end (embeddings and LM head "
               "included); final density: the stored (block) or kept (RigL) fraction of the "
               "attention and MLP projections (`sparsity/density`); tokens/s: as measured "
               "while `--parallel` trials shared the machine; calibrated tokens/s: one trial at "
               "a time, eval off; speed vs dense: its ratio to dense's.")
    elif name == "activation":
        rows, curves = ar.activation_rows(out)
        table = ar.activation_markdown(rows)
        png = ar.activation_plot(curves, png) if curves else None
        how = (f"Command: `{command(name)}` (grids: [activation_functions]"
               "(../grids/activation_functions.grid), [prosparse](../grids/prosparse.grid)). "
               "Loss in nats/token, mean ± sample std over seeds; Δ: difference to silu with "
               "the same seed; eval stderr: the final eval's standard error over its rows; "
               "zero fraction: MLP intermediate entries exactly 0 on the eval sample (first "
               "eval at step 50); PPL-1% sparsity: the largest per-layer threshold sparsity of "
               "the intermediates whose calibration perplexity stays within 1% (final checkpoint).")
    else:
        table = ar.training_free_markdown(out)
        png = ar.training_free_plot(out, png)
        how = (f"Command: `{command(name)}` (base.gin, 200 steps, SiLU; then `sparsejax "
               "act-curves` twice). Thresholds calibrated per site on 16,384 training tokens; "
               "losses on the fixed eval sample; Δ and its standard error are paired over the "
               "same eval rows; achieved: mean over sites of the fraction of entries zeroed.")
    block = "\n".join([BEGIN, how, "", table,
                       f"![{name}]({name}.png)" if png else "(no finished runs yet)", END])
    md = os.path.join(results_dir, f"{name}.md")
    text = _splice(md, CUSTOM[name], block)
    with open(md, "w") as f:
        f.write(text)
    return {"reproduction": name, "markdown": md, "plot": png}


def grid_path(name: str) -> str:
    return os.path.join(GRIDS, f"{name}.grid")


def run_grid(name: str, out: str, parallel: int) -> int:
    """Runs (or resumes) one grid into out/<name>. Returns the number of failed trials."""
    from sparsejax.sweep import grid, runner
    spec = grid.build_spec(grid_file=grid_path(name))
    runner.validate_spec(spec)
    sweep = runner.run_sweep(spec, os.path.join(out, name), parallel=parallel)
    if sweep.stopped:
        raise KeyboardInterrupt
    return len(sweep.failed)


def command(name: str) -> str:
    return f"python experiments/reproduce.py {name}"


def write_results(name: str, out: str, results_dir: str = RESULTS,
                  allow_mixed_corpora: bool = False) -> dict:
    """Writes results_dir/<name>.md (table between the markers) and <name>.png."""
    from sparsejax.sweep import compare
    rep = REPRODUCTIONS[name]
    variants = compare.collect([os.path.join(out, g) for g in rep.grids], allow_mixed_corpora)
    corpora = compare.corpus_fingerprints(variants)
    rows = compare.compare_rows(variants, baseline=rep.baseline)
    os.makedirs(results_dir, exist_ok=True)
    png = compare.plot_comparison(variants, os.path.join(results_dir, f"{name}.png"),
                                  title=rep.title)
    block = "\n".join([
        BEGIN,
        f"Command: `{command(name)}` (grids: "
        + ", ".join(f"[{g}](../grids/{g}.grid)" for g in rep.grids) + "). "
        f"Loss in nats/token, mean ± sample std over seeds; Δ is the difference to "
        f"`{rep.baseline}` run with the same seed (same data order); eval stderr: the "
        "standard error of one trial's final eval loss over its fixed eval sample's rows (mean "
        f"over seeds; corpus fingerprint {', '.join(corpora) or 'n/a'}); params: weights that "
        "can be nonzero at the end (embeddings included), avg params: their mean over "
        "training; tokens/s as measured while `--parallel` trials shared the machine.",
        "",
        compare.markdown_table(rows),
        f"![{name}]({name}.png)" if png else "(no finished trials yet)",
        END])
    md = os.path.join(results_dir, f"{name}.md")
    text = _splice(md, rep.title, block)
    with open(md, "w") as f:
        f.write(text)
    finished = sum(len(v.results) for v in variants)
    return {"reproduction": name, "markdown": md, "plot": png, "finished_trials": finished}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="+",
                   help=f"'all' or some of: {', '.join(list(REPRODUCTIONS) + list(CUSTOM))}")
    p.add_argument("--out", default=os.path.join(HERE, "runs"),
                   help="where trials run (default experiments/runs/)")
    p.add_argument("--parallel", type=int, default=2, help="trials run at once")
    p.add_argument("--report_only", action="store_true",
                   help="only rewrite the tables and plots from finished trials")
    p.add_argument("--allow_mixed_corpora", action="store_true",
                   help="compare trials trained on different corpora instead of refusing")
    p.add_argument("--results_dir", default=RESULTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    names = list(REPRODUCTIONS) + list(CUSTOM) if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in REPRODUCTIONS and n not in CUSTOM]
    if unknown:
        print(f"error: unknown reproduction(s) {unknown}; valid: all, "
              f"{', '.join(list(REPRODUCTIONS) + list(CUSTOM))}", file=sys.stderr)
        return 2
    failed = 0
    sys.path.insert(0, HERE)  # activation_results.py, block_sparse.py, expert_pruning.py
    try:
        for name in names:
            if name in CUSTOM:
                if not args.report_only:
                    failed += run_custom(name, args.out, args.parallel)
                print(json.dumps(write_custom(name, args.out, args.results_dir,
                                              args.allow_mixed_corpora)), flush=True)
                continue
            if not args.report_only:
                for g in REPRODUCTIONS[name].grids:
                    failed += run_grid(g, args.out, args.parallel)
            print(json.dumps(write_results(name, args.out, args.results_dir,
                                           args.allow_mixed_corpora)), flush=True)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped; rerun the same command to resume", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
