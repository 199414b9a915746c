"""`sparsejax sweep` and `sparsejax report` (wired into sparsejax/cli.py).

    sparsejax sweep --gin_file=tiny.gin --sweep='ModelConfig.num_layers=[1, 2]' --seeds=3 \
        --out=/tmp/sweep --parallel=2 --gin.TrainConfig.num_steps=100
    sparsejax sweep --grid=experiments/grids/tiny_layers.grid --out=/tmp/sweep --dry_run
    sparsejax report --out=/tmp/sweep
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from sparsejax.sweep import grid


def add_parsers(sub) -> None:
    """Adds the `sweep` and `report` subcommands to sparsejax's argparse subparsers."""
    s = sub.add_parser("sweep", help="run a grid of training runs (resumable), then report")
    s.add_argument("--gin_file", action="append", default=[],
                   help="gin file of every trial (path or name under configs/); repeatable")
    s.add_argument("--grid", help="grid file (see sparsejax/sweep/grid.py), e.g. "
                                  "experiments/grids/NAME.grid")
    s.add_argument("--sweep", action="append", default=[], metavar="BINDING=[V1, V2]",
                   help="a gin binding and its values; repeatable (cartesian product)")
    s.add_argument("--seeds", default=None,
                   help="number of seeds (N: seeds 0..N-1) or a list like 0,7 (default 1)")
    s.add_argument("--out", required=True, help="sweep dir: trials, table and plots")
    s.add_argument("--parallel", type=int, default=1, help="trials run at once")
    s.add_argument("--cpu_devices", type=int, default=1,
                   help="XLA host-platform devices per trial (0: inherit XLA_FLAGS)")
    s.add_argument("--dry_run", action="store_true",
                   help="print one launch command per trial and run nothing")
    r = sub.add_parser("report", help="regenerate a sweep's table and plots")
    r.add_argument("--out", required=True, help="sweep dir written by `sparsejax sweep`")
    for p in (s, r):
        p.add_argument("--allow_mixed_corpora", action="store_true",
                       help="put trials trained on different corpora (corpus fingerprints) in "
                            "one table instead of refusing")
    s.set_defaults(handler=run)
    r.set_defaults(handler=run)


def run(args: argparse.Namespace, bindings: Sequence[str]) -> int:
    """Runs a parsed `sweep`/`report` command. Exit codes: 0 ok, 1 failed trials, 2 bad
    input."""
    from sparsejax.sweep import report, runner  # deferred: keeps the CLI's start fast
    try:
        if args.command == "report":
            if bindings:
                raise ValueError(f"report takes no --gin.* flags (got {list(bindings)})")
            print(json.dumps(report.write_report(args.out, args.allow_mixed_corpora)), flush=True)
            return 0
        spec = grid.build_spec(args.gin_file, args.sweep, args.seeds, bindings, args.grid)
        runner.validate_spec(spec)
        if args.dry_run:
            for line in runner.dry_run_lines(spec, args.out):
                print(line)
            return 0
        sweep = runner.run_sweep(spec, args.out, parallel=args.parallel,
                                 cpu_devices=args.cpu_devices or None)
        print(json.dumps(report.write_report(args.out, args.allow_mixed_corpora)), flush=True)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if sweep.failed or sweep.stopped else 0
