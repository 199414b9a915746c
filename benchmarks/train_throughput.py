"""Training throughput of the base config: tokens/s and model FLOPs utilization (MFU) as a
fraction of this machine's own dense-matmul FLOP/s, measured in the same run.

    python benchmarks/train_throughput.py [--steps 20] [--gin_file configs/base.gin]

Last line: {"tokens_per_s": ..., "mfu_vs_matmul_peak": ..., ...}. On a GPU the MFU is also
reported against the device's datasheet peak where known.
"""
from __future__ import annotations

import argparse
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import config, hugepages
from sparsejax.data import pipeline
from sparsejax.parallel.rules import LOGICAL_RULES, batch_sharding, replicated
from sparsejax.train.build import build_run
from sparsejax.train.flops import measure_matmul_peak
from sparsejax.train.step import make_train_step
from sparsejax.train.trainer import TrainConfig, global_batch

# bf16 dense peak TFLOP/s by device kind (datasheet, dense, no sparsity).
DATASHEET_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0,
                         "TPU v5e": 197.0, "TPU v5p": 459.0}


def matmul_peak_flops(n: int = 2048, dtype=jnp.float32, repeats: int = 10) -> float:
    """Best-of FLOP/s of an n x n x n matmul on the default device."""
    return measure_matmul_peak(n, jnp.dtype(dtype).name, repeats)


def model_flops_per_token(params, cfg, seq_len: int) -> float:
    """6 x (non-embedding params) + attention score/value FLOPs (fwd+bwd), per token."""
    n = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(params)
            if "embed" not in jax.tree_util.keystr(p))
    attn = 6 * 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len / 2  # causal half
    return 6.0 * n + attn


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gin_file", default="base.gin")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--gin", action="append", default=[], help="extra gin bindings A.b=V")
    args = ap.parse_args()
    config.parse_gin([args.gin_file], args.gin)
    cfg = TrainConfig()
    run = build_run(cfg)
    mesh = run.mesh
    bsh = batch_sharding(mesh)
    it = pipeline.make_iterator("train", global_batch_size=cfg.global_batch_size,
                                seq_len=cfg.seq_len, seed=cfg.seed, dataset=cfg.dataset,
                                data_dir=cfg.data_dir)
    batches = [next(it) for _ in range(args.steps + args.warmup)]
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        state = run.init_state()
        step = jax.jit(make_train_step(run.model, run.tx, run.sparsity_method),
                       in_shardings=(run.state_shardings, bsh),
                       out_shardings=(run.state_shardings, replicated(mesh)), donate_argnums=(0,))
        for b in batches[:args.warmup]:
            state, m = step(state, global_batch(b, bsh))
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for b in batches[args.warmup:]:
            state, m = step(state, global_batch(b, bsh))
        jax.block_until_ready(m)
        elapsed = time.perf_counter() - t0
    tokens = args.steps * cfg.global_batch_size * cfg.seq_len
    tokens_per_s = tokens / elapsed
    flops_per_token = model_flops_per_token(state.params, run.model_config, cfg.seq_len)
    achieved = tokens_per_s * flops_per_token
    peak = matmul_peak_flops(dtype=jnp.bfloat16 if run.model_config.dtype == "bfloat16"
                             else jnp.float32)
    device = jax.devices()[0]
    result = {
        "device": f"{device.platform}:{device.device_kind} x{jax.device_count()}",
        "tokens_per_s": round(tokens_per_s, 1),
        "step_time_s": round(elapsed / args.steps, 4),
        "model_tflops_per_s": round(achieved / 1e12, 4),
        "matmul_peak_tflops_per_s": round(peak / 1e12, 4),
        "mfu_vs_matmul_peak": round(achieved / peak, 3),
        "final_loss": float(np.asarray(m["loss"])),
    }
    for kind, tflops in DATASHEET_PEAK_TFLOPS.items():
        if kind in device.device_kind:
            result["mfu_vs_datasheet_peak"] = round(achieved / (tflops * 1e12 * jax.device_count()), 3)
    print(f"{cfg.global_batch_size}x{cfg.seq_len} tokens/step, {args.steps} steps in "
          f"{elapsed:.2f}s; model {flops_per_token / 1e6:.1f} MFLOP/token")
    print(json.dumps(result))


if __name__ == "__main__":
    hugepages.ensure()  # time what the CLI runs (sparsejax/hugepages.py)
    main()
