"""Stream a run's log from worker 0 (default) or from every worker.

    python tpu/logs.py --name my-pod --zone us-central2-b              # follow worker 0
    python tpu/logs.py --name my-pod --zone us-central2-b --worker all --lines 20 --no_follow

The run defaults to the last one launched on this TPU (remembered by launch.py).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tpu import common  # noqa: E402


def build_parser():
    p = common.base_parser(__doc__)
    p.add_argument("--run_name", default=None,
                   help="run whose log to show (default: the last launch on this TPU)")
    p.add_argument("--worker", default="0", help="worker index, or 'all' (default: %(default)s)")
    p.add_argument("--lines", type=int, default=100,
                   help="lines of history to show first (default: %(default)s)")
    p.add_argument("--no_follow", action="store_true", help="print and exit instead of tail -f")
    return p


def resolve_run_name(args) -> str:
    """--run_name, else the run name of the last launch remembered for this TPU."""
    if args.run_name:
        return common.check_name("--run_name", args.run_name)
    saved = common.load_state(args.state_dir, args.name).get("launch")
    if not saved:
        raise ValueError(f"--run_name is required: no remembered launch for --name={args.name!r} "
                         f"in {args.state_dir}")
    from tpu import launch
    old = launch.build_parser().parse_args(launch.normalize_argv(saved))
    launch.validate(old)
    return old.run_name


def logs_command(args) -> list[str]:
    if args.worker != "all" and not args.worker.isdigit():
        raise ValueError(f"--worker={args.worker!r} is not valid: a worker index (0, 1, ...) "
                         "or 'all'")
    if args.lines < 0:
        raise ValueError(f"--lines={args.lines} must be >= 0")
    log = common.remote_paths(resolve_run_name(args))["log"]
    tail = f'tail -n {args.lines}{"" if args.no_follow else " -F"} "{log}"'
    return common.ssh(args, tail, worker=args.worker)


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.check_name("--name", args.name)
    cmd = logs_command(args)
    try:
        common.Runner(args.dry_run).run(cmd)
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.cli_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
