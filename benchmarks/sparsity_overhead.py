"""Step-time overhead of sparse training over dense, amortized over mask updates.

    python benchmarks/sparsity_overhead.py [--gin_file base.gin] [--steps 10] [--rounds 3]
    python benchmarks/sparsity_overhead.py --quick          # configs/tiny.gin, more steps

Methods (configs/sparsity/*.gin on top of the model config): dense, static (static_random),
gmp (gradual magnitude, update every --gmp_frequency steps) and rigl (update every
--rigl_frequency steps). Each is built and jitted exactly as the trainer does it
(`build.build_run`, `step.make_train_step` jitted with the state shardings and donation,
`run.sparsity_update_fn()` for the mask update). The timed loop runs `--rounds` rounds; in each
round every method runs `--steps` ordinary steps in turn (interleaved, so load drift on a
shared machine hits all methods alike) and then one mask-update call. A method's amortized
step time is

    step + update / frequency      (= (N * step + update * N / frequency) / N)

with `step` the best (min) per-round mean step time and `update` the median update time.
`--breakdown` adds RigL variants with one source of per-step overhead removed each (see
VARIANTS), to locate the overhead. The last line is JSON,
{"static": ratio, "gmp": ratio, "rigl": ratio, "device": ...}, each ratio = amortized step
time / dense step time (target <= 1.05).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import optax

from sparsejax import config
from sparsejax.data import pipeline
from sparsejax.parallel.rules import LOGICAL_RULES, batch_sharding, replicated
from sparsejax.sparsity import masks as masks_lib
from sparsejax.train import optim as train_optim
from sparsejax.train.build import build_run
from sparsejax.train.step import make_train_step
from sparsejax.train.trainer import TrainConfig, global_batch

METHODS = ("dense", "static", "gmp", "rigl")
GIN = {"dense": "sparsity/dense.gin", "static": "sparsity/static_random.gin",
       "gmp": "sparsity/gmp.gin", "rigl": "sparsity/rigl.gin"}
# --breakdown: RigL's train step with one source of overhead removed at a time (diagnostic
# only: "nomaskopt" does not keep pruned weights at zero).
VARIANTS = {
    "rigl-nofwdmask": ("fwd",),           # forward_params -> params (pruned weights are 0 anyway)
    "rigl-notrack": ("track",),           # on_grads without the per-step density reduction
    "rigl-postmask": ("premask",),        # optimizer masks only the final updates
    "rigl-nomaskopt": ("opt",),           # optimizer not masked at all
    "rigl-lean": ("fwd", "track", "premask"),
    # masked (not straight-through) forward, so ordinary-step grads are already sparse and the
    # optimizer's gradient pre-mask is redundant (same clipping norm and moments as now);
    # here the update step shares it, a real fix would keep the STE for the update only
    "rigl-sparsegrad": ("hardfwd", "premask"),
}


def post_masked_optimizer(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Like sparsity.optim.masked_optimizer (same state), but masks only the updates."""
    inner = optax.with_extra_args_support(tx)

    def update_fn(updates, state, params=None, *, sparsity, **extra_args):
        u, new_inner = inner.update(updates, state, params, **extra_args)
        return masks_lib.apply_masks(u, sparsity["masks"]), new_inner

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def unmasked_optimizer(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    return optax.with_extra_args_support(tx)


def apply_variant(run, removed: tuple[str, ...], total_steps: int):
    """(method, tx) for the train step with the named overheads removed."""
    method, tx = run.sparsity_method, run.tx
    if "fwd" in removed:
        method.forward_params = lambda params, sparsity, step=0, rng=None: params
    if "hardfwd" in removed:
        method.forward_params = (lambda params, sparsity, step=0, rng=None:
                                 masks_lib.apply_masks(params, sparsity["masks"]))
    if "track" in removed:
        method.on_grads = lambda params, sparsity, grads, step=0: (grads, sparsity)
    if "premask" in removed:
        tx = post_masked_optimizer(train_optim.make_optimizer(total_steps=total_steps))
    if "opt" in removed:
        tx = unmasked_optimizer(train_optim.make_optimizer(total_steps=total_steps))
    return method, tx


@dataclasses.dataclass
class Bench:
    """One method's jitted step/update functions and its live state."""

    name: str
    step_fn: Callable
    update_fn: Callable | None
    frequency: int | None
    state: Any
    mesh: Any
    step_times: list = dataclasses.field(default_factory=list)  # per-round mean step time
    update_times: list = dataclasses.field(default_factory=list)


def method_bindings(name: str, args) -> list[str]:
    """Schedule bindings so that the run is sparse and updates at the stated frequency."""
    if name == "gmp":
        return ["PolynomialSchedule.start = 0", "PolynomialSchedule.end = 100000",
                f"PolynomialSchedule.frequency = {args.gmp_frequency}"]
    if name == "rigl":
        return [f"DropGrowSchedule.frequency = {args.rigl_frequency}",
                "DropGrowSchedule.end = 100000"]
    return []


def build(name: str, args, batches) -> Bench:
    """Parses gin for `name`, sets the run up and compiles its step (and update) function.

    Compiling here, while this method's gin config is active, keeps gin lookups made during
    tracing consistent; later calls hit the jit cache."""
    base = name.split("-")[0]
    config.parse_gin([args.gin_file, GIN[base]], [*args.gin, *method_bindings(base, args)])
    cfg = TrainConfig()
    run = build_run(cfg)
    method, tx = run.sparsity_method, run.tx
    if name in VARIANTS:
        method, tx = apply_variant(run, VARIANTS[name], cfg.num_steps)
    mesh, bsh = run.mesh, batch_sharding(run.mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        state = run.init_state()
        step_fn = jax.jit(make_train_step(run.model, tx, method, run.lr_schedule),
                          in_shardings=(run.state_shardings, bsh),
                          out_shardings=(run.state_shardings, replicated(mesh)),
                          donate_argnums=(0,))
        freq = {"gmp": args.gmp_frequency, "rigl": args.rigl_frequency}.get(base)
        update_fn = run.sparsity_update_fn() if freq else None  # static: never updates
        batch = global_batch(batches[0], bsh)
        for _ in range(args.warmup):
            state, m = step_fn(state, batch)
        if update_fn is not None:
            state, m = update_fn(state, batch)
        jax.block_until_ready((state, m))
    return Bench(name, step_fn, update_fn, freq, state, mesh)


def time_round(b: Bench, batches, steps: int) -> None:
    """`steps` ordinary train steps, then one mask-update call (timed separately)."""
    bsh = batch_sharding(b.mesh)
    gb = [global_batch(x, bsh) for x in batches]
    jax.block_until_ready(gb)
    with jax.set_mesh(b.mesh), nn.logical_axis_rules(LOGICAL_RULES):
        state = b.state
        t0 = time.perf_counter()
        for i in range(steps):
            state, m = b.step_fn(state, gb[i % len(gb)])
        jax.block_until_ready((state, m))
        b.step_times.append((time.perf_counter() - t0) / steps)
        if b.update_fn is not None:
            t0 = time.perf_counter()
            state, m = b.update_fn(state, gb[0])
            jax.block_until_ready((state, m))
            b.update_times.append(time.perf_counter() - t0)
        b.state = state


def summarize(benches: dict[str, Bench]) -> tuple[list[str], dict[str, Any]]:
    rows, amortized = [], {}
    for name, b in benches.items():
        step_min, step_med = min(b.step_times), statistics.median(b.step_times)
        upd = statistics.median(b.update_times) if b.update_times else 0.0
        amortized[name] = step_min + (upd / b.frequency if b.frequency else 0.0)
        rows.append((name, step_min, step_med, upd, b.frequency, amortized[name]))
    dense = amortized["dense"]
    dense_med = statistics.median(benches["dense"].step_times)
    lines = [f"{'method':8s} {'step min ms':>11s} {'step med ms':>11s} {'update ms':>10s} "
             f"{'every':>6s} {'amort. ms':>10s} {'ratio':>6s} {'ratio(med)':>10s}"]
    for name, smin, smed, upd, freq, am in rows:
        am_med = smed + (upd / freq if freq else 0.0)
        lines.append(f"{name:8s} {smin * 1e3:11.2f} {smed * 1e3:11.2f} {upd * 1e3:10.1f} "
                     f"{freq or '-':>6} {am * 1e3:10.2f} {am / dense:6.3f} {am_med / dense_med:10.3f}")
    result = {name: round(amortized[name] / dense, 3) for name in benches if name != "dense"}
    return lines, result


def main(argv=None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gin_file", default=None, help="model/train config (default base.gin)")
    ap.add_argument("--quick", action="store_true", help="configs/tiny.gin (unless --gin_file)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rigl_frequency", type=int, default=100)
    ap.add_argument("--gmp_frequency", type=int, default=100)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--breakdown", action="store_true",
                    help="also time RigL steps with single overheads removed (see VARIANTS)")
    ap.add_argument("--gin", action="append", default=[], help="extra gin binding A.b=V")
    args = ap.parse_args(argv)
    args.gin_file = args.gin_file or ("tiny.gin" if args.quick else "base.gin")
    steps = args.steps or (50 if args.quick else 10)
    if steps < 1 or args.rounds < 1:
        raise ValueError(f"--steps={steps} and --rounds={args.rounds} must be >= 1")
    names = [m for m in args.methods.split(",") if m]
    bad = [m for m in names if m not in METHODS]
    if bad or "dense" not in names:
        raise ValueError(f"--methods={args.methods!r}: valid are {METHODS}, 'dense' required")
    if args.breakdown:
        names += list(VARIANTS)

    config.parse_gin([args.gin_file], args.gin)
    cfg = TrainConfig()
    it = pipeline.make_iterator("train", global_batch_size=cfg.global_batch_size,
                                seq_len=cfg.seq_len, seed=cfg.seed, dataset=cfg.dataset,
                                data_dir=cfg.data_dir)
    batches = [next(it) for _ in range(4)]
    t0 = time.perf_counter()
    benches = {n: build(n, args, batches) for n in names}
    compile_s = time.perf_counter() - t0
    for _ in range(args.rounds):
        for b in benches.values():
            time_round(b, batches, steps)

    dev = jax.devices()[0]
    device = f"{dev.platform}:{dev.device_kind} x{jax.device_count()}"
    lines, result = summarize(benches)
    print(f"# {args.gin_file}: {cfg.global_batch_size}x{cfg.seq_len} tokens/step, {steps} steps x "
          f"{args.rounds} rounds per method, device {device}; setup+compile {compile_s:.1f}s")
    print("\n".join(lines))
    result["device"] = device
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
