"""Launch `sparsejax train` with a gin config on every worker of a TPU VM / pod slice.

    python tpu/launch.py --name my-pod --zone us-central2-b \\
        --gin_file=configs/base.gin --gin TrainConfig.num_steps=20000 --workdir=gs://BUCKET/runs/r1
    python tpu/launch.py --name my-pod --zone us-central2-b --resume    # same command again
    python tpu/launch.py --name my-pod --zone us-central2-b --stop

Every worker runs the same command (JAX on TPU VMs finds its peers through
`jax.distributed.initialize()`), detached with `nohup` under its own process group; output goes
to ~/sparsejax_logs/RUN.log on each worker, with RUN.pid and, once it ends, RUN.exit beside it.

`--resume` stops a leftover process and relaunches the same command (the flags of the last
launch are remembered per TPU under --state_dir); the trainer itself restores the latest
checkpoint from --workdir. `--restart_on_preemption` keeps polling: if the TPU is preempted it
deletes, re-creates and sets it up again with the remembered create/setup flags, then resumes;
if the run died on a READY TPU it resumes (at most --max_restarts times); it exits when every
worker finished with code 0.
"""
from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tpu import common  # noqa: E402


def build_parser():
    p = common.base_parser(__doc__)
    p.add_argument("--gin_file", action="append", default=[],
                   help="gin file, a path in the repo or a name under configs/; repeatable")
    p.add_argument("--gin", action="append", default=[], metavar="A.b=V",
                   help="gin binding, passed on as --gin.A.b=V; repeatable (`--gin.A.b=V` "
                        "works here too)")
    p.add_argument("--workdir", default=None,
                   help="run directory: gs://BUCKET/PATH (needed for pods and preemption) or a "
                        "path on each worker")
    p.add_argument("--run_name", default=None,
                   help="names the log/pid files (default: last component of --workdir)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the training process; repeatable")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="relaunch the last launch's command (after a preemption or crash)")
    mode.add_argument("--stop", action="store_true", help="stop the run on every worker")
    p.add_argument("--restart_on_preemption", action="store_true",
                   help="keep polling the TPU and relaunch / re-create it after preemption")
    p.add_argument("--poll_seconds", type=float, default=300.0,
                   help="poll interval of --restart_on_preemption (default: %(default)s)")
    p.add_argument("--max_restarts", type=int, default=20,
                   help="give up after this many relaunches (default: %(default)s)")
    return p


def normalize_argv(argv: Sequence[str]) -> list[str]:
    """Accepts sparsejax-style `--gin.A.b=V` flags too, turning them into `--gin A.b=V`."""
    out: list[str] = []
    for a in argv:
        out += ["--gin", a[len("--gin."):]] if a.startswith("--gin.") and "=" in a else [a]
    return out


def _fill_from_saved(args, parser) -> None:
    """--resume without run flags: take gin files, bindings, workdir, ... from the last launch."""
    if args.gin_file or args.workdir is not None:
        return
    saved = common.load_state(args.state_dir, args.name).get("launch")
    if not saved:
        raise ValueError(f"no remembered launch for --name={args.name!r} in {args.state_dir}; "
                         "pass --gin_file/--workdir as for the first launch")
    old = parser.parse_args(normalize_argv(saved))
    for key in ("gin_file", "gin", "workdir", "run_name", "env"):
        setattr(args, key, getattr(old, key))


def validate(args) -> None:
    """Checks the run flags; raises ValueError naming the bad one."""
    common.check_name("--name", args.name)
    if not args.gin_file:
        raise ValueError("--gin_file is required (e.g. --gin_file=configs/base.gin)")
    for f in args.gin_file:
        if not f.strip():
            raise ValueError(f"--gin_file={f!r} is empty; give a gin file path or config name")
        if not any(c.is_file() for c in (common.REPO_ROOT / f, common.REPO_ROOT / "configs" / f,
                                         common.REPO_ROOT / "configs" / f"{f}.gin")):
            common.note(f"warning: --gin_file={f} not found in {common.REPO_ROOT}; it must exist "
                        "in the workers' checkout")
    args.gin = [g[len("--gin."):] if g.startswith("--gin.") else g for g in args.gin]
    for g in args.gin:
        if "=" not in g or not g.split("=", 1)[0].strip():
            raise ValueError(f"--gin={g!r} is not a binding; expected A.b=VALUE")
    for e in args.env:
        if "=" not in e or not e.split("=", 1)[0].isidentifier():
            raise ValueError(f"--env={e!r} is not KEY=VALUE")
    if not args.workdir or not args.workdir.strip():
        raise ValueError("--workdir is required (gs://BUCKET/PATH, or a path on each worker)")
    if args.run_name is None:
        args.run_name = args.workdir.rstrip("/").rsplit("/", 1)[-1]
    common.check_name("--run_name", args.run_name)
    if args.max_restarts < 0 or args.poll_seconds <= 0:
        raise ValueError("--max_restarts must be >= 0 and --poll_seconds > 0")
    if not args.workdir.startswith("gs://"):
        common.note("warning: --workdir is not gs://: on a pod every worker writes its own "
                    "local disk, and a preempted VM loses its checkpoints")


def train_command(args) -> list[str]:
    """The `sparsejax train ...` command that every worker runs."""
    return (["sparsejax", "train"] + [f"--gin_file={f}" for f in args.gin_file]
            + [f"--gin.{g}" for g in args.gin] + [f"--workdir={args.workdir}"])


