"""`sparsejax train` and `sparsejax eval` (wired into sparsejax/cli.py)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Mapping, Sequence

from sparsejax import cli
from sparsejax.config import parse_gin
from sparsejax.train import workdir as workdir_lib


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
        if name == "eval":
            g = s.add_argument_group(
                "a text under the papers' perplexity protocols instead of the eval sample "
                "(train/text_eval.py)")
            g.add_argument("--text_file", action="append", default=[],
                           help="text to score (repeatable: joined with a blank line)")
            g.add_argument("--dataset", help="'files:GLOB': score these files' text")
            g.add_argument("--protocol", choices=("concat", "sliding"), default="concat",
                           help="concat: non-overlapping windows (SparseGPT/Wanda); sliding: "
                                "windows every --stride tokens (HF perplexity guide)")
            g.add_argument("--stride", type=int, help="sliding: tokens between window starts")
            g.add_argument("--seq_len", type=int,
                           help="window in tokens (default: ModelConfig.max_seq_len)")
        if name == "train":
            s.add_argument("--allow_config_change", action="store_true",
                           help="resume even though bindings differ from the checkpoint's "
                                "(logged, and recorded in metrics.jsonl)")
            s.add_argument("--allow_unused_bindings", action="store_true",
                           help="run even if some given bindings have no effect (sweeps "
                                "whose shared bindings concern some trials only)")


def shorthand_bindings(config: str, flags: Mapping[str, Callable[[str], Any]],
                       args: argparse.Namespace, bindings: Sequence[str],
                       switches: Sequence[str] = ()) -> list[str]:
    """`config.<name>=value` bindings of a command's shorthand flags (`flags`: name -> parser
    of its text; `switches`: store_true flags bound to True when set); a flag and a --gin
    binding of the same field, or a text its parser refuses, is a ValueError."""
    given = {b.partition("=")[0].strip() for b in bindings}
    values: dict[str, Any] = {}
    for name, parse in flags.items():
        text = getattr(args, name, None)
        if text is None:
            continue
        try:
            values[name] = parse(text)
        except ValueError:
            raise ValueError(f"--{name}={text!r} is not a valid "
                             f"{parse.__name__.strip('_')}") from None
    values.update({name: True for name in switches if getattr(args, name)})
    out = []
    for name, value in values.items():
        key = f"{config}.{name}"
        if key in given:
            raise ValueError(f"--{name} and --gin.{key} both given; keep one")
        out.append(f"{key}={value!r}")
    return out


def start_processes(args: argparse.Namespace) -> None:
    """Quiet logging and jax.distributed from a run command's multi-process flags."""
    from sparsejax.parallel import distributed  # deferred: keeps the CLI's start fast (jax)
    cli.quiet_logging()
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                           timeout_s=args.distributed_timeout_s,
                           heartbeat_timeout_s=args.heartbeat_timeout_s)


def start_run(args: argparse.Namespace, bindings: Sequence[str]) -> str:
    """Logging, jax.distributed and gin for a run command; returns the parsed config text.

    A workdir that holds a run (a checkpoint and its config.gin) or an imported model is
    configured by its own config first, then by the given gin files and bindings; a fresh
    workdir by the gin files alone (base.gin when none is given)."""
    start_processes(args)
    return parse_workdir_config(args.workdir, args.gin_file, bindings, args.imports,
                                default=("base.gin",))


def parse_workdir_config(workdir: str, gin_files: Sequence[str], bindings: Sequence[str],
                         imports: Sequence[str] = (), default: Sequence[str] | None = None) -> str:
    """Parses the workdir's own config (see `workdir.saved_config`), then `gin_files` and
    `bindings` on top; a workdir without one uses `gin_files` or else `default` (None: the
    command needs a configured workdir, so it is an error)."""
    saved = workdir_lib.saved_config(workdir)
    files = list(gin_files)
    if saved is None and not files:
        if default is None:
            raise ValueError(f"--workdir={workdir!r} holds no run or imported model to take "
                             f"the config from; pass the run's --gin_file")
        files = list(default)
    return parse_gin(files, bindings, imports=imports, workdir_config=saved)


def error_text(e: BaseException) -> str:
    """The exception's message without the "In call to configurable ..." lines gin adds."""
    return "\n".join(line for line in str(e).splitlines()
                     if not line.strip().startswith("In call to configurable"))


def guarded(fn):
    """Runs fn(); a ValueError (bad input) exits 2 and a RuntimeError exits 1, each with its
    message on stderr; otherwise prints the result as JSON and exits 0."""
    try:
        result = fn()
    except ValueError as e:
        print(f"error: {error_text(e)}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"error: {error_text(e)}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


def run_train(args: argparse.Namespace, bindings: Sequence[str]) -> int:
    def go():
        config_str = start_run(args, bindings)
        from sparsejax.train import trainer  # deferred: keeps the CLI's start fast
        if not args.quiet:
            print("# gin config\n" + config_str, flush=True)
        return trainer.train(args.workdir, allow_config_change=args.allow_config_change,
                             allow_unused_bindings=args.allow_unused_bindings)
    return guarded(go)


def run_eval(args: argparse.Namespace, bindings: Sequence[str]) -> int:
    def go():
        from sparsejax.train.text_eval import TextEval  # deferred: keeps the CLI's start fast
        text = None
        if args.text_file or args.dataset:
            text = TextEval(tuple(args.text_file), args.dataset, args.protocol, args.stride,
                            args.seq_len)
        elif args.stride is not None or args.seq_len is not None or args.protocol != "concat":
            raise ValueError("--protocol, --stride and --seq_len apply to a text: give "
                             "--text_file or --dataset=files:GLOB")
        start_run(args, bindings)
        from sparsejax.train import trainer  # deferred: keeps the CLI's start fast
        return trainer.evaluate_checkpoint(args.workdir, text=text)
    return guarded(go)
