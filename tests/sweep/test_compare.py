"""Comparison of several sweeps (sparsejax.sweep.compare) and the reproduction driver
(experiments/reproduce.py), on sweep dirs written by hand (no training)."""
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from sparsejax.sweep import compare, grid, runner
from sparsejax.sweep.summary import RESULT_FILE

REPO = Path(__file__).resolve().parents[2]


def load_reproduce():
    if "reproduce" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "reproduce", REPO / "experiments" / "reproduce.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["reproduce"] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
    return sys.modules["reproduce"]


def fake_sweep(out, sweep, seeds, finals, extra=None, corpus="f0621468f8aeceba"):
    """A sweep dir whose trials 'finished' with the given final eval losses
    (finals[point_index][seed_index]), eval stderr 0.01 * (seed + 1), trained on `corpus`;
    `extra(point_index, step)` adds metrics."""
    spec = grid.SweepSpec(gin_files=("tiny.gin",), sweeps=(sweep,), seeds=tuple(seeds))
    runner.prepare_out_dir(spec, out)
    for t in spec.trials():
        p = spec.points().index(t.point)
        final = finals[p][spec.seeds.index(t.seed)]
        if final is None:  # unfinished trial
            continue
        d = runner.trial_dir(out, t)
        os.makedirs(d)
        with open(os.path.join(d, "metrics.jsonl"), "w") as f:
            for step in (50, 100):
                rec = {"step": step, "eval_loss": final + (100 - step) / 100}
                rec.update(extra(p, step) if extra else {})
                f.write(json.dumps(rec) + "\n")
        with open(os.path.join(d, RESULT_FILE), "w") as f:
            json.dump({"trial": t.name, "seed": t.seed, "final_eval_loss": final,
                       "best_eval_loss": final, "final_eval_loss_stderr": 0.01 * (t.seed + 1),
                       "corpus_fingerprint": corpus, "params": 1000.0 * (p + 1),
                       "avg_params": 900.0, "flops_per_token": 2000.0,
                       "tokens_per_s": 50.0}, f)
    return out


@pytest.fixture
def sweeps(tmp_path):
    dense = fake_sweep(str(tmp_path / "dense"), ("make_method.name", ("'dense'",)), [0, 1, 2],
                       [[2.0, 2.2, 2.1]])
    moe = fake_sweep(
        str(tmp_path / "moe"), ("MoeMlp.load_balance_weight", ("0.01", "0.0")), [0, 1],
        [[1.9, 1.95], [2.05, None]],
        extra=lambda p, step: {
            "model/layer_1/moe/expert_load": [0.25, 0.25, 0.25, 0.25] if p == 0 else
            [0.7, 0.1, 0.1, 0.1],
            "model/layer_3/moe/expert_load": [0.25] * 4 if p == 0 else [0.4, 0.4, 0.1, 0.1],
            "sparsity/density": 1.0 - step / 200})
    return dense, moe


def test_rows_mean_std_delta_and_skew(sweeps):
    variants = compare.collect(list(sweeps))
    assert [v.label for v in variants] == [
        "dense: name=dense", "moe: load_balance_weight=0.01", "moe: load_balance_weight=0.0"]
    rows = compare.compare_rows(variants, baseline="dense: name=dense")
    dense, lb, nolb = rows
    assert dense["n_seeds"] == 3 and dense["final_eval_loss_mean"] == pytest.approx(2.1)
    assert dense["final_eval_loss_std"] == pytest.approx(np.std([2.0, 2.2, 2.1], ddof=1))
    # paired by seed: seeds 0 and 1 of both sweeps
    assert lb["delta_vs_baseline_mean"] == pytest.approx(np.mean([1.9 - 2.0, 1.95 - 2.2]))
    assert lb["delta_vs_baseline_std"] == pytest.approx(np.std([-0.1, -0.25], ddof=1))
    assert nolb["delta_vs_baseline_mean"] == pytest.approx(0.05)
    assert nolb["n_seeds"] == 1 and nolb["final_eval_loss_std"] is None
    # max/mean load per layer, averaged over layers: (0.7/0.25 + 0.4/0.25) / 2 = 2.2
    assert lb["expert_load_skew"] == pytest.approx(1.0)
    assert nolb["expert_load_skew"] == pytest.approx(2.2)
    assert dense["expert_load_skew"] is None and dense["density"] is None
    assert lb["density"] == pytest.approx(0.5)
    table = compare.markdown_table(rows)
    assert "expert load max/mean" in table and "final density" in table
    assert dense["final_eval_loss_stderr"] == pytest.approx(0.02)  # mean of 0.01, 0.02, 0.03
    assert ("| dense: name=dense | 3 | 2.1000 ± 0.1000 | 0.0200 | 2.0000, 2.2000, 2.1000 "
            "| +0.0000 ± 0.0000 |") in table


