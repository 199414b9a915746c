"""What the scale features buy, measured in one run on this device:

1. compile time and program size of a train step of a 32-layer model, scanned
   (`ModelConfig.scan_layers`) vs unrolled: `scanned_vs_unrolled_compile` (target <= 0.2) and
   the StableHLO / optimized-HLO size ratios, for an all-dense model and (suffix `_moe`) one
   alternating dense and MoE layers (scan period 2);
2. step time of each remat policy (`ModelConfig.remat_policy`) against no remat, with the
   compiled temp memory of each;
3. compiled peak (temp) memory of the step with gradient accumulation over 1 / 2 / 4
   micro-batches (`TrainConfig.microbatches`).

    python benchmarks/scale.py [--quick]

Last line: a JSON summary with the device and every ratio.
"""
from __future__ import annotations

import argparse
import json
import time

import flax.linen as nn
import jax
import numpy as np

from sparsejax import config
from sparsejax.models.remat import REMAT_POLICIES
from sparsejax.models.transformer import ModelConfig
from sparsejax.parallel.mesh import make_mesh
from sparsejax.parallel.rules import LOGICAL_RULES, batch_sharding, replicated
from sparsejax.train.build import build_run
from sparsejax.train.step import make_train_step
from sparsejax.train.trainer import TrainConfig, global_batch

NAMES = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def step_fn(model_config: ModelConfig, batch: int, seq: int, microbatches: int = 1):
    """(run, jitted train step, abstract batch) on one device."""
    mesh = make_mesh(num_devices=1)
    cfg = TrainConfig(num_steps=100, global_batch_size=batch, seq_len=seq,
                      microbatches=microbatches)
    run = build_run(cfg, model_config=model_config, mesh=mesh)
    bsh = batch_sharding(mesh)
    fn = jax.jit(make_train_step(run.model, run.tx, run.sparsity_method,
                                 microbatches=microbatches),
                 in_shardings=(run.state_shardings, bsh),
                 out_shardings=(run.state_shardings, replicated(mesh)), donate_argnums=(0,))
    abstract = {n: jax.ShapeDtypeStruct((batch, seq), np.float32 if n == "loss_mask"
                                        else np.int32, sharding=bsh) for n in NAMES}
    return run, fn, abstract


def compile_stats(model_config: ModelConfig, batch: int, seq: int, microbatches: int = 1):
    run, fn, abstract = step_fn(model_config, batch, seq, microbatches)
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(LOGICAL_RULES):
        t0 = time.perf_counter()
        lowered = fn.lower(run.abstract_state, abstract)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    return {"trace_lower_s": t1 - t0, "compile_s": t2 - t1,
            "stablehlo_chars": len(lowered.as_text()), "hlo_chars": len(compiled.as_text()),
            "temp_mb": compiled.memory_analysis().temp_size_in_bytes / 2**20}


