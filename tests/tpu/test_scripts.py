"""tpu/ scripts: --help, exact --dry_run commands, bad-input errors, the remote bash they send
(run here with bash under a fake $HOME and a fake `sparsejax`), and the preemption-restart loop."""
from __future__ import annotations

import shlex
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from tpu import common, create, launch, logs, monitor, setup, teardown  # noqa: E402

SCRIPTS = ("create", "setup", "launch", "logs", "monitor", "teardown")
Z = ["--name", "my-pod", "--zone", "us-central2-b"]


def dry(mod, argv, capsys, tmp_path) -> list[list[str]]:
    """Runs a script's main with --dry_run; returns the printed commands, split back by shlex."""
    rc = mod.main([*argv, "--dry_run", "--state_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    return [shlex.split(line) for line in out.splitlines()]


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_runs_as_script(name):
    proc = subprocess.run([sys.executable, str(REPO / "tpu" / f"{name}.py"), "--help"],
                          capture_output=True, text=True, cwd="/", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--dry_run" in proc.stdout and "--zone" in proc.stdout


def test_create_dry_run_as_script_exact():
    proc = subprocess.run([sys.executable, "tpu/create.py", *Z, "--accelerator_type", "v4-32",
                           "--spot", "--dry_run"], capture_output=True, text=True, cwd=REPO,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ("gcloud compute tpus tpu-vm create my-pod --zone us-central2-b "
                           "--accelerator-type v4-32 --version tpu-ubuntu2204-base --spot\n")


def test_create_variants(capsys, tmp_path):
    [cmd] = dry(create, [*Z, "--accelerator_type", "v6e-8", "--preemptible", "--project", "p1",
                         "--version", "v2-alpha-tpuv6e"], capsys, tmp_path)
    assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-pod", "--zone",
                   "us-central2-b", "--project", "p1", "--accelerator-type", "v6e-8",
                   "--version", "v2-alpha-tpuv6e", "--preemptible"]
    [cmd] = dry(create, [*Z, "--accelerator_type", "v5litepod-16", "--queued", "--spot",
                         "--valid_until_duration", "6h"], capsys, tmp_path)
    assert cmd == ["gcloud", "compute", "tpus", "queued-resources", "create", "my-pod", "--zone",
                   "us-central2-b", "--node-id", "my-pod", "--accelerator-type", "v5litepod-16",
                   "--runtime-version", "v2-alpha-tpuv5-lite", "--valid-until-duration", "6h",
                   "--spot"]
    [cmd] = dry(create, [*Z, "--accelerator_type", "v5p-8"], capsys, tmp_path)
    assert "--spot" not in cmd and cmd[cmd.index("--version") + 1] == "v2-alpha-tpuv5"
    assert not (tmp_path / "my-pod.json").exists()  # a dry run remembers nothing


@pytest.mark.parametrize("argv, needle", [
    (["--name", "p", "--accelerator_type", "v4-8"], "--zone"),
    (["--name", "p", "--zone", "z"], "--accelerator_type"),
])
def test_create_missing_flag_is_argparse_error(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        create.main([*argv, "--dry_run"])
    assert e.value.code == 2 and needle in capsys.readouterr().err


@pytest.mark.parametrize("accel", ["v4", "v4-30", "tpu-8", "v9-8", "v5litepod-12", "v6e-0", "",
                                   "V4-8"])
def test_create_bad_accelerator_type(accel, capsys):
    assert create.main(["--name", "p", "--zone", "z", "--accelerator_type", accel,
                        "--dry_run"]) == 2
    err = capsys.readouterr()
    assert f"--accelerator_type={accel!r}" in err.err and err.out == ""


def test_create_queued_with_preemptible_is_error(capsys):
    assert create.main([*Z, "--accelerator_type", "v4-8", "--queued", "--preemptible",
                        "--dry_run"]) == 2
    assert "--preemptible" in capsys.readouterr().err


@pytest.mark.parametrize("accel, hosts", [("v4-8", 1), ("v4-32", 4), ("v5p-128", 16),
                                          ("v5litepod-8", 1), ("v5litepod-16", 4),
                                          ("v6e-256", 64), ("v3-32", 4)])
def test_num_hosts(accel, hosts):
    assert common.num_hosts(accel) == hosts


def test_setup_copy_and_clone(capsys, tmp_path):
    cmds = dry(setup, Z, capsys, tmp_path)
    assert [c[:5] for c in cmds[1:]] == [["gcloud", "compute", "tpus", "tpu-vm", "scp"]] + [
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]] * 2
    tar, scp, unpack, install = cmds
    assert tar[:3] == ["tar", "-czf", scp[5]] and tar[-3:] == ["-C", str(REPO), "."]
    assert "--exclude=.venv" in tar and "--exclude=.git" in tar
    assert scp[6] == "my-pod:sparsejax-src.tgz" and "--worker=all" in scp
    assert all("--worker=all" in c for c in (unpack, install))
    assert install[-1].endswith("python3 -m pip install -e '.[tpu]'")
    cmds = dry(setup, [*Z, "--repo_url", "https://example.com/sj.git", "--branch", "dev",
                       "--extras", "tpu,test"], capsys, tmp_path)
    assert len(cmds) == 2
    assert cmds[0][-1] == ('rm -rf "$HOME/sparsejax" && git clone --depth 1 --branch dev '
                           'https://example.com/sj.git "$HOME/sparsejax"')
    assert cmds[1][-1].endswith("pip install -e '.[tpu,test]'")
    assert setup.main([*Z, "--source", str(tmp_path), "--dry_run"]) == 2
    assert "--source" in capsys.readouterr().err


def test_setup_wait_polls_first(capsys, tmp_path):
    cmds = dry(setup, [*Z, "--wait", "--repo_url", "u"], capsys, tmp_path)
    assert cmds[0][3:5] == ["tpu-vm", "describe"] and cmds[0][-1] == "--format=value(state)"


LAUNCH = [*Z, "--gin_file", "configs/base.gin", "--gin_file", "moe/base.gin",
          "--gin", "TrainConfig.num_steps=100", "--gin.Optim.lr=3e-4",
          "--workdir", "gs://bucket/runs/moe-r1"]
TRAIN = ("sparsejax train --gin_file=configs/base.gin --gin_file=moe/base.gin "
         "--gin.TrainConfig.num_steps=100 --gin.Optim.lr=3e-4 --workdir=gs://bucket/runs/moe-r1")


def test_launch_same_command_on_all_workers(capsys, tmp_path):
    [cmd] = dry(launch, LAUNCH, capsys, tmp_path)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod"]
    assert "--worker=all" in cmd and cmd[cmd.index("--command") + 1] == cmd[-1]
    remote = cmd[-1]
    assert shlex.quote(f'{TRAIN}; echo $? > "$HOME/sparsejax_logs/moe-r1.exit"') in remote
    assert "setsid nohup bash -c" in remote and '>> "$HOME/sparsejax_logs/moe-r1.log"' in remote
    assert remote.endswith('& echo $! > "$HOME/sparsejax_logs/moe-r1.pid"')
    assert "already running" in remote  # a fresh launch refuses to start a second copy


@pytest.mark.parametrize("argv, needle", [
    (["--gin_file=", "--workdir", "gs://b/r"], "--gin_file=''"),
    (["--workdir", "gs://b/r"], "--gin_file is required"),
    (["--gin_file", "base.gin"], "--workdir"),
    (["--gin_file", "base.gin", "--workdir", "gs://b/r", "--gin", "novalue"], "--gin='novalue'"),
    (["--gin_file", "base.gin", "--workdir", "gs://b/r", "--run_name", "a b"], "--run_name"),
    (["--gin_file", "base.gin", "--workdir", "gs://b/r", "--env", "1X=2"], "--env"),
])
def test_launch_bad_input(argv, needle, capsys, tmp_path):
    assert launch.main([*Z, *argv, "--dry_run", "--state_dir", str(tmp_path)]) == 2
    out = capsys.readouterr()
    assert needle in out.err and out.out == ""


def test_launch_resume_reuses_remembered_command(capsys, tmp_path):
    assert launch.main([*Z, "--resume", "--dry_run", "--state_dir", str(tmp_path)]) == 2
    assert "no remembered launch" in capsys.readouterr().err
    common.save_state(tmp_path, "my-pod", "launch", LAUNCH)
    [cmd] = dry(launch, [*Z, "--resume"], capsys, tmp_path)
    assert "--worker=all" in cmd and shlex.quote(
        f'{TRAIN}; echo $? > "$HOME/sparsejax_logs/moe-r1.exit"') in cmd[-1]
    assert "already running" not in cmd[-1] and "kill -TERM" in cmd[-1]
    [stop] = dry(launch, [*Z, "--stop"], capsys, tmp_path)
    assert "--worker=all" in stop and 'kill -TERM -- -"$(cat "$HOME/sparsejax_logs/moe-r1.pid")"' \
        in stop[-1]
    logs_cmd = dry(logs, Z, capsys, tmp_path)  # logs finds the run name from the launch, too
    assert logs_cmd == [common.ssh(
        launch.build_parser().parse_args(Z), 'tail -n 100 -F "$HOME/sparsejax_logs/moe-r1.log"',
        worker="0")]


def test_launch_restart_dry_run_prints_poll_commands(capsys, tmp_path):
    cmds = dry(launch, [*LAUNCH, "--restart_on_preemption"], capsys, tmp_path)
    assert len(cmds) == 3 and cmds[1][3:5] == ["tpu-vm", "describe"]
    assert "SPARSEJAX_STATUS" in cmds[2][-1] and "--worker=all" in cmds[2]


def test_logs_monitor_teardown(capsys, tmp_path):
    [cmd] = dry(logs, [*Z, "--run_name", "r1", "--worker", "all", "--lines", "5", "--no_follow"],
                capsys, tmp_path)
    assert "--worker=all" in cmd and cmd[-1] == 'tail -n 5 "$HOME/sparsejax_logs/r1.log"'
    assert logs.main([*Z, "--run_name", "r1", "--worker", "x", "--dry_run"]) == 2
    assert "--worker='x'" in capsys.readouterr().err
    cmds = dry(monitor, [*Z, "--queued", "--run_name", "r1"], capsys, tmp_path)
    assert [c[3:5] for c in cmds] == [["queued-resources", "describe"], ["tpu-vm", "describe"],
                                      ["tpu-vm", "ssh"]]
    assert "--worker=all" in cmds[2]
    assert dry(teardown, Z, capsys, tmp_path) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-pod", "--zone", "us-central2-b",
         "--quiet"]]
    assert dry(teardown, [*Z, "--queued"], capsys, tmp_path)[0][3:7] == [
        "queued-resources", "delete", "my-pod", "--zone"]


def test_teardown_needs_confirmation(capsys, monkeypatch):
    proc = subprocess.run([sys.executable, str(REPO / "tpu" / "teardown.py"), *Z],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--yes" in proc.stderr and proc.stdout == ""
    ran = []
    monkeypatch.setattr(common.Runner, "run", lambda self, cmd, **kw: ran.append(cmd) or "")
    monkeypatch.setattr(teardown, "confirm", lambda prompt: False)
    assert teardown.main(Z) == 1 and ran == []
    monkeypatch.setattr(teardown, "confirm", lambda prompt: True)
    assert teardown.main(Z) == 0 and ran[0][3:5] == ["tpu-vm", "delete"]


# ------------------------------------------------------------- the remote bash, run locally

def _bash(script: str, home: Path) -> subprocess.CompletedProcess:
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin"}
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                          timeout=60)


def _status(home: Path) -> list[str]:
    return [s for _, s in common.parse_status(_bash(common.status_script("r1"), home).stdout)]


def _live(pid: str) -> bool:
    """A running process (this container's init may leave exited ones as zombies a while)."""
    try:
        return "\tZ" not in Path(f"/proc/{pid}/status").read_text().split("State:")[1][:3]
    except (FileNotFoundError, IndexError):
        return False


def _wait_for(pred, timeout=20.0):
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def test_remote_scripts_with_fake_trainer(tmp_path):
    home = tmp_path / "home"
    (home / "sparsejax").mkdir(parents=True)
    (home / ".local" / "bin").mkdir(parents=True)
    fake = home / ".local" / "bin" / "sparsejax"
    fake.write_text('#!/bin/bash\necho "trainer $* in $PWD"\nsleep "${FAKE_SLEEP:-0}"\n'
                    'exit "${FAKE_RC:-0}"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    parser = launch.build_parser()

    def script(extra, resume=False):
        args = parser.parse_args(["--name", "p", "--zone", "z", "--gin_file", "base.gin",
                                  "--workdir", "gs://b/r1", *extra])
        launch.validate(args)
        return launch.remote_launch_script(args, resume=resume)

    log = home / "sparsejax_logs" / "r1.log"
    assert _status(home) == ["absent"]
    assert _bash(script(["--env", "FAKE_RC=3"]), home).returncode == 0
    _wait_for(lambda: _status(home) == ["finished 3"])
    assert f"trainer train --gin_file=base.gin --workdir=gs://b/r1 in {home}/sparsejax" \
        in log.read_text()

    assert _bash(script(["--env", "FAKE_SLEEP=60"]), home).returncode == 0
    _wait_for(lambda: "trainer" in log.read_text().split("=== launch")[-1])
    assert _status(home) == ["running"]
    pid1 = (home / "sparsejax_logs" / "r1.pid").read_text().strip()
    second = _bash(script(["--env", "FAKE_SLEEP=60"]), home)  # refuses a second copy
    assert second.returncode == 1 and "already running" in second.stderr
    assert _bash(script(["--env", "FAKE_SLEEP=60"], resume=True), home).returncode == 0
    pid2 = (home / "sparsejax_logs" / "r1.pid").read_text().strip()
    assert pid2 != pid1 and not _live(pid1)  # the old run (its whole group) was stopped
    _wait_for(lambda: _status(home) == ["running"])
    assert _bash(launch._kill_script(common.remote_paths("r1")), home).returncode == 0
    assert _status(home) == ["dead"] and not _live(pid2)
    assert log.read_text().count("=== resume") == 1


# ------------------------------------------------------------- the restart loop

def test_decide():
    assert launch.decide("PREEMPTED", []) == "recreate"
    assert launch.decide("CREATING", []) == "wait"
    assert launch.decide("READY", []) == "wait"
    assert launch.decide("READY", [("w0", "running"), ("w1", "running")]) == "wait"
    assert launch.decide("READY", [("w0", "finished 0"), ("w1", "finished 0")]) == "done"
    assert launch.decide("READY", [("w0", "running"), ("w1", "dead")]) == "relaunch"
    assert launch.decide("READY", [("w0", "finished 1"), ("w1", "finished 0")]) == "relaunch"


def test_restart_loop_recreates_after_preemption(monkeypatch, tmp_path, capsys):
    """READY+running -> PREEMPTED -> delete, create, setup, resume -> all finished: done."""
    states = iter(["READY", "PREEMPTED", "READY", "READY"])
    statuses = iter(["SPARSEJAX_STATUS w0 running\nSPARSEJAX_STATUS w1 running",
                     "SPARSEJAX_STATUS w0 finished 0\nSPARSEJAX_STATUS w1 finished 0"])
    ran = []

    def fake_run(self, cmd, capture=False, check=True):
        ran.append(cmd)
        if "describe" in cmd:
            return next(states)
        if "SPARSEJAX_STATUS" in cmd[-1]:
            return next(statuses)
        return ""

    monkeypatch.setattr(common.Runner, "run", fake_run)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    common.save_state(tmp_path, "my-pod", "create",
                      [*Z, "--accelerator_type", "v4-32", "--spot", "--state_dir", str(tmp_path)])
    common.save_state(tmp_path, "my-pod", "setup",
                      [*Z, "--repo_url", "u", "--state_dir", str(tmp_path)])
    assert launch.main([*LAUNCH, "--restart_on_preemption", "--poll_seconds", "1",
                        "--state_dir", str(tmp_path)]) == 0
    kinds = [" ".join(c[3:5]) if c[0] == "gcloud" else c[0] for c in ran]
    assert kinds == ["tpu-vm ssh",  # launch
                     "tpu-vm describe", "tpu-vm ssh",  # READY, running
                     "tpu-vm describe", "tpu-vm delete", "tpu-vm create",  # preempted
                     "tpu-vm describe", "tpu-vm ssh", "tpu-vm ssh",  # setup --wait
                     "tpu-vm ssh",  # resume
                     "tpu-vm describe", "tpu-vm ssh"]  # READY, finished 0
    assert "--spot" in ran[5] and "kill -TERM" in ran[9][-1] and TRAIN in ran[9][-1]
    assert "already running" in ran[0][-1]
    assert set(common.load_state(tmp_path, "my-pod")) == {"create", "setup", "launch"}


def test_slurm_example_runs_same_command_with_slurm_coordinator(tmp_path):
    """The sbatch script with fake scontrol/srun/sparsejax: coordinator from the node list."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    # A long node list: reading only its first line under pipefail would die of SIGPIPE.
    fakes = {"scontrol": 'printf "gpu017\\ngpu018\\n"; seq -f "gpu%06g" 1 200000',
             "srun": 'shift; exec "$@"',  # drops --kill-on-bad-exit=1, runs the task here
             "sparsejax": 'echo "ARGS $* COORD $JAX_COORDINATOR_ADDRESS ID $SLURM_PROCID"'}
    for name, body in fakes.items():
        (bin_ / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_ / name).chmod(0o755)
    env = {"PATH": f"{bin_}:/usr/bin:/bin", "SLURM_JOB_NODELIST": "gpu[017-018]",
           "SLURM_JOB_ID": "5000", "SLURM_NNODES": "2", "SLURM_NTASKS": "2", "SLURM_PROCID": "1"}
    proc = subprocess.run(["bash", str(REPO / "tpu" / "slurm_example.sbatch"), "configs/base.gin",
                           "/shared/r1", "--gin.TrainConfig.num_steps=7"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert ("ARGS train --gin_file=configs/base.gin --workdir=/shared/r1 "
            f"--gin.TrainConfig.num_steps=7 COORD gpu017:{5000 % 4096 + 61440} ID 1") in proc.stdout
    assert "process 1 of 2" in proc.stdout
