"""`sparsejax train|eval|sweep|report` — gin-configured entry points.

    sparsejax train --gin_file=configs/tiny.gin --gin.TrainConfig.num_steps=50 --workdir=/tmp/run
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import pkgutil
import sys
from pathlib import Path
from typing import Sequence

import gin

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _register_configurables() -> None:
    """Imports every module of sparsejax and pallas_kernels, so that every gin configurable
    is registered before any binding is parsed (gin refuses new ones once the config is
    locked)."""
    import pallas_kernels
    import sparsejax
    for pkg in (sparsejax, pallas_kernels):
        for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            importlib.import_module(mod.name)


def resolve_gin_file(name: str) -> str:
    """A gin file given as a path, or by name relative to the repository's configs/ dir."""
    for cand in (Path(name), CONFIG_DIR / name, CONFIG_DIR / f"{name}.gin"):
        if cand.is_file():
            return str(cand)
    raise ValueError(f"--gin_file={name!r} not found (looked in the working directory and in "
                     f"{CONFIG_DIR})")


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str]) -> str:
    """Parses gin files and `A.b=V` bindings; unknown bindings raise a ValueError naming them.
    Returns the full config text."""
    _register_configurables()
    gin.clear_config()
    gin.add_config_file_search_path(str(CONFIG_DIR))
    gin.add_config_file_search_path(os.getcwd())
    files = [resolve_gin_file(f) for f in gin_files]
    try:
        gin.parse_config_files_and_bindings(files, None, finalize_config=False)
    except (ValueError, KeyError, IOError) as e:
        raise ValueError(f"gin files {gin_files}: {e}") from None
    for b in bindings:
        try:
            gin.parse_config(b)
        except (ValueError, KeyError) as e:
            raise ValueError(f"gin binding {b!r} is not valid: {e}") from None
    gin.finalize()
    return gin.config_str()


def split_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates --gin.A.b=V flags (gin bindings) from ordinary flags."""
    bindings, rest = [], []
    for a in argv:
        if a.startswith("--gin.") and "=" in a:
            bindings.append(a[len("--gin."):])
        else:
            rest.append(a)
    return bindings, rest


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsejax", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("train", "train or resume a run"),
                        ("eval", "loss/perplexity of a checkpoint on the validation split")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--gin_file", action="append", default=[],
                       help="gin file (path or name under configs/); repeatable")
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
    from sparsejax.sweep import cli as sweep_cli
    sweep_cli.add_subparsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    bindings, rest = split_args(argv)
    args = build_parser().parse_args(rest)
    if args.command in ("sweep", "report"):
        from sparsejax.sweep import cli as sweep_cli
        return sweep_cli.run(args, bindings)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax._src", "tensorflow_datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:  # gin logs each include-path probe
        handler.addFilter(lambda r: not r.getMessage().startswith(
            ("Path not found", "system_path_file_exists")))
    try:
        from sparsejax.parallel import distributed
        distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                               timeout_s=args.distributed_timeout_s,
                               heartbeat_timeout_s=args.heartbeat_timeout_s)
        config_str = parse_gin(args.gin_file or ["base.gin"], bindings)
        from sparsejax.train import trainer
        if args.command == "train":
            if not args.quiet:
                print("# gin config\n" + config_str, flush=True)
            result = trainer.train(args.workdir, config_str=config_str)
        else:
            result = trainer.evaluate_checkpoint(args.workdir)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
