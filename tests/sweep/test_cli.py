"""`sparsejax sweep --dry_run` output and every bad-input error (exit code 2, nothing run)."""
import dataclasses
import json
import os
import shlex
from pathlib import Path

import pytest

from sparsejax import cli
from sparsejax.sweep import grid, runner

GRIDS = Path(__file__).resolve().parents[2] / "experiments" / "grids"

BASE = ["sweep", "--gin_file=tiny.gin", "--gin.TrainConfig.num_steps=4"]


def run_cli(capsys, *args):
    rc = cli.main([*BASE, *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_a_swept_binding_that_takes_effect_nowhere_is_refused(tmp_path, capsys):
    # Dense training has no distribution: the two "variants" would be the same run.
    rc, _, err = run_cli(capsys, "--sweep=MaskedPruningMethod.distribution=['uniform', 'erk']",
                         f"--out={tmp_path / 's'}", "--dry_run")
    assert rc == 2 and "take effect in no grid point" in err
    assert "MaskedPruningMethod.distribution" in err


def test_dry_run_prints_one_quoted_command_per_trial(tmp_path, capsys):
    out_dir = tmp_path / "s"
    rc, out, _ = run_cli(capsys, "--gin_file=sparsity/static_random.gin",
                         "--sweep=ModelConfig.num_layers=[1, 2]",
                         "--sweep=MaskedPruningMethod.distribution=['uniform', 'erk']",
                         "--seeds=3", f"--out={out_dir}", "--dry_run")
    assert rc == 0
    lines = out.strip().splitlines()
    assert len(lines) == 2 * 2 * 3
    argv = shlex.split(lines[0])  # shell-quoted: the quotes of 'uniform' survive
    assert argv[:5] == ["python", "-m", "sparsejax.cli", "train", "--gin_file=tiny.gin"]
    assert "--gin.TrainConfig.num_steps=4" in argv
    assert "--gin.MaskedPruningMethod.distribution='uniform'" in argv
    assert "--gin.TrainConfig.seed=0" in argv
    assert f"--workdir={out_dir}/trials/num_layers=1,distribution=uniform,seed=0" in argv
    seeds = [next(a for a in shlex.split(l) if a.startswith("--gin.TrainConfig.seed=")) for l in
             lines]
    assert seeds[:3] == [f"--gin.TrainConfig.seed={s}" for s in range(3)]
    assert len({l.split("--workdir=")[1] for l in lines}) == len(lines)
    assert not out_dir.exists()  # a dry run writes nothing


def test_grid_file_dry_run(capsys):
    rc = cli.main(["sweep", f"--grid={GRIDS / 'tiny_layers.grid'}", "--out=/tmp/x", "--dry_run"])
    out, _ = capsys.readouterr()
    assert rc == 0
    spec = grid.build_spec(grid_file=str(GRIDS / "tiny_layers.grid"))
    assert out.strip().splitlines() == runner.dry_run_lines(spec, "/tmp/x")
    assert len(spec.trials()) == 8


@pytest.mark.parametrize("args,match", [
    (["--sweep=ModelConfig.no_such_param=[1, 2]"], "no_such_param"),
    (["--sweep=NoSuchConfigurable.x=[1]"], "NoSuchConfigurable"),
    (["--sweep=ModelConfig.num_layers=[]"], "empty value list"),
    (["--sweep=ModelConfig.num_layers=[1, 2]", "--gin.Bogus.y=3"], "Bogus"),
    (["--sweep=ModelConfig.num_layers=[1, 2]", "--gin_file=nonexistent.gin"], "nonexistent"),
    ([f"--grid={GRIDS / 'missing.grid'}"], "missing.grid"),
    (["--sweep=ModelConfig.num_layers=[1]", "--parallel=0"], "parallel=0"),
])
def test_bad_input_exits_2_and_launches_nothing(tmp_path, capsys, args, match):
    out_dir = tmp_path / "s"
    rc, _, err = run_cli(capsys, *args, f"--out={out_dir}")
    assert rc == 2
    assert err.startswith("error: ") and match in err
    assert not (out_dir / "trials").exists() or not os.listdir(out_dir / "trials")


def test_out_dir_holding_a_different_sweep(tmp_path, capsys):
    out_dir = str(tmp_path / "s")
    old = grid.build_spec(["tiny.gin"], ["ModelConfig.num_layers=[1, 2]"], "2",
                          ["TrainConfig.num_steps=4"])
    runner.prepare_out_dir(old, out_dir)
    assert json.load(open(os.path.join(out_dir, "sweep.json"))) == old.to_json()
    runner.prepare_out_dir(old, out_dir)  # the same sweep: accepted (resume)
    rc, _, err = run_cli(capsys, "--sweep=ModelConfig.num_layers=[1, 3]", "--seeds=2",
                         f"--out={out_dir}")
    assert rc == 2
    assert "holds a different sweep" in err and "sweeps: stored" in err
    assert os.listdir(os.path.join(out_dir, "trials")) == []
    fewer = dataclasses.replace(old, seeds=(0,))
    with pytest.raises(ValueError, match="seeds: stored"):  # dropping seeds would hide trials
        runner.prepare_out_dir(fewer, out_dir)
    more = dataclasses.replace(old, seeds=(0, 1, 2))  # adding seeds extends the sweep
    runner.prepare_out_dir(more, out_dir)
    assert runner.load_spec(out_dir) == more


def test_report_of_a_dir_without_sweep(tmp_path, capsys):
    rc = cli.main(["report", f"--out={tmp_path}"])
    _, err = capsys.readouterr()
    assert rc == 2 and "sweep.json" in err
