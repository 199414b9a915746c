"""`sparsejax list`: the shipped configs, every registered plug-in and the Hugging Face families
of import-hf / export-hf, one line each."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from sparsejax import config
from sparsejax.registry import REGISTRIES


def add_parsers(sub) -> None:
    s = sub.add_parser("list", help="shipped configs, registered methods, criteria, "
                                    "schedules, routers, ... and Hugging Face families, with "
                                    "one line each")
    s.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE first, so its plug-ins are listed too")
    s.set_defaults(handler=run)


def listing(imports: Sequence[str] = ()) -> str:
    """The text `sparsejax list` prints."""
    from sparsejax.interop.families import FAMILIES  # deferred: keeps the CLI's start fast
    config.register_configurables()
    config.import_plugins(imports)
    lines = [f"configs ({config.config_dir()}):"]
    for name in config.shipped_configs():
        lines.append(f"  {name:<34} {first_comment(config.config_dir() / name)}")
    for kind, reg in REGISTRIES.items():
        lines.append(f"\n{kind} ({len(reg)}):")
        for name, doc in reg.describe().items():
            lines.append(f"  {name:<34} {doc}")
    lines.append(f"\nhugging face family (import-hf, export-hf) ({len(FAMILIES)}):")
    for name, doc in FAMILIES.items():
        lines.append(f"  {name:<34} {doc}")
    return "\n".join(lines)


def first_comment(path) -> str:
    """The first comment line of a gin file (its one-line description)."""
    with open(path) as f:
        for line in f:
            if line.startswith("#"):
                return line.lstrip("# ").rstrip()
    return ""


def run(args: argparse.Namespace, bindings: Sequence[str]) -> int:
    if bindings:
        print(f"error: list takes no --gin.* flags (got {list(bindings)})", file=sys.stderr)
        return 2
    try:
        print(listing(args.imports))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
