"""`sparsejax import-hf`, `sparsejax export-hf` and `sparsejax lm-eval` (wired into
sparsejax/cli.py)."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from sparsejax import cli
from sparsejax.train.commands import error_text, guarded, parse_workdir_config


def add_parsers(sub) -> None:
    s = sub.add_parser("import-hf", help="import a Hugging Face checkpoint (config.json + "
                                         "safetensors) into a workdir")
    s.add_argument("--src", required=True, help="directory with config.json and safetensors")
    s.add_argument("--workdir", required=True, help="the new workdir")
    s.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE")
    s.set_defaults(handler=run_import)
    e = sub.add_parser("export-hf", help="export a workdir's latest checkpoint as a Hugging "
                                         "Face checkpoint")
    e.add_argument("--workdir", required=True)
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--gin_file", action="append", default=[],
                   help="gin files of the run (an import-hf workdir needs none)")
    e.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE")
    e.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    e.add_argument("--max_shard_gb", type=float, default=5.0,
                   help="safetensors files are sharded above this size")
    e.set_defaults(handler=run_export)
    m = sub.add_parser("lm-eval", add_help=False, prefix_chars="\0",
                       help="lm-evaluation-harness with the `sparsejax` model: lm_eval's own "
                            "flags, e.g. --model_args workdir=W --tasks T (needs the [eval] "
                            "extra)")
    m.add_argument("lm_eval_args", nargs="*")  # (no options of its own: all go to lm_eval)
    m.set_defaults(handler=run_lm_eval)


def run_import(args: argparse.Namespace, bindings: Sequence[str]) -> int:
    def go():
        cli.quiet_logging()
        from sparsejax.interop.import_hf import import_hf  # deferred: keeps the CLI's start fast
        return import_hf(args.src, args.workdir, bindings, imports=args.imports)
    return guarded(go)


def run_export(args: argparse.Namespace, bindings: Sequence[str]) -> int:
    def go():
        cli.quiet_logging()
        from sparsejax.interop.export_hf import export_hf  # deferred: keeps the CLI's start fast
        parse_workdir_config(args.workdir, args.gin_file, bindings, args.imports)
        return export_hf(args.workdir, args.out, dtype=args.dtype,
                         max_shard_bytes=int(args.max_shard_gb * 2**30))
    return guarded(go)


def run_lm_eval(args: argparse.Namespace, bindings: Sequence[str]) -> int:
    try:
        from sparsejax.interop import lm_eval_model  # optional dependency: eval (lm_eval, slow)
    except ImportError as e:
        print(f"error: sparsejax lm-eval needs lm_eval ({e}); pip install 'sparsejax[eval]'",
              file=sys.stderr)
        return 2
    try:
        return lm_eval_model.main(args.lm_eval_args, bindings)
    except ValueError as e:
        print(f"error: {error_text(e)}", file=sys.stderr)
        return 2
