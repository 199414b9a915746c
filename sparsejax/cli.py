"""`sparsejax <command>`: gin-configured entry points.

    sparsejax train --gin_file=tiny.gin --gin.TrainConfig.num_steps=50 --workdir=/tmp/run
    sparsejax list

Each command lives in its own module (listed in `COMMAND_MODULES`), which provides
`add_parsers(subparsers)`; every parser it adds sets `handler=fn(args, bindings) -> int`.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from sparsejax import hugepages
from sparsejax.config import split_args

COMMAND_MODULES = (
    "sparsejax.train.commands",   # train, eval
    "sparsejax.sweep.cli",        # sweep, report
    "sparsejax.listing",          # list
    "sparsejax.interop.commands",  # import-hf, export-hf, lm-eval
    "sparsejax.infer.commands",    # sample, longeval, streaming-heads, prefill-search
    "sparsejax.sparsity.posttrain.commands",  # prune
    "sparsejax.sparsity.activation.commands",  # act-curves
    "sparsejax.analysis.commands",  # moe-report
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsejax", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parsers(sub)
    return p


def quiet_logging() -> None:
    """INFO logs from sparsejax, warnings only from the libraries underneath. `main` calls it
    before the command modules import anything: a library imported first may configure the
    root logger itself (absl does when orbax logs at import), and this would then do nothing,
    leaving sparsejax's INFO lines unprinted."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("orbax", "jax._src", "tensorflow_datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's notes on missing metadata files
    for handler in logging.getLogger().handlers:  # gin logs each include-path probe
        handler.addFilter(lambda r: not r.getMessage().startswith(
            ("Path not found", "system_path_file_exists")))


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # a process of its own: restart with huge pages where they help
        hugepages.ensure()
    quiet_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    bindings, rest = split_args(argv)
    args = build_parser().parse_args(rest)
    return args.handler(args, bindings)


if __name__ == "__main__":
    sys.exit(main())
