"""Runs a sweep: one `python -m sparsejax.cli train` subprocess per trial, at most `parallel`
at a time, resumable.

Layout of the output dir::

    OUT/sweep.json                  the spec (a rerun with a different spec is refused)
    OUT/trials/<name>/train.log     the trial's stdout+stderr (appended on every launch)
    OUT/trials/<name>/result.json   done marker + summary, written after a clean 'done' exit
    OUT/trials/<name>/lock          flock held by the trial process while it runs
    OUT/results.csv, results.md, *.png   table and plots (sparsejax.sweep.report)

A trial with result.json is skipped; any other trial is (re)launched and resumes from its
latest checkpoint. The flock is inherited by the trial process, so a trial left running by a
runner killed with SIGKILL alone is never launched twice (the new runner waits for it, then
relaunches it, which resumes from its last checkpoint and writes the marker). SIGTERM/SIGINT to
the runner are passed on to the running trials, which checkpoint and exit.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import IO, Sequence

import gin

from sparsejax.config import parse_gin
from sparsejax.sweep.grid import SweepSpec, Trial, spec_diff
from sparsejax.sweep.summary import RESULT_FILE, summarize_trial
from sparsejax.train.trainer import unused_bindings_of_config

SPEC_FILE = "sweep.json"
LOG_FILE = "train.log"
LOCK_FILE = "lock"
_DEVICE_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S+")


def trial_dir(out: str, trial: Trial) -> str:
    return os.path.join(out, "trials", trial.name)


def trial_command(spec: SweepSpec, trial: Trial, workdir: str,
                  python: Sequence[str] = ("python",)) -> list[str]:
    """The `sparsejax.cli train` command line of one trial."""
    return [*python, "-m", "sparsejax.cli", "train",
            *(f"--gin_file={f}" for f in (*spec.gin_files, *trial.gin_files())),
            *(f"--gin.{b}" for b in spec.overrides),
            *(f"--gin.{b}" for b in trial.bindings()),
            f"--workdir={workdir}", "--quiet",
            # a binding shared by the grid may concern some trials only (validate_spec checks
            # that each one takes effect in at least one grid point)
            "--allow_unused_bindings"]


def dry_run_lines(spec: SweepSpec, out: str) -> list[str]:
    """One shell-quoted launch command per trial (for a cluster scheduler or tpu/ scripts)."""
    return [shlex.join(trial_command(spec, t, trial_dir(out, t))) for t in spec.trials()]


def validate_spec(spec: SweepSpec) -> None:
    """Parses the gin files with every grid point's bindings and builds each point's run (as
    each trial will, without compiling), so an unknown configurable/parameter, a bad value,
    or a binding that takes effect in no grid point fails before anything is launched."""

    unused_everywhere = None
    try:
        for trial in spec.trials()[::len(spec.seeds)]:  # one per grid point
            parse_gin([*spec.gin_files, *trial.gin_files()],
                      list(spec.overrides) + trial.bindings())
            unused = unused_bindings_of_config()
            unused_everywhere = (unused if unused_everywhere is None else
                                 {k: v for k, v in unused_everywhere.items() if k in unused})
    finally:
        gin.clear_config()
    if unused_everywhere:
        raise ValueError(f"these bindings take effect in no grid point of the sweep: "
                         f"{sorted(unused_everywhere)}; remove them or fix their names")


def prepare_out_dir(spec: SweepSpec, out: str) -> None:
    """Creates OUT and stores the spec, or checks that OUT holds this very sweep. A sweep
    that only adds seeds to the stored one is accepted (the stored spec is updated, finished
    trials are kept)."""
    path = os.path.join(out, SPEC_FILE)
    if os.path.exists(path):
        with open(path) as f:
            old = SweepSpec.from_json(json.load(f))
        diff = spec_diff(old, spec)
        if diff and dataclasses.replace(old, seeds=spec.seeds) == spec and set(
                old.seeds) <= set(spec.seeds):
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(spec.to_json(), f, indent=1)
            os.replace(tmp, path)
            return
        if diff:
            raise ValueError(f"--out={out!r} holds a different sweep ({diff}); use a new --out "
                             "or the same flags/grid file")
        return
    if os.path.isdir(os.path.join(out, "trials")) and os.listdir(os.path.join(out, "trials")):
        raise ValueError(f"--out={out!r} holds trials but no {SPEC_FILE}; use a new --out")
    os.makedirs(os.path.join(out, "trials"), exist_ok=True)
    with open(path, "w") as f:
        json.dump(spec.to_json(), f, indent=1)


def load_spec(out: str) -> SweepSpec:
    path = os.path.join(out, SPEC_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"--out={out!r} holds no sweep ({SPEC_FILE} missing)")
    with open(path) as f:
        return SweepSpec.from_json(json.load(f))


def is_finished(out: str, trial: Trial) -> bool:
    return os.path.isfile(os.path.join(trial_dir(out, trial), RESULT_FILE))


def _child_env(cpu_devices: int | None) -> dict[str, str]:
    env = dict(os.environ)
    if cpu_devices is not None:  # only affects the host (CPU) platform
        flags = _DEVICE_FLAG.sub("", env.get("XLA_FLAGS", "")).strip()
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={cpu_devices}".strip()
    return env


@dataclasses.dataclass
class _Running:
    trial: Trial
    proc: subprocess.Popen
    log_offset: int
    started: float


def _final_status(log_path: str, offset: int) -> str | None:
    """The `status` of the last JSON line the trial printed after `offset` in its log."""
    with open(log_path, errors="replace") as f:
        f.seek(offset)
        lines = f.read().splitlines()
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{") and '"status"' in line:
            try:
                return json.loads(line).get("status")
            except json.JSONDecodeError:
                continue
    return None


class SweepRunner:
    """Launches pending trials with bounded parallelism and records finished ones."""

    def __init__(self, spec: SweepSpec, out: str, *, parallel: int = 1,
                 cpu_devices: int | None = 1, stream: IO[str] | None = None,
                 poll_s: float = 0.2):
        if parallel < 1:
            raise ValueError(f"parallel={parallel} must be >= 1")
        if cpu_devices is not None and cpu_devices < 1:
            raise ValueError(f"cpu_devices={cpu_devices} must be >= 1 (or None to inherit)")
        self.spec, self.out, self.parallel = spec, os.path.abspath(out), parallel
        self.env = _child_env(cpu_devices)
        self.stream = stream or sys.stdout
        self.poll_s = poll_s
        self.trials = spec.trials()
        self.failed: list[str] = []
        self.stopped = False

    def _print(self, msg: str) -> None:
        print(msg, file=self.stream, flush=True)

    def _done_count(self) -> int:
        return sum(is_finished(self.out, t) for t in self.trials)

    def _launch(self, trial: Trial) -> _Running | str | None:
        """Starts the trial; returns None if another process still runs it, and "finished"
        if it finished meanwhile (under another runner, which may not have written its
        result.json yet: then it is written here, without the wall time)."""
        wd = trial_dir(self.out, trial)
        os.makedirs(wd, exist_ok=True)
        lock_fd = os.open(os.path.join(wd, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock_fd)
            return None
        if is_finished(self.out, trial) or self._done_in_log(trial, wd):
            os.close(lock_fd)
            return "finished"
        try:
            cmd = trial_command(self.spec, trial, wd, python=(sys.executable,))
            log_path = os.path.join(wd, LOG_FILE)
            with open(log_path, "a") as log:
                log.write(f"# sweep launch {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                          f"{shlex.join(cmd)}\n")
                log.flush()
                offset = log.tell()
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=self.env,
                                        pass_fds=(lock_fd,))
        finally:
            os.close(lock_fd)  # the child keeps the lock through its inherited descriptor
        return _Running(trial, proc, offset, time.time())

    def _done_in_log(self, trial: Trial, wd: str) -> bool:
        """Whether the trial's last launch printed status 'done' (its runner exits the lock
        before it writes result.json); if so, the result is written here."""
        log_path = os.path.join(wd, LOG_FILE)
        if not os.path.isfile(log_path):
            return False
        with open(log_path, errors="replace") as f:
            text = f.read()
        start = text.rfind("# sweep launch ")
        if start < 0 or _final_status(log_path, len(text[:start].encode())) != "done":
            return False
        self._write_result(trial, wd, None)
        return True

    def _write_result(self, trial: Trial, wd: str, elapsed: float | None) -> dict:
        result = {"trial": trial.name, "point": dict(trial.point), "seed": trial.seed,
                  "status": "done", "finished_at": time.time(), "wall_s": elapsed,
                  **summarize_trial(wd)}
        tmp = os.path.join(wd, RESULT_FILE + f".tmp{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, os.path.join(wd, RESULT_FILE))
        return result

    def _finish(self, r: _Running) -> None:
        rc = r.proc.returncode
        wd = trial_dir(self.out, r.trial)
        status = _final_status(os.path.join(wd, LOG_FILE), r.log_offset)
        elapsed = time.time() - r.started
        if rc == 0 and status == "done":
            result = self._write_result(r.trial, wd, elapsed)
            loss, err = result["final_eval_loss"], result["final_eval_loss_stderr"]
            shown = "n/a" if loss is None else f"{loss:.4f}" + ("" if err is None else f" ± {err:.4f}")
            self._print(f"[{self._done_count()}/{len(self.trials)}] done {r.trial.name} "
                        f"({elapsed:.1f} s, final eval loss {shown})")
        elif rc == 0 and status == "preempted":
            self._print(f"preempted {r.trial.name}; it resumes on the next run")
        else:
            self.failed.append(r.trial.name)
            self._print(f"FAILED {r.trial.name} (exit code {rc}); see "
                        f"{os.path.join(wd, LOG_FILE)}")

    def _request_stop(self, signum, frame) -> None:
        self.stopped = True

    def run(self) -> int:
        """Runs every unfinished trial. Returns the number of failed trials."""
        pending = [t for t in self.trials if not is_finished(self.out, t)]
        self._print(f"sweep {self.out}: {len(self.trials)} trials, "
                    f"{len(self.trials) - len(pending)} already finished, "
                    f"{len(pending)} to run, {self.parallel} at a time")
        running: list[_Running] = []
        old = {}
        if hasattr(signal, "SIGTERM"):
            try:
                for s in (signal.SIGTERM, signal.SIGINT):
                    old[s] = signal.signal(s, self._request_stop)
            except ValueError:  # not the main thread: no handlers
                old = {}
        try:
            waiting_on_lock: set[str] = set()
            while (pending or running) and not self.stopped:
                launched = False
                for t in list(pending):
                    if len(running) >= self.parallel:
                        break
                    r = self._launch(t)
                    pending.remove(t)
                    if r == "finished":
                        self._print(f"finished elsewhere: {t.name}")
                        continue
                    if r is None:  # held by a trial left running by an earlier runner
                        if t.name not in waiting_on_lock:
                            self._print(f"waiting: {t.name} is still running elsewhere")
                            waiting_on_lock.add(t.name)
                        pending.append(t)
                        continue
                    self._print(f"start {t.name}")
                    running.append(r)
                    launched = True
                for r in list(running):
                    if r.proc.poll() is not None:
                        running.remove(r)
                        self._finish(r)
                if not launched:
                    time.sleep(self.poll_s)
        finally:
            if running:  # stopped (SIGTERM/SIGINT) or crashed: trials checkpoint and exit
                for r in running:
                    r.proc.send_signal(signal.SIGTERM)
                for r in running:
                    r.proc.wait()
                    self._finish(r)
            for s, h in old.items():
                signal.signal(s, h)
        self._print(f"{self._done_count()}/{len(self.trials)} trials finished"
                    + (f"; failed: {', '.join(self.failed)}" if self.failed else ""))
        return len(self.failed)


def run_sweep(spec: SweepSpec, out: str, *, parallel: int = 1,
              cpu_devices: int | None = 1) -> SweepRunner:
    """Checks the runner settings, claims OUT for this sweep (or checks it already holds it)
    and runs every unfinished trial. The runner's `failed` and `stopped` tell how it ended."""
    sweep = SweepRunner(spec, out, parallel=parallel, cpu_devices=cpu_devices)
    prepare_out_dir(spec, out)
    sweep.run()
    return sweep
