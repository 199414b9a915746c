"""Do compact sparse weights pay? Time and memory of block-sparse and Monarch projections
against dense ones, in one run.

1. One projection --in_features -> --out_features on --tokens tokens (float32), forward +
   backward (x @ W, then dx and dW from a fixed output gradient), dense against
   block-sparse at densities --densities with blocks --blocks, and Monarch with nblocks
   --nblocks, each through the model's own `Projection` module and weight format.
2. A whole train step (`build_run` + `make_train_step`, jitted with the state donated and
   looped as the trainer does) of an MLP-heavy model (--embed, --mlp, --layers, --seq,
   --batch): dense; today's masked
   method at --step_density (configs/sparsity/static_random.gin: a dense matrix times a
   mask); every projection block-sparse at --step_density (blocks --step_block); only the
   MLP block-sparse.
3. For the same cases: bytes of params + optimizer state (+ masks) of the sparse layers
   (those the formats or masks make sparse) and the compiled step's temporary memory.
4. Decode (a KV-cache generation at batch 1, --new_tokens tokens after a --prompt token
   prompt): the step time of the compact model at --step_density against its dense twin
   (a generation of --new_tokens tokens less one of a single token, over the steps between).

Cases are timed in turns (every case once per round, medians over --rounds rounds), so load
that comes and goes on a shared machine hits all of them alike. Each part runs in a process of
its own, as a training or decode run would: a process's allocator keeps the layout the previous
part's gigabytes of temporaries left, and the compact train step measured 4.04 s after the
projection part in the same process against 3.20 s in a fresh one (--one_process keeps every
part in this process). Prints one line per figure and, last, a JSON object with every figure,
each ratio (dense time / case time, > 1: faster; bytes ratios case / dense) and the device.

    python benchmarks/sparse_weights.py                 # the issue's sizes (minutes on CPU)
    python benchmarks/sparse_weights.py --quick         # small sizes, a smoke test
    python benchmarks/sparse_weights.py --repeats 3     # medians over 3 fresh runs per part
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import config, hugepages
from sparsejax.infer.generate import make_generate_fn
from sparsejax.models.formats import WEIGHT_FORMATS, FormatSpec, Projection
from sparsejax.models.transformer import ModelConfig, Transformer
from sparsejax.parallel.mesh import make_mesh
from sparsejax.parallel.rules import LOGICAL_RULES, batch_sharding, replicated
from sparsejax.train.build import build_run
from sparsejax.train.step import make_train_step
from sparsejax.train.trainer import TrainConfig, global_batch
from timing import timed_together


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{d.device_kind} x{jax.device_count()}"


def bind_format(name: str, setting: dict[str, Any]) -> None:
    """Binds a format's settings (gin is read when the format is built, at trace time)."""
    cls = WEIGHT_FORMATS.get(name).__name__
    for key, value in setting.items():
        gin.bind_parameter(f"{cls}.{key}", value)


def projection_case(fmt: str, setting: dict, x: jax.Array, dy: jax.Array, out: int):
    """(jitted fwd+bwd, args) of one Projection in format `fmt` with `setting`."""
    gin.clear_config()
    bind_format(fmt, setting)
    layer = Projection(out, ("embed", "mlp"), formats=FormatSpec(fmt))
    variables = nn.meta.unbox(layer.init(jax.random.key(0), x))
    params = variables["params"]
    weights = {k: v for k, v in params.items() if jnp.issubdtype(v.dtype, jnp.floating)}
    layout = {k: v for k, v in params.items() if k not in weights}

    def fwd_bwd(weights, x):
        y, vjp = jax.vjp(lambda w, x: layer.apply({"params": {**w, **layout}}, x), weights, x)
        return y, vjp(dy)  # y returned: XLA would drop an unused forward

    fn = jax.jit(fwd_bwd)
    jax.block_until_ready(fn(weights, x))  # trace now, while this case's bindings hold
    return fn, (weights, x)


