"""benchmarks/sparse_weights.py runs end to end at small sizes and reports every figure the
compact weights guide (docs/guides/compact_weights.md) quotes; the compact layers' params +
optimizer state are their stored fraction of the dense layers' (a byte count, not a
timing)."""
import importlib
import json
import pathlib

import pytest

BENCH_DIR = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    return importlib.import_module("sparse_weights")


def test_quick_run_reports_every_figure(bench, capsys):
    out = bench.main(["--quick"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out
    assert out["device"].startswith("cpu")
    for case in ("dense", "block32_d0.5", "block32_d0.25", "monarch4"):
        assert out[f"projection/{case}/ms"] > 0 and out[f"projection/{case}/speedup"] > 0
    for case in ("dense", "masked", "block_all", "block_mlp"):
        for key in ("ms", "speedup_vs_dense", "speedup_vs_masked"):
            assert out[f"step/{case}/{key}"] > 0
        assert out[f"memory/{case}/temp_bytes"] >= 0
    # --quick: density 0.25 with 32-blocks: k = 1 of 4 (embed 128), 2 of 8 (mlp 256) -> 0.25;
    # the int32 indices add 4 bytes per stored block of 32x32 (x3 float32 copies with Adam)
    assert out["memory/block_all/sparse_layer_bytes_ratio"] == pytest.approx(0.25, abs=0.002)
    assert out["memory/block_all/sparse_layer_bytes_ratio"] <= 0.25 + 0.02
    assert out["memory/masked/sparse_layer_bytes_ratio"] > 1.0  # a mask beside each kernel
    assert 0.25 < out["memory/block_mlp/sparse_layer_bytes_ratio"] < 1.0
    assert out["decode/dense/ms"] > 0 and out["decode/block_sparse/ms"] > 0


def test_bad_arguments_are_refused(bench):
    with pytest.raises(ValueError, match="--new_tokens=1"):
        bench.main(["--new_tokens", "1", "--parts", "decode"])
    with pytest.raises(ValueError, match="--parts='speed'"):
        bench.main(["--parts", "speed"])
    with pytest.raises(ValueError, match="--repeats=0"):
        bench.main(["--repeats", "0", "--parts", "decode"])


def test_repeated_runs_give_each_figure_s_median_and_every_run(bench, capsys):
    runs = [{"device": "cpu:cpu x1", "step/block_all/speedup_vs_dense": r, "step/block_all/ms": m}
            for r, m in ((3.1, 10.0), (2.5, 12.0), (3.6, 9.0))]
    out = bench.merge_runs(runs)
    assert out["device"] == "cpu:cpu x1"
    assert out["step/block_all/speedup_vs_dense"] == 3.1  # the median, not the mean (3.07)
    assert out["step/block_all/speedup_vs_dense/runs"] == [3.1, 2.5, 3.6]
    assert out["step/block_all/ms"] == 10.0
    assert "median 3.10x over 3 runs (2.50-3.60x)" in capsys.readouterr().out
    assert bench.merge_runs(runs[:1]) == runs[0]  # one run: its figures as they are
