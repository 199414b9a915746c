"""`sparsejax import-hf` and `sparsejax export-hf` (wired into sparsejax/cli.py)."""
from __future__ import annotations

import argparse
from typing import Sequence


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


def run_import(args: argparse.Namespace, bindings: Sequence[str]) -> int:
    from sparsejax import cli
    from sparsejax.train.commands import guarded

    def go():
        cli.quiet_logging()
        from sparsejax.interop.import_hf import import_hf
        return import_hf(args.src, args.workdir, bindings, imports=args.imports)
    return guarded(go)


def run_export(args: argparse.Namespace, bindings: Sequence[str]) -> int:
    from sparsejax import cli
    from sparsejax.train.commands import guarded, parse_workdir_config

    def go():
        cli.quiet_logging()
        from sparsejax.interop.export_hf import export_hf
        parse_workdir_config(args.workdir, args.gin_file, bindings, args.imports)
        return export_hf(args.workdir, args.out, dtype=args.dtype,
                         max_shard_bytes=int(args.max_shard_gb * 2**30))
    return guarded(go)
