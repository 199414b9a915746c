"""A non-editable install carries the configs: the wheel holds every shipped gin file, and the
README's command runs from another directory against the installed copy."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_ships_configs_and_runs_from_another_directory(tmp_path):
    wheels, src = tmp_path / "wheels", tmp_path / "src"
    # build from a copy: setuptools writes build/ and *.egg-info next to the sources
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".ci-venv", ".ci-data", "runs", "build", "*.egg-info", "__pycache__",
        ".hypothesis", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                    "-q", "-w", str(wheels), str(src)], check=True, capture_output=True)
    (wheel,) = glob.glob(str(wheels / "sparsejax-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = sorted(os.path.relpath(p, os.path.join(ROOT, "sparsejax", "configs"))
                     for p in glob.glob(os.path.join(ROOT, "sparsejax", "configs", "**", "*.gin"),
                                        recursive=True))
    assert shipped and all(f"sparsejax/configs/{p}" in names for p in shipped)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), wheel], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0")
    where = subprocess.run([sys.executable, "-c", "import sparsejax; print(sparsejax.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(site))  # the installed copy, not the repo
    out = subprocess.run(
        [sys.executable, "-m", "sparsejax.cli", "train", "--gin_file=configs/tiny.gin",
         "--gin_file=sparsity/rigl.gin", "--workdir=runs/tiny", "--quiet",
         "--gin.TrainConfig.num_steps=2", "--gin.TrainConfig.eval_tokens=256",
         "--gin.TrainConfig.progress_bar=False", "--gin.ModelConfig.num_layers=1"],
        cwd=elsewhere, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (elsewhere / "runs" / "tiny" / "config.gin").is_file()
    listing = subprocess.run([sys.executable, "-m", "sparsejax.cli", "list"], cwd=elsewhere,
                             env=env, capture_output=True, text=True, check=True)
    assert str(site) in listing.stdout and "sparsity/rigl.gin" in listing.stdout
