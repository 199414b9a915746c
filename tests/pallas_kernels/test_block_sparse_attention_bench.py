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
    assert set(out) == {"sparsity_0", "sparsity_0.75", "causal", "forward", "device"}
    assert all(out[k] > 0 for k in ("sparsity_0", "sparsity_0.75", "causal"))
    assert set(out["forward"]) == {"sparsity_0", "sparsity_0.75", "causal"}
    assert all(r > 0 for r in out["forward"].values())


def test_benchmark_gpu_rows_in_interpret_mode(bench_modules):
    """The GPU-only rows (the kernel on layouts the op sends to cuDNN) run end to end."""
    bench, _ = bench_modules
    out = bench.main(["--quick", "--backend", "gpu", "--interpret", "--seq-lens", "128",
                      "--sparsities", "0,0.5"])
    assert set(out["kernel_only"]) == {"sparsity_0", "causal"}
    assert all(set(r) == {"seq_128"} and r["seq_128"] > 0 for r in out["kernel_only"].values())
    assert out["sparsity_0.5"] > 0 and out["forward"]["causal"] > 0


def test_tuner_quick_picks_a_correct_winner_per_pass(bench_modules):
    _, tune = bench_modules
    backward_passes = [p for p in gcfg.PASSES if p != "fwd"]  # fwd: the patterns test
    out = tune.main(["--quick", "--passes", ",".join(backward_passes)])
    assert set(out["winners"]) == set(backward_passes)
    for pc in out["winners"].values():
        assert gcfg.PassConfig(**pc).rows in (16, 32)
    assert all(v > 0 for v in out["current_default_over_best"].values())
    assert out["backward"] in gcfg.BACKWARDS  # all backward passes ran: a choice is made


def test_tuner_rejects_unknown_pass(bench_modules):
    _, tune = bench_modules
    with pytest.raises(ValueError, match="--passes"):
        tune.main(["--quick", "--passes", "fwd,dkvq"])


def test_tuner_rejects_a_bucket_below_the_timed_length(bench_modules):
    _, tune = bench_modules
    with pytest.raises(ValueError, match="--max-seq: 4096"):
        tune.main(["--seq", "8192", "--max-seq", "4096"])


def test_pick_entry_by_head_dim_then_sequence_length():
    entries = [{"max_head_dim": 64, "tag": "d64"},
               {"max_head_dim": 128, "tag": "d128"},
               {"max_head_dim": 128, "max_seq": 4096, "tag": "d128_4k"},
               {"max_head_dim": 128, "max_seq": 1024, "tag": "d128_1k"}]
    pick = lambda d, s=None: gcfg.pick_entry(entries, d, s)["tag"]
    assert pick(32) == pick(64, 512) == "d64"  # no length bucket: covers all
    assert pick(128) == pick(100, 8192) == pick(256, 32768) == "d128"
    assert pick(128, 1024) == pick(128, 64) == "d128_1k"
    assert pick(128, 1025) == pick(128, 4096) == "d128_4k"
    only_buckets = entries[2:]  # nothing covers 8192: the largest bucket
    assert gcfg.pick_entry(only_buckets, 128, 8192)["tag"] == "d128_4k"


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
    tune.write_tuning(128, {"bwd": new_bwd}, "test device", backward="cached")
    assert before.backward != "cached" and gcfg.default_config(128).backward == "cached"
    assert gcfg.default_config(128).bwd == new_bwd
    entry = next(e for e in json.loads(path.read_text())["entries"] if e["max_head_dim"] == 128)
    assert "bwd" not in entry.get("untuned", [])  # measured now

    short = tune.write_tuning(128, {"fwd": new_bwd}, "test device", max_seq=4096)
    assert short["max_seq"] == 4096 and "fwd" not in short["untuned"]
    assert set(short["untuned"]) == set(gcfg.PASSES) - {"fwd"}  # copied, not measured
    assert gcfg.default_config(128, 4096).fwd == new_bwd
    assert gcfg.default_config(128, 4096).dq == gcfg.default_config(128).dq  # copied
    assert gcfg.default_config(128, 8192).fwd == new_fwd  # longer: the general entry
    assert gcfg.default_config(128).fwd == new_fwd
    assert gcfg.default_config(64).backward == before.backward  # other bucket kept
    gcfg.default_config.cache_clear()


def test_tuner_scores_over_patterns_so_a_causal_loss_is_not_hidden(bench_modules):
    _, tune = bench_modules
    # (rows, cols, warps, stages), correct, seconds per pattern
    fast_random = ((64, 64, 4, 3), True, {"random": 1.00, "causal": 1.35})
    balanced = ((64, 64, 4, 2), True, {"random": 1.01, "causal": 1.00})
    wrong = ((32, 32, 4, 2), False, {"random": 0.10, "causal": 0.10})
    cand, score, times = tune.best_of([fast_random, balanced, wrong])
    assert cand == (64, 64, 4, 2) and times == balanced[2]
    assert score == pytest.approx((1.01 * 1.00) ** 0.5)
    only_random = [(c, ok, {"random": t["random"]}) for c, ok, t in (fast_random, balanced)]
    assert tune.best_of(only_random)[0] == (64, 64, 4, 3)
    assert tune.best_of([wrong]) is None


def test_tuner_times_the_patterns_it_is_given(bench_modules, capsys):
    _, tune = bench_modules
    out = tune.main(["--quick", "--passes", "fwd", "--patterns", "banded,causal"])
    assert set(out["winners"]) == {"fwd"}
    header = next(line for line in capsys.readouterr().out.splitlines()
                  if line.startswith("fwd:") and "rows" in line)
    assert "banded ms" in header and "causal ms" in header and "random ms" not in header
    with pytest.raises(ValueError, match="--patterns"):
        tune.main(["--quick", "--patterns", "random,diagonal"])