def part_projection(args) -> dict[str, Any]:
    kx, kd = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (args.tokens, args.in_features), jnp.float32)
    dy = jax.random.normal(kd, (args.tokens, args.out_features), jnp.float32)
    cases = {"dense": projection_case("dense", {}, x, dy, args.out_features)}
    for b in args.blocks:
        for d in args.densities:
            cases[f"block{b}_d{d:g}"] = projection_case(
                "block_sparse", dict(block_in=b, block_out=b, density=d), x, dy,
                args.out_features)
    if "monarch" in WEIGHT_FORMATS:
        for n in args.nblocks:
            cases[f"monarch{n}"] = projection_case("monarch", dict(nblocks=n), x, dy,
                                                   args.out_features)
    t = timed_together(cases, args.rounds, warm=args.warm)
    out = {}
    for name, sec in t.items():
        ratio = t["dense"] / sec
        out[f"projection/{name}/ms"] = 1e3 * sec
        out[f"projection/{name}/speedup"] = ratio
        print(f"projection {args.in_features}->{args.out_features} x {args.tokens} tokens, "
              f"fwd+bwd: {name:16s} {1e3 * sec:8.1f} ms  {ratio:5.2f}x dense", flush=True)
    return out


STEP_CASES = ("dense", "masked", "block_all", "block_mlp")


def step_bindings(name: str, args) -> tuple[list[str], list[str]]:
    """(gin files, bindings) of a train-step case."""
    model = [f"ModelConfig.{k}={v}" for k, v in dict(
        embed_dim=args.embed, mlp_dim=args.mlp, num_layers=args.layers, num_heads=args.heads,
        num_kv_heads=args.heads, head_dim=args.embed // args.heads,
        max_seq_len=args.seq).items()]
    run = [f"TrainConfig.seq_len={args.seq}", f"TrainConfig.global_batch_size={args.batch}",
           "TrainConfig.num_steps=1000", "make_mesh.num_devices=1"]
    blocks = [f"BlockSparse.block_in={args.step_block}",
              f"BlockSparse.block_out={args.step_block}",
              f"BlockSparse.density={args.step_density}"]
    files = {"dense": [], "masked": ["sparsity/static_random.gin"]}.get(name, [])
    extra = {"masked": [f"MaskedPruningMethod.density={args.step_density}"],
             "block_all": ["ModelConfig.weight_format='block_sparse'", *blocks],
             "block_mlp": ["ModelConfig.weight_format_overrides={'mlp/': 'block_sparse'}",
                           *blocks]}.get(name, [])
    return files, model + run + extra


def sparse_layer_bytes(state: Any) -> int:
    """Bytes of the attention/MLP projections' params, optimizer state and masks."""
    total = 0
    for path, x in jax.tree_util.tree_leaves_with_path(
            (state.params, state.opt_state, state.sparsity)):
        p = jax.tree_util.keystr(path)
        if ("attn" in p or "mlp" in p) and "norm" not in p and getattr(x, "ndim", 0) >= 2:
            total += x.size * x.dtype.itemsize
    return total


def build_step(name: str, args, batch):
    files, bindings = step_bindings(name, args)
    config.parse_gin(files, bindings)
    run = build_run(TrainConfig(), mesh=make_mesh(num_devices=1))
    bsh = batch_sharding(run.mesh)
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(LOGICAL_RULES):
        state = run.init_state()
        step = jax.jit(make_train_step(run.model, run.tx, run.sparsity_method),
                       in_shardings=(run.state_shardings, bsh),
                       out_shardings=(run.state_shardings, replicated(run.mesh)),
                       donate_argnums=(0,))  # as the trainer's step: the state is updated in place
        gb = global_batch(batch, bsh)
        compiled = step.lower(state, gb).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
    nbytes = sparse_layer_bytes(state)
    box = [state]

    def train_step():  # state = step(state, batch), as in the training loop
        box[0], metrics = compiled(box[0], gb)
        return metrics["loss"]

    return (train_step, ()), nbytes, temp