def synthetic(batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    tok = np.random.default_rng(seed).integers(0, 259, (batch, seq + 1), dtype=np.int32)
    return {"inputs": tok[:, :-1], "targets": tok[:, 1:],
            "loss_mask": np.ones((batch, seq), np.float32),
            "segment_ids": np.ones((batch, seq), np.int32),
            "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1))}


def step_times(configs: dict[str, ModelConfig], batch: int, seq: int, iters: int,
               rounds: int = 3) -> dict[str, float]:
    """Seconds per step of each config: compiled and warmed up first, then `rounds` rounds
    that time `iters` steps of every config in turn (the best round counts), so that load
    changes on a shared machine hit every config alike."""
    runs = {}
    for name, mc in configs.items():
        run, fn, _ = step_fn(mc, batch, seq)
        bsh = batch_sharding(run.mesh)
        with jax.set_mesh(run.mesh), nn.logical_axis_rules(LOGICAL_RULES):
            state = run.init_state()
            b = global_batch(synthetic(batch, seq), bsh)
            state, m = fn(state, b)
            jax.block_until_ready(m)
        runs[name] = [run, fn, state, b]
    best = {name: float("inf") for name in configs}
    for _ in range(rounds):
        for name, entry in runs.items():
            run, fn, state, b = entry
            with jax.set_mesh(run.mesh), nn.logical_axis_rules(LOGICAL_RULES):
                t0 = time.perf_counter()
                for _ in range(iters):
                    state, m = fn(state, b)
                jax.block_until_ready(m)
            best[name] = min(best[name], (time.perf_counter() - t0) / iters)
            entry[2] = state
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller models and fewer steps")
    args = ap.parse_args()
    config.parse_gin([], ["MoeMlp.num_experts=4", "MoeMlp.mlp_dim=64",
                          "MoeMlp.dispatch='pallas_gmm'"])
    dev = jax.devices()[0]
    print(f"device: {dev.platform}:{dev.device_kind} (one device)")
    out = {"device": f"{dev.platform}:{dev.device_kind}"}

    # 1. compile time and program size, 32 layers: all dense, and dense / MoE alternating
    deep = dict(num_layers=32, embed_dim=64, num_heads=4, num_kv_heads=2, head_dim=16,
                mlp_dim=128, max_seq_len=128)
    for label, kinds in (("", ("dense",)), ("_moe", ("dense", "moe"))):
        stats = {}
        for scan in (False, True):
            stats[scan] = compile_stats(ModelConfig(**deep, mlp_kinds=kinds, scan_layers=scan),
                                        4, 64)
            print(f"32 layers {kinds} {'scanned ' if scan else 'unrolled'}: trace+lower "
                  f"{stats[scan]['trace_lower_s']:.2f}s, compile {stats[scan]['compile_s']:.2f}s, "
                  f"StableHLO {stats[scan]['stablehlo_chars'] / 1e6:.2f}M chars, optimized HLO "
                  f"{stats[scan]['hlo_chars'] / 1e6:.2f}M chars")
        u, sc = stats[False], stats[True]
        out.update({
            f"unrolled_compile_s{label}": round(u["compile_s"], 2),
            f"scanned_compile_s{label}": round(sc["compile_s"], 2),
            f"scanned_vs_unrolled_compile{label}": round(sc["compile_s"] / u["compile_s"], 3),
            f"scanned_vs_unrolled_trace_lower{label}": round(
                sc["trace_lower_s"] / u["trace_lower_s"], 3),
            f"scanned_vs_unrolled_stablehlo{label}": round(
                sc["stablehlo_chars"] / u["stablehlo_chars"], 3),
            f"scanned_vs_unrolled_hlo{label}": round(sc["hlo_chars"] / u["hlo_chars"], 3)})

    # 2. step time per remat policy (scanned, 4 layers, dense + MoE)
    mid = dict(num_layers=4, embed_dim=128, num_heads=4, num_kv_heads=2, head_dim=32,
               mlp_dim=512, max_seq_len=256, mlp_kinds=("dense", "moe"), scan_layers=True)
    batch, seq, iters = (8, 128, 3) if args.quick else (16, 256, 5)
    # (timed in interleaved rounds; on a shared CPU the figures still vary between runs)
    configs = {name: ModelConfig(**mid, remat_policy=name) for name in REMAT_POLICIES}
    times = step_times(configs, batch, seq, iters)
    temps = {name: compile_stats(mc, batch, seq)["temp_mb"] for name, mc in configs.items()}
    for name in REMAT_POLICIES:
        print(f"remat {name:38s} step {times[name] * 1e3:8.1f} ms "
              f"({times[name] / times['none']:.2f}x none), temp {temps[name]:7.1f} MB "
              f"({temps[name] / temps['none']:.2f}x none)")
    out["remat_step_vs_none"] = {n: round(t / times["none"], 3) for n, t in times.items()}
    out["remat_temp_vs_none"] = {n: round(t / temps["none"], 3) for n, t in temps.items()}
    out["remat_step_ms"] = {n: round(t * 1e3, 2) for n, t in times.items()}

    # 3. peak memory with gradient accumulation
    mc = ModelConfig(**{**mid, "scan_layers": False})
    acc = {k: compile_stats(mc, 16, seq, k)["temp_mb"] for k in (1, 2, 4)}
    for k, mb in acc.items():
        print(f"microbatches {k}: temp {mb:7.1f} MB ({mb / acc[1]:.2f}x k=1)")
    out["microbatch_temp_mb"] = {k: round(v, 1) for k, v in acc.items()}
    out["microbatch_temp_vs_1"] = {k: round(v / acc[1], 3) for k, v in acc.items()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