def test_sweeps_on_different_corpora_are_refused_unless_allowed(sweeps, tmp_path, capsys):
    other = fake_sweep(str(tmp_path / "py312"), ("make_method.name", ("'dense'",)), [0],
                       [[2.5]], corpus="0123456789abcdef")
    with pytest.raises(ValueError, match=r"different corpora.*0123456789abcdef: 1 trials.*"
                                         r"f0621468f8aeceba: 3 trials.*--allow_mixed_corpora"):
        compare.collect([sweeps[0], other])
    variants = compare.collect([sweeps[0], other], allow_mixed_corpora=True)
    assert compare.corpus_fingerprints(variants) == ["0123456789abcdef", "f0621468f8aeceba"]
    rep = load_reproduce()
    rep.REPRODUCTIONS["mixed"] = rep.Reproduction("Mixed", ("dense", "py312"), "dense: name=dense")
    try:
        args = ["mixed", "--report_only", f"--out={tmp_path}", f"--results_dir={tmp_path / 'res'}"]
        assert rep.main(args) == 2 and "different corpora" in capsys.readouterr().err
        assert rep.main(args + ["--allow_mixed_corpora"]) == 0
        assert "0123456789abcdef, f0621468f8aeceba" in open(tmp_path / "res" / "mixed.md").read()
    finally:
        del rep.REPRODUCTIONS["mixed"]


def test_sweep_report_refuses_mixed_corpora_unless_allowed(tmp_path):
    from sparsejax.sweep import report
    out = fake_sweep(str(tmp_path / "s"), ("make_method.name", ("'dense'",)), [0, 1], [[2.0, 2.1]])
    res = os.path.join(runner.trial_dir(out, grid.SweepSpec(
        gin_files=("tiny.gin",), sweeps=(("make_method.name", ("'dense'",)),), seeds=(0, 1)).trials()[1]),
        RESULT_FILE)
    r = json.load(open(res))
    json.dump({**r, "corpus_fingerprint": "0123456789abcdef"}, open(res, "w"))
    with pytest.raises(ValueError, match="different corpora"):
        report.write_report(out)
    got = report.write_report(out, allow_mixed_corpora=True)
    assert got["corpus_fingerprints"] == ["0123456789abcdef", "f0621468f8aeceba"]
    md = open(got["markdown"]).read()
    assert "eval stderr" in md and "0.0150" in md  # mean of 0.01 and 0.02


def test_bad_baseline_names_the_valid_ones(sweeps):
    with pytest.raises(ValueError, match="baseline='nope' is not a variant; valid:.*dense"):
        compare.compare_rows(compare.collect(list(sweeps)), baseline="nope")


def test_plot_has_a_panel_per_logged_quantity(sweeps, tmp_path):
    path = compare.plot_comparison(compare.collect(list(sweeps)), str(tmp_path / "c.png"),
                                   title="t")
    from matplotlib.image import imread
    h, w = imread(path).shape[:2]
    assert w > 3 * h  # eval, density, skew and final-loss panels side by side
    assert compare.plot_comparison(compare.collect([sweeps[0]]), str(tmp_path / "d.png"))


def test_reproduce_report_keeps_the_text_around_the_markers(sweeps, tmp_path, monkeypatch):
    rep = load_reproduce()
    monkeypatch.setitem(rep.REPRODUCTIONS, "fake", rep.Reproduction(
        "Fake", ("dense", "moe"), "dense: name=dense"))
    out, results = str(tmp_path), str(tmp_path / "results")
    os.makedirs(results)
    md = os.path.join(results, "fake.md")
    with open(md, "w") as f:
        f.write(f"# Fake\n\nClaim: x.\n\n{rep.BEGIN}\nold table\n{rep.END}\n\nWe see: y.\n")
    assert rep.main(["fake", "--report_only", f"--out={out}", f"--results_dir={results}"]) == 0
    text = open(md).read()
    assert text.startswith("# Fake\n\nClaim: x.\n\n") and text.endswith("\n\nWe see: y.\n")
    assert "old table" not in text and "| moe: load_balance_weight=0.0 | 1 |" in text
    assert os.path.isfile(os.path.join(results, "fake.png"))
    with open(md, "w") as f:
        f.write("no markers")
    assert rep.main(["fake", "--report_only", f"--out={out}", f"--results_dir={results}"]) == 2
    assert rep.main(["nope"]) == 2


def test_every_reproduction_grid_parses_with_gin():
    """Each grid file of each reproduction exists and every grid point parses (as the trial
    will), and each baseline names a variant of the reproduction's grids."""
    rep = load_reproduce()
    assert len(rep.REPRODUCTIONS) == 11  # seven claims, four of them also in a longer variant
    for name, r in rep.REPRODUCTIONS.items():
        labels = []
        for g in r.grids:
            spec = grid.build_spec(grid_file=rep.grid_path(g))
            runner.validate_spec(spec)
            labels += [f"{g}: {grid.point_name(p)}" for p in spec.points()]
        assert r.baseline in labels, name
        assert os.path.isfile(os.path.join(rep.RESULTS, f"{name}.md")), name
