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