def part_step(args) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 259, size=(args.batch, args.seq + 1), dtype=np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "loss_mask": np.ones((args.batch, args.seq), np.float32),
             "segment_ids": np.ones((args.batch, args.seq), np.int32),
             "positions": np.tile(np.arange(args.seq, dtype=np.int32), (args.batch, 1))}
    cases, nbytes, temps = {}, {}, {}
    for name in STEP_CASES:
        cases[name], nbytes[name], temps[name] = build_step(name, args, batch)
    t = timed_together(cases, args.rounds, warm=args.warm)
    out = {}
    for name in STEP_CASES:
        out[f"step/{name}/ms"] = 1e3 * t[name]
        out[f"step/{name}/speedup_vs_dense"] = t["dense"] / t[name]
        out[f"step/{name}/speedup_vs_masked"] = t["masked"] / t[name]
        out[f"memory/{name}/sparse_layer_bytes"] = nbytes[name]
        out[f"memory/{name}/sparse_layer_bytes_ratio"] = nbytes[name] / nbytes["dense"]
        out[f"memory/{name}/temp_bytes"] = temps[name]
        out[f"memory/{name}/temp_ratio"] = temps[name] / temps["dense"]
        print(f"train step (embed {args.embed}, mlp {args.mlp}, {args.layers} layers, "
              f"{args.batch}x{args.seq} tokens) {name:10s} {1e3 * t[name]:8.1f} ms  "
              f"{t['dense'] / t[name]:5.2f}x dense  {t['masked'] / t[name]:5.2f}x masked | "
              f"projection params+opt+masks {nbytes[name] / 2**20:7.1f} MiB "
              f"({nbytes[name] / nbytes['dense']:.3f} of dense), temp "
              f"{temps[name] / 2**20:7.1f} MiB ({temps[name] / temps['dense']:.2f})",
              flush=True)
    return out


def decode_case(weight_format: str, args):
    gin.clear_config()
    bind_format("block_sparse", dict(block_in=args.step_block, block_out=args.step_block,
                                     density=args.step_density))
    cfg = ModelConfig(embed_dim=args.embed, mlp_dim=args.mlp, num_layers=args.layers,
                      num_heads=args.heads, num_kv_heads=args.heads,
                      head_dim=args.embed // args.heads, max_seq_len=args.seq,
                      weight_format=weight_format)
    model = Transformer(cfg)
    prompt = jnp.ones((1, args.prompt), jnp.int32)
    params = nn.meta.unbox(model.init(jax.random.key(0), prompt)["params"])
    pos = jnp.arange(args.prompt, dtype=jnp.int32)[None]
    fns = {}
    for n in (1, args.new_tokens):
        fn = make_generate_fn(model, n, 0.0, 0, 1.0, True)
        call = (params, None, prompt, pos, jnp.ones_like(prompt), jax.random.key(0))
        compiled = fn.lower(*call).compile()
        fns[n] = (compiled, call)
    return fns


def part_decode(args) -> dict[str, Any]:
    cases = {}
    for fmt in ("dense", "block_sparse"):
        fns = decode_case(fmt, args)
        cases[f"{fmt}_1"], cases[f"{fmt}_n"] = fns[1], fns[args.new_tokens]
    t = timed_together(cases, args.rounds, warm=args.warm)
    steps = {f: (t[f"{f}_n"] - t[f"{f}_1"]) / (args.new_tokens - 1)
             for f in ("dense", "block_sparse")}
    if min(steps.values()) <= 0:  # the two generations' times differ by less than their noise
        raise RuntimeError(f"decode: a step time below the timing noise ({steps}); the machine "
                           f"is busy or --new_tokens={args.new_tokens} / --rounds={args.rounds} "
                           f"too few: use more")
    ratio = steps["dense"] / steps["block_sparse"]
    print(f"decode step at batch 1 (embed {args.embed}, mlp {args.mlp}, {args.layers} layers): "
          f"dense {1e3 * steps['dense']:.2f} ms, block-sparse at {args.step_density:g} "
          f"{1e3 * steps['block_sparse']:.2f} ms: {ratio:.2f}x", flush=True)
    return {"decode/dense/ms": 1e3 * steps["dense"],
            "decode/block_sparse/ms": 1e3 * steps["block_sparse"], "decode/speedup": ratio}


