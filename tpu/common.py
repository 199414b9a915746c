"""Shared helpers for the tpu/ scripts: flags, gcloud command builders, running or printing commands.

Stdlib only, so the scripts run from a laptop without the project's dependencies installed.
With `--dry_run` every command is printed to stdout (one per line, `shlex.join`-quoted) and
nothing runs; notes and warnings always go to stderr so dry-run output is exactly the commands.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
REMOTE_REPO = "sparsejax"  # checkout location on every worker, relative to $HOME
REMOTE_LOG_DIR = "sparsejax_logs"  # logs, pid and exit-code files, relative to $HOME
DEFAULT_STATE_DIR = Path(os.environ.get("SPARSEJAX_TPU_STATE_DIR",
                                        Path.home() / ".config" / "sparsejax" / "tpu"))

# Accelerator generations and the runtime image that suits each one.
DEFAULT_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5p": "v2-alpha-tpuv5",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v6e": "v2-alpha-tpuv6e",
}
# v2/v3/v4/v5p sizes count TensorCores (8 per host); v5litepod/v6e sizes count chips.
_CORE_COUNTED = ("v2", "v3", "v4", "v5p")
_CHIP_SIZES = (1, 4, 8, 16, 32, 64, 128, 256)
_ACCEL_RE = re.compile(r"^(v2|v3|v4|v5p|v5litepod|v6e)-([1-9][0-9]*)$")
_SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# TPU node states: READY runs; these need a delete + re-create; anything else is transitional.
DEAD_STATES = ("PREEMPTED", "TERMINATED", "STOPPED", "SUSPENDED", "FAILED", "NOT_FOUND")


def parse_accelerator_type(accel: str) -> tuple[str, int]:
    """Splits e.g. 'v4-32' into ('v4', 32); raises ValueError naming the bad value otherwise."""
    m = _ACCEL_RE.match(accel or "")
    valid = "GENERATION-SIZE with GENERATION in " + ", ".join(DEFAULT_VERSIONS)
    if not m:
        raise ValueError(f"--accelerator_type={accel!r} is not a TPU accelerator type; expected "
                         f"{valid} (e.g. v4-8, v4-32, v5litepod-16, v5p-8, v6e-8)")
    gen, size = m.group(1), int(m.group(2))
    if gen in _CORE_COUNTED and size % 8:
        raise ValueError(f"--accelerator_type={accel!r}: {gen} sizes count TensorCores and must "
                         "be a multiple of 8 (e.g. {gen}-8, {gen}-32)".replace("{gen}", gen))
    if gen not in _CORE_COUNTED and size not in _CHIP_SIZES:
        raise ValueError(f"--accelerator_type={accel!r}: {gen} sizes count chips and must be one "
                         f"of {_CHIP_SIZES}")
    return gen, size


def num_hosts(accel: str) -> int:
    """Number of TPU VM workers (hosts) of a slice, e.g. v4-32 -> 4, v5litepod-16 -> 4, v6e-8 -> 1."""
    gen, size = parse_accelerator_type(accel)
    if gen in _CORE_COUNTED:
        return size // 8
    return 1 if size <= 8 else size // 4


def check_name(flag: str, value: str) -> str:
    """A name used in remote file paths: letters, digits, '.', '_' and '-' only."""
    if not value or not _SAFE_NAME_RE.match(value):
        raise ValueError(f"{flag}={value!r} is not valid: use letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return value


# ----------------------------------------------------------------------------- flags

def base_parser(description: str | None) -> argparse.ArgumentParser:
    """A parser with the flags every script shares: --name, --zone, --project, --dry_run."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", "--tpu", dest="name", required=True,
                   help="TPU VM / pod slice name (also the queued-resource id with --queued)")
    p.add_argument("--zone", required=True, help="GCP zone, e.g. us-central2-b")
    p.add_argument("--project", default=None, help="GCP project (default: gcloud's configured one)")
    p.add_argument("--dry_run", "--dry-run", dest="dry_run", action="store_true",
                   help="print the commands (one per line) and run nothing")
    p.add_argument("--state_dir", type=Path, default=DEFAULT_STATE_DIR,
                   help="local folder remembering create/setup/launch flags per TPU, used by "
                        "--resume and --restart_on_preemption (default: %(default)s)")
    return p


