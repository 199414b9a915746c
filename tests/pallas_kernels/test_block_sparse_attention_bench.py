"""The block-sparse attention benchmark and tuner run end to end (tiny shapes, CPU)."""
import dataclasses
import importlib
import json
import pathlib

import pytest

from pallas_kernels.block_sparse_attention import gpu_config as gcfg

BENCH_DIR = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def bench_modules(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    return (importlib.import_module("block_sparse_attention"),
            importlib.import_module("block_sparse_attention_tune"))


def test_benchmark_quick_reports_every_sparsity(bench_modules):
    bench, _ = bench_modules
    out = bench.main(["--quick", "--seq-lens", "256", "--sparsities", "0,0.75"])
    assert set(out) == {"sparsity_0", "sparsity_0.75", "causal", "device"}
    assert all(out[k] > 0 for k in ("sparsity_0", "sparsity_0.75", "causal"))


def test_tuner_quick_picks_a_correct_winner_per_pass(bench_modules):
    _, tune = bench_modules
    out = tune.main(["--quick"])
    assert set(out["winners"]) == set(gcfg.PASSES)
    for pc in out["winners"].values():
        assert gcfg.PassConfig(**pc).rows in (16, 32)
    assert all(v > 0 for v in out["current_default_over_best"].values())
    assert isinstance(out["fused_backward"], bool)  # all backward passes ran: a choice is made


def test_tuner_rejects_unknown_pass(bench_modules):
    _, tune = bench_modules
    with pytest.raises(ValueError, match="--passes"):
        tune.main(["--quick", "--passes", "fwd,dkvq"])


def test_write_tuning_updates_or_adds_a_head_dim_bucket(bench_modules, tmp_path, monkeypatch):
    _, tune = bench_modules
    path = tmp_path / "gpu_tuning.json"
    path.write_text(gcfg.TUNING_FILE.read_text())
    monkeypatch.setattr(gcfg, "TUNING_FILE", path)
    gcfg.default_config.cache_clear()
    before = gcfg.default_config(128)
    new_dq = gcfg.PassConfig(rows=32, cols=32, num_warps=2, num_stages=1)

    tune.write_tuning(64, {"dq": new_dq}, "test device")  # a new bucket, copied then updated
    entries = json.loads(path.read_text())["entries"]
    assert [e["max_head_dim"] for e in entries] == [64, 128]
    assert gcfg.default_config(64) == dataclasses.replace(before, dq=new_dq)
    assert gcfg.default_config(128) == before
    assert entries[0]["tuned_on"] == "test device"

    new_fwd = gcfg.PassConfig(rows=64, cols=32, num_warps=4, num_stages=2)
    tune.write_tuning(100, {"fwd": new_fwd}, "test device")  # 100 -> the 128 bucket
    assert gcfg.default_config(128) == dataclasses.replace(before, fwd=new_fwd)
    assert gcfg.default_config(512) == gcfg.default_config(128)  # past every bucket: the largest

    new_bwd = gcfg.PassConfig(rows=32, cols=64, num_warps=4, num_stages=3)
    tune.write_tuning(128, {"bwd": new_bwd}, "test device",
                      fused_backward=not before.fused_backward)
    assert gcfg.default_config(128).fused_backward is not before.fused_backward
    assert gcfg.default_config(128).bwd == new_bwd
    entry = next(e for e in json.loads(path.read_text())["entries"] if e["max_head_dim"] == 128)
    assert "bwd" not in entry.get("untuned", [])  # measured now
    assert gcfg.default_config(64).fused_backward is before.fused_backward  # other bucket kept
    gcfg.default_config.cache_clear()
