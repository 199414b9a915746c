"""The block_sparse reproduction (experiments/block_sparse.py): its harness end to end on a
shrunk setup (tiny model, dense and block RigL, one seed, 6 steps), the equal wall-clock step
counts from a given calibration, and its shipped grids."""
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import pytest

from sparsejax.sweep import grid, runner

REPO = Path(__file__).resolve().parents[2]
BASE, BLOCK = "dense_tiny: name=dense", "brigl_tiny: density=0.5"
TINY = ("TrainConfig.num_steps=6", "TrainConfig.eval_every=3", "TrainConfig.eval_tokens=256",
        "TrainConfig.log_every=2", "TrainConfig.checkpoint_every=6",
        "TrainConfig.async_checkpoints=False")
SPECS = {
    "dense_tiny": grid.SweepSpec(gin_files=("tiny.gin",),
                                 sweeps=(("make_method.name", ("'dense'",)),), overrides=TINY),
    "brigl_tiny": grid.SweepSpec(gin_files=("tiny.gin", "sparsity/block_rigl.gin"),
                                 sweeps=(("BlockSparse.density", ("0.5",)),),
                                 overrides=TINY + ("DropGrowSchedule.frequency=0.5",)),
}


def load(name):
    """experiments/<name>.py as module `name` (reproduce.py imports block_sparse by name)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
    return sys.modules[name]


def test_harness_end_to_end_on_a_shrunk_setup(tmp_path):
    bs = load("block_sparse")
    out = str(tmp_path / "runs")
    kw = dict(specs=SPECS, baseline=BASE, steps=6, calibration_steps=6, log_every=2)
    assert bs.run(out, parallel=2, **kw) == 0

    path = bs.calibration_path(out)
    cal = json.load(open(path))
    assert set(cal["variants"]) == {BASE, BLOCK}
    assert cal["machine"]["cpu_count"] == os.cpu_count()
    assert cal["machine"]["device_kind"] and "processor" in cal["machine"] and cal["date"]
    for c in cal["variants"].values():  # intervals ending at steps 4 and 6 (2 holds compiles)
        assert len(c["intervals"]) == 2 and c["tokens_per_s"] > 0
        assert c["tokens_per_step"] == 8 * 64  # tiny.gin
    block_spec = cal["variants"][BLOCK]["spec"]
    assert "DropGrowSchedule.frequency=3" in block_spec["overrides"]  # 0.5 of the 6-step run
    assert "TrainConfig.eval_tokens=0" in block_spec["overrides"]

    n = bs.time_matched_steps(cal, BASE, 6)[BLOCK]
    equal, timed, cal2 = bs.results(out, grids=tuple(SPECS), baseline=BASE, steps=6)
    assert [v.label for v in equal] == [v.label for v in timed] == [BASE, BLOCK]
    assert timed[0] is equal[0]
    assert [r["final_step"] for r in timed[1].results] == [n]
    assert (timed[1] is equal[1]) == (n == 6)
    assert os.path.isdir(bs.time_dir(out, "brigl_tiny,density=0.5")) == (n != 6)
    assert 0 < equal[1].results[0]["density"] < 1  # the stored fraction the block run logged

    md = bs.markdown(equal, timed, cal2, BASE, 6)
    assert "**Equal steps**" in md and "**Equal wall-clock**" in md
    assert md.count("| Δ vs baseline (same seed) |") == 2 and md.count("| speed vs dense |") == 2
    rows = [line for line in md.splitlines() if line.startswith(f"| {BLOCK} | 1 |")]
    assert len(rows) == 2 and all(re.search(r"\| [+-]\d\.\d{4} \|", r) for r in rows)  # Δ
    tps = {label: c["tokens_per_s"] for label, c in cal["variants"].items()}
    assert rows[0].endswith(f"| 6 | {tps[BLOCK]:,.0f} | {tps[BLOCK] / tps[BASE]:.2f}x |")
    assert rows[1].split("|")[-4].strip() == str(n)
    assert os.path.isfile(bs.plot(equal, timed, cal2, str(tmp_path / "p.png")))

    before = open(path).read()  # a rerun reuses the calibration and every finished trial
    assert bs.run(out, parallel=2, **kw) == 0 and open(path).read() == before


def test_time_matched_steps_and_calibration_settings(tmp_path):
    bs = load("block_sparse")
    cal = {"variants": {"dense": {"tokens_per_s": 1000.0}, "fast": {"tokens_per_s": 1372.0},
                        "slow": {"tokens_per_s": 499.0}}}
    assert bs.time_matched_steps(cal, "dense", 300) == {"dense": 300, "fast": 412, "slow": 150}
    with pytest.raises(ValueError, match="baseline='nope' has no calibration"):
        bs.time_matched_steps(cal, "nope")
    arms = {a.label: a for a in bs.arms(SPECS)}
    dense = bs.calibration_spec(arms[BASE], steps=300, calibration_steps=60, log_every=20)
    assert not any("DropGrowSchedule" in o for o in dense.overrides)
    assert dense.overrides[-3:] == ("TrainConfig.num_steps=60", "TrainConfig.log_every=20",
                                    "TrainConfig.eval_tokens=0")
    brigl = bs.calibration_spec(arms[BLOCK], steps=300, calibration_steps=60, log_every=20)
    assert brigl.overrides[-2:] == ("DropGrowSchedule.frequency=150", "DropGrowSchedule.end=1.0")
    timed = bs.time_spec(arms[BLOCK], 412)
    assert [t.name for t in timed.trials()] == ["density=0.5,num_steps=412,seed=0"]
    assert timed.overrides[-1] == f"learning_rate_schedule.warmup_steps={bs.WARMUP}"
    with pytest.raises(ValueError, match="calibration_steps=30 must be at least 2 \\* log_every"):
        bs.calibrate(str(tmp_path), list(arms.values()), calibration_steps=30, log_every=20)
    os.makedirs(os.path.dirname(bs.calibration_path(str(tmp_path))))
    with open(bs.calibration_path(str(tmp_path)), "w") as f:  # measured for other settings
        json.dump({"variants": {BASE: {"spec": dense.to_json()}}}, f)
    with pytest.raises(ValueError, match="no calibration, or one with other settings, of "
                                         ".*brigl_tiny.*delete it"):
        bs.calibrate(str(tmp_path), list(arms.values()))


def test_shipped_grids_parse_and_the_page_is_registered(tmp_path):
    bs, rep = load("block_sparse"), load("reproduce")
    assert "block_sparse" in rep.CUSTOM
    specs = bs.load_specs()
    for spec in specs.values():
        runner.validate_spec(spec)
    labels = [a.label for a in bs.arms(specs)]
    assert bs.BASELINE in labels and len(labels) == 11
    assert "block_sparse_block_rigl64: block=64,density=0.2" in labels
    assert "block_sparse_block_rigl: block=64,density=0.1" not in labels  # the floor: 0.2's twin
    small = (REPO / "configs" / "experiments" / "small.gin").read_text()
    warmup = int(re.search(r"warmup_steps = (\d+)", small).group(1))
    assert warmup / bs.STEPS == bs.WARMUP and f"num_steps = {bs.STEPS}" in small
    results = tmp_path / "results"
    results.mkdir()
    page = results / "block_sparse.md"
    page.write_text(f"# B\n\nClaim: x.\n\n{rep.BEGIN}\n{rep.END}\n\nWe see: y.\n")
    assert rep.main(["block_sparse", "--report_only", f"--out={tmp_path / 'none'}",
                     f"--results_dir={results}"]) == 0
    text = page.read_text()
    assert text.startswith("# B\n\nClaim: x.\n\n") and text.endswith("\n\nWe see: y.\n")
    assert "**Equal steps** (300 steps each)" in text and "not calibrated yet" in text
