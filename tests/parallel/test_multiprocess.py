"""Multi-controller runs on one machine: 2 processes x 4 simulated CPU devices on 127.0.0.1
(gloo collectives) against one process with 8 devices; checkpoints restored onto another mesh
and process count; SIGTERM on one host; a dead host."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sparsejax.train.checkpoint import restore_state_numpy

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.slow

# Tiny model with RigL masks and an MoE layer whose experts are sharded over the `expert` axis;
# documents are read in 2 shards, so the global batches do not depend on the process count.
COMMON = ["--gin_file=tiny.gin", "--gin_file=sparsity/rigl.gin", "--gin_file=moe/top2.gin",
          "--gin.DropGrowSchedule.frequency=5", "--gin.TrainConfig.num_steps=20",
          "--gin.TrainConfig.data_shards=2", "--gin.TrainConfig.log_every=5",
          "--gin.TrainConfig.eval_every=20", "--gin.TrainConfig.checkpoint_every=5",
          "--gin.TrainConfig.progress_bar=False", "--gin.TrainConfig.eval_tokens=8192",
          "--gin.make_mesh.data=1", "--gin.make_mesh.fsdp=4", "--gin.make_mesh.expert=2",
          "--quiet"]
# Float32 reductions are split differently across 8 devices in 1 or 2 processes.
RTOL = 2e-5


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(workdir, devices, *extra, process_id=None, num_processes=None, port=None,
           command="train"):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                         "--xla_backend_optimization_level=0")  # as tests/conftest.py
    args = [sys.executable, "-m", "sparsejax.cli", command, f"--workdir={workdir}", *COMMON, *extra]
    if num_processes:
        args += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
                 f"--process_id={process_id}", "--heartbeat_timeout_s=10"]
    # Output goes to a file: a full pipe would block one process while we wait on the other.
    log = open(f"{workdir}.{process_id or 0}.{command}.{time.monotonic_ns()}.log", "w+")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            text=True)
    proc.log = log
    return proc


def output(proc):
    proc.log.flush()
    proc.log.seek(0)
    return proc.log.read()


def launch_group(workdir, *extra):
    port = free_port()
    return [launch(workdir, 4, *extra, process_id=i, num_processes=2, port=port) for i in (0, 1)]


def finish(procs, timeout=400):
    for p in procs:
        p.wait(timeout=timeout)
    outs = [output(p) for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


def losses(workdir, key="loss"):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r[key] for r in map(json.loads, f) if key in r]


def params_at(workdir, step):
    return jax.tree.leaves(restore_state_numpy(workdir, step)[1]["params"])


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("mp") / "run")
    finish(launch_group(workdir))
    return workdir


def test_two_processes_match_one_process(two_process_run, tmp_path):
    single = str(tmp_path / "single")
    finish([launch(single, 8)])
    assert len(losses(single)) == 4
    np.testing.assert_allclose(losses(two_process_run), losses(single), rtol=RTOL)
    # Both processes scored the whole eval sample: same rows, same loss and stderr.
    assert losses(two_process_run, "eval_rows") == losses(single, "eval_rows") == [128]
    for key in ("eval_loss", "eval_loss_stderr"):
        np.testing.assert_allclose(losses(two_process_run, key), losses(single, key), rtol=1e-4)
    for a, b in zip(params_at(two_process_run, 20), params_at(single, 20)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_restore_on_other_mesh_and_process_count(two_process_run, tmp_path):
    """Saved by 2 processes as fsdp=4 x expert=2 on 8 devices, restored by 1 process on 4
    devices as data=2 x fsdp=2: the values are the same, and training continues."""
    dense = str(tmp_path / "copy")
    import shutil
    shutil.copytree(two_process_run, dense)
    p = launch(dense, 4, "--gin.make_mesh.data=2", "--gin.make_mesh.fsdp=2",
               "--gin.make_mesh.expert=1", "--gin.TrainConfig.num_steps=25",
               "--allow_config_change")
    out = finish([p])[0]
    assert "resumed from step 20" in out
    for a, b in zip(params_at(two_process_run, 20), params_at(dense, 20)):
        np.testing.assert_array_equal(a, b)
    assert len(losses(dense)) == 5 and np.isfinite(losses(dense)[-1])


def test_sigterm_on_one_host_then_relaunch_is_identical(two_process_run, tmp_path):
    workdir = str(tmp_path / "preempted")
    procs = launch_group(workdir, "--gin.TrainConfig.checkpoint_every=100")
    marker = os.path.join(workdir, "metrics.jsonl")
    t0 = time.time()
    while not (os.path.exists(marker) and losses(workdir)):
        assert all(p.poll() is None for p in procs), output(procs[0])[-3000:]
        assert time.time() - t0 < 300
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    outs = finish(procs)
    assert all('"status": "preempted"' in o for o in outs), outs[0][-2000:]
    saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert len(saved) == 1 and 5 <= saved[0] < 20
    outs = finish(launch_group(workdir, "--gin.TrainConfig.checkpoint_every=100"))
    assert f"resumed from step {saved[0]}" in outs[0]
    for a, b in zip(params_at(two_process_run, 20), params_at(workdir, 20)):
        np.testing.assert_array_equal(a, b)


def test_dead_process_stops_the_other_within_bound(tmp_path):
    workdir = str(tmp_path / "dead")
    procs = launch_group(workdir, "--gin.TrainConfig.num_steps=100000")
    t0 = time.time()
    while not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        assert procs[0].poll() is None and time.time() - t0 < 300
        time.sleep(0.1)
    procs[1].kill()
    t_kill = time.time()
    procs[0].wait(timeout=120)
    out = output(procs[0])
    assert procs[0].returncode != 0
    assert time.time() - t_kill < 60  # heartbeat timeout 10 s, plus detection slack
    assert "another task died" in out or "unhealthy" in out


@pytest.mark.parametrize("args,match", [
    (["--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=2"],
     "process_id=2 is out of range"),
    (["--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=1",
      "--distributed_timeout_s=2"], "unreachable"),
    (["--gin.make_mesh.fsdp=3"], "mesh"),
])
def test_bad_multiprocess_input(tmp_path, args, match):
    p = launch(str(tmp_path / "bad"), 4, *args)
    p.wait(timeout=120)
    out = output(p)
    assert p.returncode != 0 and match in out, out[-2000:]
