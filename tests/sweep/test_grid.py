"""Grid-file parser, sweep flags and trial naming (no training)."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsejax.sweep import grid

GRID = """
# a comment line
gin_file = tiny.gin
gin_file = 'sparsity/rigl.gin'   # trailing comment
seeds = 3
sweep: MaskedPruningMethod.density = [0.1, 0.5]
sweep: MaskedPruningMethod.distribution = ['uniform', 'e#rk,x']
TrainConfig.num_steps = 100
DropGrowSchedule.frequency = 20
"""


def test_parse_grid_text():
    g = grid.parse_grid_text(GRID, "g.grid")
    assert g["gin_files"] == ["tiny.gin", "sparsity/rigl.gin"]
    assert g["seeds"] == (0, 1, 2)
    assert g["sweeps"] == [("MaskedPruningMethod.density", ("0.1", "0.5")),
                           ("MaskedPruningMethod.distribution", ("'uniform'", "'e#rk,x'"))]
    assert g["overrides"] == ["TrainConfig.num_steps=100", "DropGrowSchedule.frequency=20"]


def test_grid_file_and_flags_combine(tmp_path):
    path = tmp_path / "x.grid"
    path.write_text(GRID)
    spec = grid.build_spec(gin_files=["extra.gin"], sweep_flags=["ModelConfig.num_layers=[1, 2]"],
                           seeds="2", overrides=["TrainConfig.log_every=5"], grid_file=str(path))
    assert spec.gin_files == ("tiny.gin", "sparsity/rigl.gin", "extra.gin")
    assert spec.seeds == (0, 1)  # --seeds replaces the file's count
    assert spec.overrides[-1] == "TrainConfig.log_every=5"
    trials = spec.trials()
    assert len(trials) == 2 * 2 * 2 * 2
    # First sweep varies slowest, seeds fastest; names are unique and filesystem-safe.
    assert trials[0].name == "density=0.1,distribution=uniform,num_layers=1,seed=0"
    assert trials[1].seed == 1 and trials[1].point == trials[0].point
    assert trials[2].point[-1] == ("ModelConfig.num_layers", "2")
    assert trials[4].name.startswith("density=0.1,distribution=e_rk_x,")
    assert len({t.name for t in trials}) == len(trials)
    assert all("/" not in t.name for t in trials)
    assert trials[0].bindings() == ["MaskedPruningMethod.density=0.1",
                                    "MaskedPruningMethod.distribution='uniform'",
                                    "ModelConfig.num_layers=1", "TrainConfig.seed=0"]
    assert grid.SweepSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec


def test_split_list_nested_and_quoted():
    assert grid.split_list("[[1, 2], [3, 4]]", "x") == ("[1, 2]", "[3, 4]")
    assert grid.split_list("['a,b', \"c]\", @f, %M]", "x") == ("'a,b'", '"c]"', "@f", "%M")
    assert grid.split_list("[ 7 ]", "x") == ("7",)
    assert grid.split_list("[]", "x") == ()


@settings(max_examples=20, deadline=None)
@given(st.lists(st.one_of(st.integers(-5, 10**6), st.text("ab, []#x", max_size=5)),
                min_size=1, max_size=6))
def test_split_list_roundtrip(values):
    literals = [repr(v) for v in values]
    assert grid.split_list("[" + ", ".join(literals) + "]", "x") == tuple(literals)


@pytest.mark.parametrize("text,match", [
    ("sweep: A.b = ['x, 2]", "unterminated"),
    ("sweep: A.b = [1, 2", "bracketed list"),
    ("sweep: A.b = 1", "bracketed list"),
    ("bogus = 3", "unknown key 'bogus'"),
    ("gin_file tiny.gin", "expected `key = value`"),
    ("seeds = 0", "at least 1 seed"),
    ("seeds = many", "expected a count"),
])
def test_grid_text_errors_name_the_line(text, match):
    with pytest.raises(ValueError, match=match) as e:
        grid.parse_grid_text("# header\n" + text, "my.grid")
    assert "my.grid:2" in str(e.value)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sweep_flags=["ModelConfig.num_layers=[]"]), "empty value list"),
    (dict(sweep_flags=["TrainConfig.seed=[1, 2]"]), "seeds are set with --seeds"),
    (dict(sweep_flags=["A.b=[1, 1]"]), "repeats a value"),
    (dict(sweep_flags=["A.b=[1]", "A.b=[2]"]), "swept twice"),
    (dict(sweep_flags=["not a binding=[1]"]), "not of the form"),
    (dict(sweep_flags=[]), "at least one --sweep"),
    (dict(gin_files=[]), "at least one --gin_file"),
])
def test_spec_errors(kwargs, match):
    args = dict(gin_files=["tiny.gin"], sweep_flags=["A.b=[1]"]) | kwargs
    with pytest.raises(ValueError, match=match):
        grid.build_spec(**args)


def test_seeds_forms():
    assert grid.parse_seeds(3) == (0, 1, 2)
    assert grid.parse_seeds("0,7") == (0, 7)
    assert grid.parse_seeds("[4, 5]") == (4, 5)


def test_example_grid_files_parse():
    from pathlib import Path
    files = sorted((Path(__file__).resolve().parents[2] / "experiments" / "grids").glob("*.grid"))
    assert files
    for f in files:
        spec = grid.build_spec(grid_file=str(f))
        assert spec.trials()
