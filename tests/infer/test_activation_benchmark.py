"""benchmarks/activation_sparsity.py runs end to end at tiny sizes (CPU) and reports every
figure the activation sparsity guide quotes; its sparsities are the stated ones."""
import importlib
import json
import pathlib

import pytest

BENCH_DIR = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"
TINY = ["--embed", "64", "--mlp", "256", "--layers", "1", "--prompt", "4", "--new_tokens", "6",
        "--reps", "2", "--model_reps", "2", "--stream_mb", "0.25"]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    return importlib.import_module("activation_sparsity")


def test_tiny_run_reports_every_figure(bench, capsys):
    assert bench.main(TINY) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for kind in ("input", "neuron"):
        for pct in (50, 70, 90):
            key = f"mlp_{kind}_{pct}"
            assert out[key + "_speedup"] > 0
            assert out[key + "_achieved_sparsity"] == pytest.approx(pct / 100, abs=0.03)
    for pct in (0, 50, 70, 90):
        for suffix in ("decode_step_ms", "decode_speedup", "tokens_per_s", "speedup"):
            assert f"model_teal{pct}_{suffix}" in out
            assert f"model_teal{pct}_masked_dense_{suffix}" in out
    # At 0% the defaults keep every site dense (above max_density); gathering all of them
    # is another program, timed beside it.
    assert "model_teal0_all_gathered_decode_speedup" in out
    for name in ("q", "k_v", "o", "gate_up", "down"):
        assert out[f"rows_{name}_speedup"] > 0
        assert out[f"rows_{name}_gb_per_s"] > 0


def test_decode_step_is_the_generation_less_its_prefill(bench, monkeypatch):
    """With timings of `prefill + (n - 1) * step`, the reported decode step is `step` and the
    end-to-end ratio includes the prefill."""
    prefill, new = 0.020, 6
    step = {"dense": 0.010, "teal50": 0.004}

    def fake_timer(cases, reps):
        out = {}
        for name in cases:
            model = name.split("@")[0]
            per = step.get(model, 0.008)
            out[name] = prefill + (0 if name.endswith("@prefill") else (new - 1) * per)
        return out

    monkeypatch.setattr(bench, "timed_together", fake_timer)
    out = bench.model_bench(64, 256, 1, 4, new, 1)
    assert out["model_dense_decode_step_ms"] == pytest.approx(10.0)
    assert out["model_teal50_decode_step_ms"] == pytest.approx(4.0)
    assert out["model_teal50_decode_speedup"] == pytest.approx(2.5)
    assert out["model_teal50_speedup"] == pytest.approx((prefill + 5 * 0.010) / (prefill + 5 * 0.004))
    assert out["model_dense_tokens_per_s"] == pytest.approx(new / (prefill + 5 * 0.010))


def test_one_new_token_is_refused(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--new_tokens", "1"])
    assert "--new_tokens=1 must be >= 2" in capsys.readouterr().err
