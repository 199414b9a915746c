"""benchmarks/long_context.py runs end to end at tiny sizes and reports every figure: prefill
times of dense, causal block-sparse and each method (with its estimation and density), the
token-granular vertical-slash path, and the decode step with Quest and streaming heads."""
import importlib
import pathlib

BENCH_DIR = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


def test_long_context_benchmark_reports_every_figure(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    bench = importlib.import_module("long_context")
    out = bench.main(["--lengths", "512", "--decode_cache", "512", "--quest_pages", "8",
                      "--reps", "1", "--budget", "0.5"])
    methods = ("xattention", "flexprefill", "minference")
    times = out["prefill"][512]
    assert set(times) == {"dense", "causal_block_sparse", "minference_tiles_uncapped",
                          "minference_token", *methods, *(f"{m}_estimate" for m in methods)}
    assert all(t > 0 for t in times.values())
    assert all(0 < out["density"][512][m] <= 1 for m in methods)
    assert set(out["ratios"][512]) == set(methods)
    assert all(out["decode"][k] > 0 for k in ("dense", "quest", "streaming_heads",
                                              "quest_vs_dense", "streaming_vs_dense"))
