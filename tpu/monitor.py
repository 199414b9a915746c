"""Show a TPU's state (and its queued resource's) and whether the training run is alive.

    python tpu/monitor.py --name my-pod --zone us-central2-b [--queued] [--watch 60]

Per worker the run is `running`, `finished CODE`, `dead` (its process is gone without an exit
code: killed, or the VM restarted) or `absent` (never launched there).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tpu import common  # noqa: E402


def build_parser():
    p = common.base_parser(__doc__)
    p.add_argument("--queued", action="store_true", help="also show the queued resource's state")
    p.add_argument("--run_name", default=None,
                   help="run to check (default: the last launch on this TPU)")
    p.add_argument("--watch", type=float, default=0.0, metavar="SECONDS",
                   help="repeat every SECONDS until interrupted (default: once)")
    return p


def _run_name(args) -> str | None:
    from tpu import logs
    try:
        return logs.resolve_run_name(args)
    except ValueError:
        return None


def check_once(args, runner: common.Runner, run_name: str | None) -> str:
    """Queries the TPU (and the run on every worker when READY); returns a summary text."""
    lines = []
    if args.queued:
        lines.append(f"queued resource {args.name}: {common.tpu_state(args, runner, queued=True)}")
    state = common.tpu_state(args, runner)
    lines.append(f"TPU {args.name}: {state}")
    if run_name is None:
        lines.append("run: unknown (pass --run_name)")
    elif state == "READY" or runner.dry_run:
        out = runner.run(common.ssh(args, common.status_script(run_name)), capture=True,
                         check=False)
        statuses = common.parse_status(out)
        lines.append(f"run {run_name}: " + (", ".join(f"{h} {s}" for h, s in statuses)
                                            or "no answer from the workers"))
    else:
        lines.append(f"run {run_name}: not checked (TPU is not READY)")
    return "\n".join(lines)


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.check_name("--name", args.name)
    if args.watch < 0:
        raise ValueError(f"--watch={args.watch} must be >= 0")
    run_name = _run_name(args)
    runner = common.Runner(args.dry_run)
    while True:
        summary = check_once(args, runner, run_name)
        if not args.dry_run:
            print(f"--- {time.strftime('%F %T')}\n{summary}", flush=True)
        if args.dry_run or not args.watch:
            return 0
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:
            return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.cli_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
