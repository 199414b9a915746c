"""Post-training pruning cost: seconds per layer for SparseGPT and Wanda, the SparseGPT solve's
FLOP/s as a fraction of this machine's measured matmul peak, and whole-model times.

    python benchmarks/prune.py                       # 2048² and 4096² layers, base config
    python benchmarks/prune.py --dims 1024 --tokens 32768 --model tiny.gin   # quick

Per layer (a [d, d] kernel, `--tokens` calibration tokens, default 128 x 2048):
  * stats: accumulating the layer's input statistics over the calibration tokens (the
    driver's jitted `input_stats`, chunks of 4096 tokens; SparseGPT needs XᵀX, Wanda only
    its diagonal, computed here as Wanda computes it: the column sums of x²);
  * solve: SparseGPT's inverse-Hessian factor and column-block solve at 50% (block 128), or
    Wanda's score and per-output selection.
The solve's useful FLOPs: 2/3 d³ (a Cholesky, d³/3, and a triangular inverse, d³/3) + d³
(lazy updates of the trailing columns) + 2 d² B (in-block updates); this implementation
executes d³/3 + d³ (the inverse as a triangular solve against I) + 2 d³ (the lazy update
over all columns, masked) + 2 d² B. The peak is the best of a few
[4096, 4096] x [4096, 4096] float32 matmuls in the same run. Whole model: `prune_model` on
a random-init model of `--model` (default base.gin) with 128 sequences of its seq_len.
The last line is JSON with the ratios; the device is named.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sparsejax.sparsity.posttrain import sparsegpt, solvers, stats as stats_lib  # noqa: E402

CHUNK = 4096


def timed(fn, *args, repeat: int = 1):
    """(best seconds over `repeat` runs after one warm-up, result)."""
    out = jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best, out


def matmul_peak(n: int = 4096, repeat: int = 5) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    t, _ = timed(jax.jit(lambda a, b: a @ b), a, b, repeat=repeat)
    return 2.0 * n ** 3 / t


def layer_costs(d: int, tokens: int) -> dict:
    x = jax.random.normal(jax.random.key(2), (CHUNK, d), jnp.float32)
    w = jax.random.normal(jax.random.key(3), (d, d), jnp.float32) / np.sqrt(d)
    ones = jnp.ones(CHUNK, jnp.float32)
    chunks = max(1, tokens // CHUNK)

    full = jax.jit(lambda s, x: s + stats_lib.input_stats(x, ones))
    diag = jax.jit(lambda acc, x: acc + jnp.sum(x * x, axis=0))

    def accumulate(step, zero):
        acc = zero
        for _ in range(chunks):
            acc = step(acc, x)
        return acc

    zero = stats_lib.InputStats(jnp.zeros((d, d)), jnp.zeros(d), jnp.zeros(()))
    t_stats, s = timed(lambda: accumulate(full, zero))
    t_diag, sq = timed(lambda: accumulate(diag, jnp.zeros(d)))
    solve = jax.jit(lambda w, h: sparsegpt.solve_kernel(w, h, dampening=0.01, block_size=128,
                                                         sparsity=0.5))
    t_solve, _ = timed(solve, w, s.hessian)
    calib = stats_lib.LayerCalibration(stats_lib.InputStats(jnp.diag(sq), jnp.zeros(d),
                                                            jnp.zeros(())), None, 1)
    structure = solvers.make_structure("per_output")
    pruner = solvers.PRUNERS.get("wanda")()
    t_wanda, _ = timed(lambda: pruner.prune(w, calib, density=0.5, structure=structure))
    useful = 2.0 / 3.0 * d ** 3 + d ** 3 + 2.0 * d * d * 128
    executed = 4.0 / 3.0 * d ** 3 + 2.0 * d ** 3 + 2.0 * d * d * 128
    return {"d": d, "tokens": chunks * CHUNK, "sparsegpt_stats_s": t_stats,
            "sparsegpt_solve_s": t_solve, "sparsegpt_s": t_stats + t_solve,
            "wanda_stats_s": t_diag, "wanda_solve_s": t_wanda, "wanda_s": t_diag + t_wanda,
            "solve_useful_flops": useful, "solve_executed_flops": executed,
            "stats_flops": 2.0 * chunks * CHUNK * d * d}


def whole_model(gin_file: str, samples: int) -> dict:
    """prune_model seconds for SparseGPT and Wanda on a random-init model of `gin_file`."""
    import flax.linen as nn
    from sparsejax import config as config_lib
    from sparsejax.models.transformer import ModelConfig, Transformer, padded_params
    from sparsejax.parallel.mesh import make_mesh
    from sparsejax.sparsity.posttrain.config import PruneConfig
    from sparsejax.sparsity.posttrain.driver import CalibrationSet, prune_model
    from sparsejax.train.trainer import TrainConfig
    config_lib.parse_gin([gin_file], [])
    cfg, train = ModelConfig(), TrainConfig()
    rng = np.random.default_rng(0)
    tok = rng.integers(0, cfg.vocab_size, (samples, train.seq_len)).astype(np.int32)
    params = nn.meta.unbox(Transformer(cfg).init(jax.random.key(0), jnp.asarray(tok[:1])))["params"]
    calib = CalibrationSet(tok, tok, np.ones(tok.shape, np.float32),
                           np.broadcast_to(np.arange(tok.shape[1]), tok.shape).copy(),
                           np.ones(tok.shape, np.int32))
    out = {"model": gin_file, "samples": samples, "seq_len": train.seq_len}
    for method in ("sparsegpt", "wanda"):
        t0 = time.perf_counter()
        r = prune_model(cfg, params, None, calib, PruneConfig(method=method), mesh=make_mesh(),
                        valid=padded_params(cfg), batch_size=train.global_batch_size)
        out[f"{method}_s"] = time.perf_counter() - t0
        out[f"{method}_layers"] = len(r.report["layers"])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--tokens", type=int, default=128 * 2048)
    p.add_argument("--model", default="base.gin")
    p.add_argument("--samples", type=int, default=128)
    args = p.parse_args(argv)
    dev = jax.devices()[0]
    device = f"{dev.platform}:{dev.device_kind} x{jax.device_count()} ({os.cpu_count()} cores, " \
             f"{platform.processor() or platform.machine()})"
    print(f"device: {device}")
    peak = matmul_peak()
    layers = [layer_costs(d, args.tokens) for d in args.dims]
    peak = max(peak, matmul_peak())  # the best of before and after (a shared machine)
    print(f"measured f32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    ratios = {"device": device, "matmul_peak_gflops": round(peak / 1e9, 1)}
    for r in layers:
        d = r["d"]
        frac = r["solve_useful_flops"] / r["sparsegpt_solve_s"] / peak
        print(f"[{d} x {d}] {r['tokens']} tokens | SparseGPT {r['sparsegpt_s']:.2f} s "
              f"(stats {r['sparsegpt_stats_s']:.2f} s, {r['stats_flops'] / r['sparsegpt_stats_s'] / peak:.2f} "
              f"of peak; solve {r['sparsegpt_solve_s']:.2f} s, {frac:.3f} of peak useful, "
              f"{r['solve_executed_flops'] / r['sparsegpt_solve_s'] / peak:.3f} executed) | "
              f"Wanda {r['wanda_s']:.3f} s (stats {r['wanda_stats_s']:.3f} s, select "
              f"{r['wanda_solve_s']:.3f} s)")
        ratios[f"sparsegpt_s_per_layer_{d}"] = round(r["sparsegpt_s"], 3)
        ratios[f"wanda_s_per_layer_{d}"] = round(r["wanda_s"], 3)
        ratios[f"sparsegpt_over_wanda_{d}"] = round(r["sparsegpt_s"] / r["wanda_s"], 2)
        ratios[f"sparsegpt_solve_fraction_of_peak_{d}"] = round(frac, 4)
        ratios[f"sparsegpt_stats_fraction_of_peak_{d}"] = round(
            r["stats_flops"] / r["sparsegpt_stats_s"] / peak, 4)
    if args.model:
        w = whole_model(args.model, args.samples)
        print(f"whole model {w['model']} ({w['sparsegpt_layers']} kernels, {w['samples']} x "
              f"{w['seq_len']} calibration tokens): SparseGPT {w['sparsegpt_s']:.1f} s, Wanda "
              f"{w['wanda_s']:.1f} s")
        ratios.update({f"whole_model_{k}": round(v, 1) for k, v in w.items()
                       if k.endswith("_s")})
        ratios["whole_model_sparsegpt_over_wanda"] = round(w["sparsegpt_s"] / w["wanda_s"], 2)
    print(json.dumps(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
