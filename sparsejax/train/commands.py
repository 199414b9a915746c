"""`sparsejax train` and `sparsejax eval` (wired into sparsejax/cli.py)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence


def add_run_flags(s: argparse.ArgumentParser) -> None:
    """Flags every command that builds a run shares: gin files, plug-ins, workdir, processes."""
    s.add_argument("--gin_file", action="append", default=[],
                   help="gin file (path or name of a shipped config); repeatable, later wins")
    s.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (registers outside criteria, routers, ...); "
                        "repeatable")
    s.add_argument("--workdir", required=True, help="checkpoints, metrics and plots go here")
    s.add_argument("--quiet", action="store_true", help="do not print the gin config")
    g = s.add_argument_group("multi-process runs (auto-detected on TPU VMs and SLURM)")
    g.add_argument("--coordinator_address", help="HOST:PORT of process 0")
    g.add_argument("--num_processes", type=int)
    g.add_argument("--process_id", type=int)
    g.add_argument("--distributed_timeout_s", type=int, default=300,
                   help="give up joining the run after this many seconds")
    g.add_argument("--heartbeat_timeout_s", type=int, default=60,
                   help="a process that stops answering for this long fails the whole run")


def add_parsers(sub) -> None:
    for name, help_, fn in (("train", "train or resume a run", run_train),
                            ("eval", "loss/perplexity of a checkpoint on the validation split",
                             run_eval)):
        s = sub.add_parser(name, help=help_)
        add_run_flags(s)
        s.set_defaults(handler=fn)


def start_run(args: argparse.Namespace, bindings: Sequence[str]) -> str:
    """Logging, jax.distributed and gin for a run command; returns the parsed config text."""
    from sparsejax import cli
    from sparsejax.config import parse_gin
    from sparsejax.parallel import distributed
    cli.quiet_logging()
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                           timeout_s=args.distributed_timeout_s,
                           heartbeat_timeout_s=args.heartbeat_timeout_s)
    files = list(args.gin_file) or ["base.gin"]
    workdir_gin = os.path.join(args.workdir, "config.gin")
    if os.path.isdir(os.path.join(args.workdir, "pretrained")) and os.path.isfile(workdir_gin):
        # an import-hf workdir: its config.gin rebuilds the imported architecture
        files = [workdir_gin] + list(args.gin_file)
    return parse_gin(files, bindings, imports=args.imports)


def guarded(fn):
    """Runs fn(); a ValueError (bad input) exits 2 and a RuntimeError exits 1, each with one
    line on stderr; otherwise prints the result as JSON and exits 0."""
    try:
        result = fn()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


def run_train(args: argparse.Namespace, bindings: Sequence[str]) -> int:
    def go():
        config_str = start_run(args, bindings)
        from sparsejax.train import trainer
        if not args.quiet:
            print("# gin config\n" + config_str, flush=True)
        return trainer.train(args.workdir, config_str=config_str)
    return guarded(go)


def run_eval(args: argparse.Namespace, bindings: Sequence[str]) -> int:
    def go():
        start_run(args, bindings)
        from sparsejax.train import trainer
        return trainer.evaluate_checkpoint(args.workdir)
    return guarded(go)
