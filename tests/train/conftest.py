import os
import subprocess
import sys

import pytest

from sparsejax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A small, fast setup on top of configs/tiny.gin.
FAST = ["--gin.TrainConfig.num_steps=20", "--gin.TrainConfig.checkpoint_every=10",
        "--gin.TrainConfig.eval_every=10", "--gin.TrainConfig.log_every=5",
        "--gin.TrainConfig.progress_bar=False", "--gin.TrainConfig.async_checkpoints=False"]


def run_cli(workdir, *extra, gin_file="tiny.gin"):
    """Runs `sparsejax train` in this process; returns its exit code."""
    return cli.main(["train", f"--gin_file={gin_file}", f"--workdir={workdir}", "--quiet",
                     *FAST, *extra])


def spawn_cli(workdir, *extra, command="train"):
    """Starts `sparsejax train` as a subprocess (1 CPU device)."""
    env = dict(os.environ)
    # the test-wide compile level too (tests/conftest.py), as the other CLI subprocesses
    env["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=1 "
                        "--xla_backend_optimization_level=0")
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.Popen(
        [sys.executable, "-m", "sparsejax.cli", command, "--gin_file=tiny.gin",
         f"--workdir={workdir}", "--quiet", *FAST, *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(name="run_cli")
def run_cli_fixture():
    return run_cli


@pytest.fixture(name="spawn_cli")
def spawn_cli_fixture():
    return spawn_cli
