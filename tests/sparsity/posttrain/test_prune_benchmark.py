"""benchmarks/prune.py runs end to end at a tiny size and reports every phase of SparseGPT
(and, with SPARSEGPT_REFERENCE naming a checkout of the reference code and torch installed,
the reference's phases and the ratios); bad settings are refused by name."""
import importlib
import json
import os
import pathlib

import pytest

BENCH_DIR = pathlib.Path(__file__).resolve().parents[3] / "benchmarks"
REFERENCE = os.environ.get("SPARSEGPT_REFERENCE")


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    return importlib.import_module("prune")


def test_tiny_run_reports_every_phase(bench, capsys):
    args = ["--dims", "128", "--samples", "4", "--seq_len", "32", "--batch", "2",
            "--repeat", "1", "--all_cores"]
    if REFERENCE:
        args += ["--reference", REFERENCE]
    out = bench.main(args)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out
    assert out["device"].startswith("cpu") and out["stats_s_128"] >= 0
    for mode in ("unstructured", "2:4"):
        assert out[f"{mode}_128_s"] > 0 and out[f"{mode}_128_compile_s"] > 0
        for phase in ("factor", "solve", "select"):
            assert f"{mode}_128_{phase}_s" in out
        if REFERENCE:
            assert out[f"{mode}_128_ratio"] > 0 and out[f"{mode}_128_ref_s"] > 0
            assert out[f"{mode}_128_mask_agreement"] > 0.999
            assert out[f"{mode}_128_ref_error_over_error"] == pytest.approx(1.0, abs=0.01)


def test_bad_settings_are_refused(bench, tmp_path):
    with pytest.raises(ValueError, match="--dims=\\[100\\]"):
        bench.main(["--dims", "100", "--all_cores"])
    with pytest.raises(ValueError, match="--samples=5 must be a multiple of --batch=2"):
        bench.main(["--samples", "5", "--batch", "2", "--all_cores"])
    with pytest.raises(ValueError, match="has no sparsegpt.py"):
        bench.main(["--reference", str(tmp_path), "--all_cores"])