def cli_main(run: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None) -> int:
    """Runs a script body, turning ValueError into 'error: ...' on stderr and exit code 2."""
    try:
        return run(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        print(f"error: command failed with exit code {e.returncode}: {shlex.join(e.cmd)}",
              file=sys.stderr)
        return e.returncode or 1
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except FileNotFoundError as e:  # gcloud (or tar) is not installed / not on PATH
        print(f"error: {e.filename or e} not found; install the Google Cloud SDK", file=sys.stderr)
        return 1


# ----------------------------------------------------------------------------- commands

def gcloud_tpu(args: argparse.Namespace, *sub: str) -> list[str]:
    """`gcloud compute tpus SUB... --zone Z [--project P]`."""
    cmd = ["gcloud", "compute", "tpus", *sub, "--zone", args.zone]
    if args.project:
        cmd += ["--project", args.project]
    return cmd


def ssh(args: argparse.Namespace, remote_command: str, worker: str = "all") -> list[str]:
    """Runs a bash command line on the given worker(s) of the TPU (`all` = every host of a pod)."""
    return gcloud_tpu(args, "tpu-vm", "ssh", args.name) + [f"--worker={worker}",
                                                            "--command", remote_command]


def describe_state(args: argparse.Namespace, queued: bool) -> list[str]:
    """Prints only the state (READY, PREEMPTED, ... / ACTIVE, SUSPENDED, ... for queued)."""
    if queued:
        return gcloud_tpu(args, "queued-resources", "describe", args.name) + [
            "--format=value(state.state)"]
    return gcloud_tpu(args, "tpu-vm", "describe", args.name) + ["--format=value(state)"]


def remote_paths(run_name: str) -> dict[str, str]:
    """Log, pid and exit-code files of a run on each worker (double-quote safe: $HOME expands)."""
    base = f"$HOME/{REMOTE_LOG_DIR}/{check_name('--run_name', run_name)}"
    return {"log": f"{base}.log", "pid": f"{base}.pid", "exit": f"{base}.exit"}


def alive_test(pid_file: str) -> str:
    """Remote bash test: the pid in pid_file is a live process (a zombie awaiting reaping is not)."""
    return (f'[ -f "{pid_file}" ] && kill -0 "$(cat "{pid_file}")" 2>/dev/null && '
            f'! grep -qs "^State:.*Z" "/proc/$(cat "{pid_file}")/status"')


def status_script(run_name: str) -> str:
    """Remote bash that prints one `SPARSEJAX_STATUS <host> running|finished CODE|dead|absent`."""
    p = remote_paths(run_name)
    return (f'h=$(hostname); if [ -f "{p["exit"]}" ]; then '
            f'echo "SPARSEJAX_STATUS $h finished $(cat "{p["exit"]}")"; '
            f'elif {alive_test(p["pid"])}; then '
            f'echo "SPARSEJAX_STATUS $h running"; '
            f'elif [ -f "{p["pid"]}" ]; then echo "SPARSEJAX_STATUS $h dead"; '
            f'else echo "SPARSEJAX_STATUS $h absent"; fi')


def parse_status(output: str) -> list[tuple[str, str]]:
    """(host, status) pairs from the output of `status_script` on one or many workers."""
    out = []
    for line in output.splitlines():
        parts = line.split("SPARSEJAX_STATUS ", 1)
        if len(parts) == 2:
            host, _, status = parts[1].strip().partition(" ")
            out.append((host, status.strip()))
    return out


class Runner:
    """Runs commands, or with dry_run prints them (stdout, one per line) and runs nothing."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run
        self.commands: list[list[str]] = []

    def run(self, cmd: Sequence[str], capture: bool = False, check: bool = True) -> str:
        """Runs `cmd`; returns its stdout when capture (else ''). Dry run: prints, returns ''."""
        cmd = list(cmd)
        self.commands.append(cmd)
        if self.dry_run:
            print(shlex.join(cmd), flush=True)
            return ""
        print(f"+ {shlex.join(cmd)}", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, check=check, text=True,
                              stdout=subprocess.PIPE if capture else None)
        return (proc.stdout or "") if capture else ""


def note(msg: str) -> None:
    """A message for the user (stderr, so dry-run stdout stays exactly the commands)."""
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- state

def state_file(state_dir: Path, name: str) -> Path:
    return Path(state_dir) / f"{check_name('--name', name)}.json"


def load_state(state_dir: Path, name: str) -> dict:
    """Remembered flags per step ('create', 'setup', 'launch') for a TPU; {} if none."""
    f = state_file(state_dir, name)
    return json.loads(f.read_text()) if f.is_file() else {}


def save_state(state_dir: Path, name: str, step: str, argv: Sequence[str]) -> None:
    """Remembers the flags a step ran with (without --dry_run), for --resume and restarts."""
    f = state_file(state_dir, name)
    state = load_state(state_dir, name)
    state[step] = [a for a in argv if a not in ("--dry_run", "--dry-run")]
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(state, indent=1))


# ----------------------------------------------------------------------------- waiting

def tpu_state(args: argparse.Namespace, runner: Runner, queued: bool = False) -> str:
    """Current node state (or queued-resource state with queued); NOT_FOUND if describe fails."""
    out = runner.run(describe_state(args, queued), capture=True, check=False)
    return out.strip().splitlines()[-1].strip() if out.strip() else "NOT_FOUND"


def wait_ready(args: argparse.Namespace, runner: Runner, queued: bool, poll_s: float = 30.0,
               timeout_s: float = 6 * 3600.0) -> None:
    """Polls until the node is READY; raises RuntimeError if it (or its queued resource) dies.
    Dry run: prints the poll command once and returns."""
    import time
    deadline = time.monotonic() + timeout_s
    while True:
        state = tpu_state(args, runner)
        if runner.dry_run or state == "READY":
            return
        if queued:
            qstate = tpu_state(args, runner, queued=True)
            if qstate in ("FAILED", "SUSPENDED", "NOT_FOUND"):
                raise RuntimeError(f"queued resource {args.name} is {qstate}")
        elif state in DEAD_STATES and state != "NOT_FOUND":
            raise RuntimeError(f"TPU {args.name} is {state}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"TPU {args.name} not READY after {timeout_s:.0f}s (state {state})")
        note(f"{args.name}: {state}; waiting {poll_s:.0f}s")
        time.sleep(poll_s)