def run_part_process(part: str, argv: list[str]) -> dict[str, Any]:
    """Runs one part in a fresh Python process (`argv` with --parts=`part`); streams its
    lines and returns its figures (the JSON object it prints last)."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--parts", part, "--one_process"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    last = ""
    for line in proc.stdout:
        if line.startswith("{"):
            last = line
        else:
            print(line, end="", flush=True)
    if proc.wait() != 0:
        raise RuntimeError(f"part {part!r} failed (exit status {proc.returncode}): "
                           f"{' '.join(cmd)}")
    return json.loads(last)


def merge_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One part's figures over repeated runs: each number's median, and with more than one
    run, every run's value under key + '/runs' (speedups printed as median and range)."""
    if len(runs) == 1:
        return runs[0]
    out: dict[str, Any] = {}
    for key, value in runs[0].items():
        if not isinstance(value, (int, float)):
            out[key] = value
            continue
        values = [r[key] for r in runs]
        out[key] = float(np.median(values))
        out[f"{key}/runs"] = values
        if "speedup" in key:
            print(f"{key}: median {out[key]:.2f}x over {len(runs)} runs "
                  f"({min(values):.2f}-{max(values):.2f}x)", flush=True)
    return out


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="projection,step,decode")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--in_features", type=int, default=1024)
    p.add_argument("--out_features", type=int, default=4096)
    p.add_argument("--blocks", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.25, 0.1, 0.05])
    p.add_argument("--nblocks", type=int, nargs="+", default=[4, 8])
    p.add_argument("--embed", type=int, default=1024)
    p.add_argument("--mlp", type=int, default=4096)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--step_density", type=float, default=0.1)
    p.add_argument("--step_block", type=int, default=128)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=33)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warm", type=int, default=1,
                   help="untimed runs of a case before each timed one (timing.timed_together)")
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run each part this many times, each in a fresh process; every "
                        "figure is then the median over the runs, with the runs' values "
                        "beside it (key + '/runs')")
    p.add_argument("--one_process", action="store_true",
                   help="run every part in this process (by default each part runs in a "
                        "process of its own)")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.in_features, args.out_features = 256, 128, 256
        args.blocks, args.densities, args.nblocks = [32], [0.5, 0.25], [4]
        args.embed, args.mlp, args.layers, args.heads = 128, 256, 2, 4
        args.seq, args.batch, args.step_block, args.step_density = 64, 2, 32, 0.25
        args.new_tokens, args.rounds = 17, 5
    if args.new_tokens < 2:
        raise ValueError(f"--new_tokens={args.new_tokens} must be >= 2 (the decode step is "
                         f"the difference of two generations)")
    parts = args.parts.split(",")
    bad = set(parts) - {"projection", "step", "decode"}
    if bad:
        raise ValueError(f"--parts={args.parts!r}: {sorted(bad)} unknown; valid: projection, "
                         f"step, decode")
    if args.repeats < 1:
        raise ValueError(f"--repeats={args.repeats} must be >= 1")
    if (len(parts) > 1 or args.repeats > 1) and not args.one_process:
        result = {}
        for part in parts:
            runs = [run_part_process(part, sys.argv[1:] if argv is None else argv)
                    for _ in range(args.repeats)]
            result.update(merge_runs(runs))
        print(json.dumps(result))
        return result
    result: dict[str, Any] = {"device": device_name()}
    print(f"device: {result['device']}", flush=True)
    if "projection" in parts:
        result.update(part_projection(args))
    if "step" in parts:
        result.update(part_step(args))
    if "decode" in parts:
        result.update(part_decode(args))
    gin.clear_config()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    hugepages.ensure()  # time what the CLI runs (sparsejax/hugepages.py)
    main()
