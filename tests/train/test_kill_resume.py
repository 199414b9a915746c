"""A run killed with SIGKILL (or stopped with SIGTERM) and rerun ends with parameters
bit-identical to an uninterrupted run."""
import os
import signal
import time

import jax
import numpy as np

from sparsejax.train.checkpoint import restore_state_numpy

STEPS = ["--gin.TrainConfig.num_steps=60", "--gin.TrainConfig.checkpoint_every=10",
         "--gin.TrainConfig.eval_every=1000", "--gin.TrainConfig.async_checkpoints=True"]


def final_params(workdir, step=60):
    return restore_state_numpy(workdir, step)[1]["params"]


def wait_for_checkpoint(proc, workdir, step, timeout=120):
    marker = os.path.join(workdir, "checkpoints", str(step))
    t0 = time.time()
    while not os.path.isdir(marker):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() - t0 < timeout, "no checkpoint appeared"
        time.sleep(0.02)


def assert_identical(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sigkill_then_rerun_is_bit_identical(tmp_path, spawn_cli):
    ref = str(tmp_path / "ref")
    p = spawn_cli(ref, *STEPS)
    assert p.wait(timeout=300) == 0, p.stdout.read()

    w = str(tmp_path / "killed")
    p = spawn_cli(w, *STEPS)
    wait_for_checkpoint(p, w, 10)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    assert not os.path.isdir(os.path.join(w, "checkpoints", "60")), "run finished before the kill"
    p = spawn_cli(w, *STEPS)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    assert "resumed from step" in out
    assert_identical(final_params(ref), final_params(w))


def test_sigterm_saves_and_exits_zero_then_resumes(tmp_path, spawn_cli):
    w = str(tmp_path / "run")
    p = spawn_cli(w, *STEPS)
    wait_for_checkpoint(p, w, 10)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out
    assert '"status": "preempted"' in out
    saved = sorted(int(d) for d in os.listdir(os.path.join(w, "checkpoints")) if d.isdigit())
    assert saved and saved[-1] < 60
    p = spawn_cli(w, *STEPS)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0 and '"status": "done"' in out, out
    assert f"resumed from step {saved[-1]}" in out
