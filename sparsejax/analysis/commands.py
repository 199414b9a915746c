"""`sparsejax moe-report` (wired into sparsejax/cli.py): routing analysis of a MoE workdir
(analysis/moe_report.py). Its calibration flags are shorthands for `MoeReport` bindings;
other settings are gin bindings (`--gin.MoeReport.segment_lengths=(16,64)`,
`--gin.MoeReport.cache_sizes=(2,4,8)`, `--gin.SuperExperts.multiple=20`)."""
from __future__ import annotations

import argparse
from typing import Sequence

from sparsejax.train.commands import add_run_flags, guarded, shorthand_bindings, start_processes

FLAGS = {"calibration_samples": int, "calibration_seed": int, "calibration_split": str,
         "calibration_data": str, "calibration_batch_size": int}


def add_parsers(sub) -> None:
    s = sub.add_parser("moe-report", help="per MoE layer: expert load, co-activation, routing "
                                          "consistency (segment coverage, cache hit rates) and "
                                          "super-expert candidates, as JSON and plots in the "
                                          "workdir")
    add_run_flags(s)
    for action in s._actions:
        if action.dest == "workdir":
            action.help = "a trained MoE workdir or one made by import-hf (outputs go here)"
    g = s.add_argument_group("calibration (shorthands for MoeReport.<name> bindings)")
    for name in FLAGS:
        g.add_argument(f"--{name}", help="files:GLOB: windows of these files' text (default: "
                                         "the run's dataset)" if name == "calibration_data"
                       else None)
    s.set_defaults(handler=run_moe_report)


def flag_bindings(args: argparse.Namespace, bindings: Sequence[str]) -> list[str]:
    """MoeReport bindings of the given flags (train/commands.shorthand_bindings)."""
    return shorthand_bindings("MoeReport", FLAGS, args, bindings)


def run_moe_report(args: argparse.Namespace, bindings: Sequence[str]) -> int:
    def go():
        start_processes(args)
        # deferred: keeps the CLI's start fast
        from sparsejax.analysis.moe_report import moe_report_workdir
        return moe_report_workdir(args.workdir, args.gin_file,
                                  list(bindings) + flag_bindings(args, bindings), args.imports)
    return guarded(go)