def _kill_script(p: dict[str, str]) -> str:
    """Remote bash: stop the run's process group if alive and wait (up to 60 s) until it is gone."""
    return (f'if {common.alive_test(p["pid"])}; then '
            f'kill -TERM -- -"$(cat "{p["pid"]}")" 2>/dev/null || kill "$(cat "{p["pid"]}")"; '
            f'for i in $(seq 300); do {common.alive_test(p["pid"])} || break; '
            f'sleep 0.2; done; fi')


def remote_launch_script(args, resume: bool) -> str:
    """Remote bash that starts the training command detached, with log, pid and exit files."""
    p = common.remote_paths(args.run_name)
    exports = "".join(f"export {shlex.quote(e)}; " for e in args.env)
    inner = (f'{exports}{shlex.join(train_command(args))}; echo $? > "{p["exit"]}"')
    if resume:
        guard = _kill_script(p) + "; "
    else:
        guard = (f'if [ ! -f "{p["exit"]}" ] && {common.alive_test(p["pid"])}; then '
                 f'echo "run {args.run_name} is already running on $(hostname); use --resume or '
                 f'--stop" >&2; exit 1; fi; ')
    # `;` (not `&&`) before setsid: `&` backgrounds only the training process, so `$!` is its
    # pid (= its process group, thanks to setsid) and an early `exit 1` stops the script.
    return (f'mkdir -p "$HOME/{common.REMOTE_LOG_DIR}" && cd "$HOME/{common.REMOTE_REPO}" '
            f'|| exit 1; export PATH="$HOME/.local/bin:$PATH"; {guard}rm -f "{p["exit"]}"; '
            f'echo "=== {"resume" if resume else "launch"} $(date -u +%FT%TZ) on $(hostname)" '
            f'>> "{p["log"]}"; setsid nohup bash -c {shlex.quote(inner)} >> "{p["log"]}" 2>&1 '
            f'< /dev/null & echo $! > "{p["pid"]}"')


def decide(state: str, statuses: list[tuple[str, str]]) -> str:
    """What the restart loop does next: 'wait', 'done', 'relaunch' or 'recreate'."""
    if state in common.DEAD_STATES:
        return "recreate"
    if state != "READY" or not statuses:
        return "wait"  # CREATING, REPAIRING, ... or ssh failed: look again later
    kinds = [s for _, s in statuses]
    if all(k == "finished 0" for k in kinds):
        return "done"
    if all(k == "running" for k in kinds):
        return "wait"
    return "relaunch"  # a worker died, crashed or never started: every worker restarts


def _recreate(args, runner: common.Runner) -> None:
    """Deletes the preempted TPU and re-creates + sets it up with the remembered flags."""
    from tpu import create, setup, teardown
    saved = common.load_state(args.state_dir, args.name)
    if "create" not in saved or "setup" not in saved:
        raise RuntimeError(f"TPU {args.name} was preempted but its create/setup flags are not "
                           f"remembered in {args.state_dir}; re-create it by hand")
    queued = "--queued" in saved["create"]
    runner.run(teardown.delete_command(args, queued), check=False)
    for mod, argv in ((create, saved["create"]), (setup, saved["setup"] + ["--wait"])):
        if queued and mod is setup:
            argv = argv + ["--queued"]
        if mod.run(argv) != 0:
            raise RuntimeError(f"{mod.__name__} failed while re-creating {args.name}")


def restart_loop(args, runner: common.Runner) -> int:
    """Polls the TPU and the run; relaunches or re-creates until done or out of restarts."""
    status_cmd = common.ssh(args, common.status_script(args.run_name))
    if runner.dry_run:
        runner.run(common.describe_state(args, False))
        runner.run(status_cmd)
        return 0
    restarts = 0
    while True:
        time.sleep(args.poll_seconds)
        state = common.tpu_state(args, runner)
        statuses = []
        if state == "READY":
            statuses = common.parse_status(runner.run(status_cmd, capture=True, check=False))
        action = decide(state, statuses)
        common.note(f"{time.strftime('%FT%T')} {args.name}: {state} {statuses} -> {action}")
        if action == "done":
            return 0
        if action == "wait":
            continue
        restarts += 1
        if restarts > args.max_restarts:
            raise RuntimeError(f"gave up after {args.max_restarts} restarts")
        if action == "recreate":
            _recreate(args, runner)
        runner.run(common.ssh(args, remote_launch_script(args, resume=True)))


def run(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(normalize_argv(argv))
    runner = common.Runner(args.dry_run)
    if args.stop:
        if args.run_name is None:
            _fill_from_saved(args, parser)
            args.run_name = args.run_name or (args.workdir or "").rstrip("/").rsplit("/", 1)[-1]
        runner.run(common.ssh(args, _kill_script(common.remote_paths(args.run_name))))
        return 0
    if args.resume or args.restart_on_preemption:
        _fill_from_saved(args, parser)
    validate(args)
    runner.run(common.ssh(args, remote_launch_script(args, resume=args.resume)))
    if not args.dry_run and not args.resume:
        common.save_state(args.state_dir, args.name, "launch", argv)
    if args.restart_on_preemption:
        return restart_loop(args, runner)
    if not args.dry_run:
        common.note(f"launched {args.run_name}. Logs: python tpu/logs.py --name {args.name} "
                    f"--zone {args.zone}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.cli_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
