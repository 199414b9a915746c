"""`sparsejax prune` (wired into sparsejax/cli.py). Its flags are shorthands for `PruneConfig`
bindings; solver settings are gin bindings of their classes (`--gin.SparseGPTSettings.
dampening=0.05`), bindings of the run (`--gin.learning_rate_schedule.peak_lr=3e-4`) configure
the sparse recovery fine-tune written to --out."""
from __future__ import annotations

import argparse
from typing import Sequence

from sparsejax.train.commands import add_run_flags, guarded, shorthand_bindings, start_processes

# flag -> (PruneConfig field, parser of the flag's text)
def _opt_str(v: str) -> str | None:
    return None if v.lower() in ("none", "") else v


def _step(v: str) -> int | float:
    try:
        return int(v)
    except ValueError:
        return float(v)


FLAGS = {"method": _opt_str, "sparsity": float, "nm": _opt_str, "structure": _opt_str,
         "allocation": str, "calibration_samples": int, "calibration_seed": int,
         "calibration_split": str, "calibration_data": str, "calibration": str, "calibration_batch_size": int,
         "experts": _opt_str, "num_experts": int, "finetune_steps": _step, "eval_tokens": int}


def add_parsers(sub) -> None:
    s = sub.add_parser("prune", help="post-training pruning of a workdir's model (magnitude, "
                                     "Wanda, GBLM, SparseGPT, DSnoT, OWL, expert pruning / "
                                     "merging) into a new workdir")
    add_run_flags(s)
    for action in s._actions:
        if action.dest == "workdir":
            action.help = "the source: a trained workdir or one made by import-hf"
    s.add_argument("--out", required=True, help="the pruned workdir (new)")
    g = s.add_argument_group("pruning (shorthands for PruneConfig.<name> bindings)")
    g.add_argument("--method", help="magnitude | wanda | gblm | sparsegpt | none "
                                    "(default sparsegpt)")
    g.add_argument("--sparsity", help="pruned fraction in (0, 1) (default 0.5)")
    g.add_argument("--nm", help="N:M along the input dim, e.g. 2:4 or 4:8")
    g.add_argument("--structure", help="unstructured | per_output | global | nm | block")
    g.add_argument("--allocation", help="uniform | owl (per-block densities)")
    g.add_argument("--dsnot", action="store_true", help="refine masks with DSnoT")
    g.add_argument("--compact", action="store_true",
                   help="with --structure=block: write the output in the compact block-sparse "
                        "weight format (a constant number of blocks per output block column)")
    for name in ("calibration_samples", "calibration_seed", "calibration_split",
                 "calibration_batch_size"):
        g.add_argument(f"--{name}")
    g.add_argument("--calibration_data", help="files:GLOB: random windows of these files' "
                                              "text (the papers' calibration set; default: "
                                              "the run's dataset)")
    g.add_argument("--calibration", help="sequential (default) | parallel")
    g.add_argument("--experts", help="frequency | reconstruction | merge | reap (MoE; super "
                                     "experts are kept unless --gin.PruneConfig."
                                     "protect_super_experts=False)")
    g.add_argument("--num_experts", help="experts each MoE layer keeps")
    g.add_argument("--finetune_steps", help="steps of the recovery fine-tune in --out (int, "
                                            "or a fraction of the source run; default 0.1)")
    g.add_argument("--eval_tokens", help="eval sample before/after (default TrainConfig's)")
    s.set_defaults(handler=run_prune)


def flag_bindings(args: argparse.Namespace, bindings: Sequence[str]) -> list[str]:
    """PruneConfig bindings of the given flags (train/commands.shorthand_bindings)."""
    return shorthand_bindings("PruneConfig", FLAGS, args, bindings, switches=("dsnot", "compact"))


def run_prune(args: argparse.Namespace, bindings: Sequence[str]) -> int:
    def go():
        start_processes(args)
        # deferred: keeps the CLI's start fast
        from sparsejax.sparsity.posttrain.workdir import prune_workdir
        return prune_workdir(args.workdir, args.out, args.gin_file,
                             list(bindings) + flag_bindings(args, bindings), args.imports)
    return guarded(go)
