"""Tune the GPU block-sparse attention kernels: tiles, warps and pipeline depth per pass.

For each pass (forward, dq, dk/dv, the fused backward that adds dq
atomically from the dk/dv programs, and the cached backward's dq from stored
dS tiles) every candidate ``PassConfig`` is first
checked against the dense float32 reference on a hard case (causal, packed
segments, GQA 4:1, bf16) and then timed alone on each timing pattern: by
default the benchmark's layout (random blocks at the given sparsity) and a
causal mask. A candidate's score is the geometric mean of its times over the
patterns, so a setting that wins on one pattern by noise but loses badly on
another is not picked (on an H200, three pipeline stages in the backward
passes tie on random blocks and cost 35% on causal masks). The winner of each
pass is the correct candidate with the lowest score; ``--write`` stores it in
``gpu_tuning.json`` as the default for head dims up to the bucket's
``max_head_dim``. When every backward pass is tuned in one run, the fastest
backward by the same score becomes the default (``backward``): split (dq +
dk/dv per pattern), fused, or cached (the dk/dv pass storing dS, timed with the
winning dk/dv tiles, + cached dq; split where the store would pass the default
``ds_cache_max_bytes``). Prints one table per pass (ms and
TFLOP/s counted over the kept blocks per pattern, score, error) and as its
last line a JSON object: the winners, the backward choice and, per pass, the
score of the current default over the winner's.

  python benchmarks/block_sparse_attention_tune.py --write      # on a GPU
  python benchmarks/block_sparse_attention_tune.py --seq 4096 --max-seq 4096 --write
                                                   # settings for sequences up to 4096 only
  python benchmarks/block_sparse_attention_tune.py --quick      # tiny, interpret mode (CPU)
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
from block_sparse_attention import compile_all, make_layout, time_calls  # benchmark beside this

from pallas_kernels.block_sparse_attention import gpu, gpu_backward, ops, reference
from pallas_kernels.block_sparse_attention import gpu_config as gcfg
from pallas_kernels.block_sparse_attention import masks as masks_lib

# (rows, cols, num_warps, num_stages) per pass, tried besides the current default.
CANDIDATES = {
    "fwd": [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 4, 2),
            (128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3)],
    "dq": [(128, 128, 8, 2), (64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 2), (64, 128, 4, 2),
           (32, 64, 4, 2), (128, 32, 4, 3), (128, 32, 8, 2), (128, 64, 8, 2)],
    "dkv": [(128, 128, 8, 2), (64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 2), (32, 64, 4, 2),
            (64, 128, 4, 2), (128, 32, 8, 2), (128, 32, 4, 2), (128, 64, 8, 3)],
    "bwd": [(64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 2), (64, 32, 4, 3), (32, 64, 4, 2),
            (64, 64, 8, 2), (128, 64, 8, 2), (32, 32, 4, 2)],
    "dq_cached": [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 2), (128, 64, 8, 2),
                  (64, 128, 4, 2), (128, 128, 8, 2), (64, 32, 4, 3), (128, 32, 4, 3)],
}
QUICK_CANDIDATES = {p: [(16, 16, 4, 2), (32, 16, 4, 2)] for p in gcfg.PASSES}
MATMULS = {"fwd": 2, "dq": 3, "dkv": 4, "bwd": 5, "dq_cached": 1}  # block-pair matmuls
PATTERNS = ("random", "banded", "causal")  # timing masks: block layouts of the benchmark, causal
BF16_TOL = 2e-2  # max error over the reference's largest magnitude


@dataclasses.dataclass
class Problem:
    """Inputs of all three passes for one shape and mask."""
    q: jax.Array
    k: jax.Array
    v: jax.Array
    do: jax.Array
    seg: jax.Array | None
    mask: masks_lib.BlockMask
    block: int
    lists: tuple
    o: jax.Array = None
    lse: jax.Array = None
    delta: jax.Array = None
    pairs: int = 0  # kept (query block, kv block) pairs over all heads
    store: jax.Array = None  # dS tiles from the default dk/dv store pass, for dq_cached

    def job(self, name, config, interpret):
        """(jitted pass with everything static bound, its array arguments)."""
        kv_idx, kv_cnt, kv_nfull, q_idx, q_cnt, q_nfull = self.lists
        kw = dict(rule=self.mask.token_rule, scale=1.0 / math.sqrt(self.q.shape[-1]),
                  block_q=self.block, block_k=self.block, interpret=interpret, config=config)
        if name == "fwd":
            return (jax.jit(functools.partial(gpu.fwd, **kw)),
                    (self.q, self.k, self.v, self.seg, kv_idx, kv_cnt, kv_nfull))
        args = (self.q, self.k, self.v, self.seg, self.do, self.lse, self.delta)
        if name == "dq":
            return (jax.jit(functools.partial(gpu_backward.dq_pass, **kw)),
                    (*args, kv_idx, kv_cnt, kv_nfull))
        if name == "dq_cached":
            if self.store is None:
                self.store = self.run("dkv_store", None, interpret)[2]
            return (jax.jit(functools.partial(gpu_backward.dq_cached_pass, **kw)),
                    (self.q, self.k, self.store, kv_idx, kv_cnt))
        if name == "dkv_store":
            return (jax.jit(functools.partial(gpu_backward.dkv_store_pass, **kw)),
                    (*args, kv_idx, kv_cnt, q_idx, q_cnt, q_nfull))
        fn = gpu_backward.dkv_pass if name == "dkv" else gpu_backward.fused_bwd_pass
        return jax.jit(functools.partial(fn, **kw)), (*args, q_idx, q_cnt, q_nfull)

    def store_bytes(self) -> int:
        return gpu_backward.ds_store_bytes(self.q, self.lists[0], self.block, self.block)

    def run(self, name, config, interpret):
        fn, args = self.job(name, config, interpret)
        return fn(*args)


def make_problem(seq, heads, kv_heads, head_dim, block, mask, seg, seed, interpret):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (1, seq, heads, head_dim), jnp.bfloat16)
    k, v = (jax.random.normal(kk, (1, seq, kv_heads, head_dim), jnp.bfloat16) for kk in keys[1:3])
    do = jax.random.normal(keys[3], (1, seq, heads, head_dim), jnp.bfloat16)
    layout = masks_lib.layout_for(mask, q, k, block, block)
    full = ops._full_tiles(mask, "gpu", seq, seq, block, block)
    lists = ops._lists(mask, layout, seq, seq, block, block, full)
    prob = Problem(q, k, v, do, seg, mask, block, lists)
    prob.pairs = int(np.sum(np.asarray(layout))) * (heads if np.shape(layout)[0] == 1 else 1)
    # The backward passes start from the default forward's output.
    prob.o, prob.lse = prob.run("fwd", None, interpret)
    prob.delta = gpu_backward.delta_of(prob.o, do)
    return prob


def reference_outputs(prob: Problem) -> dict:
    f32 = lambda x: x.astype(jnp.float32)

    def ref(q, k, v):
        return reference.reference_attention(q, k, v, prob.mask, block_q=prob.block,
                                             block_k=prob.block, segment_ids=prob.seg)

    out, vjp = jax.vjp(ref, f32(prob.q), f32(prob.k), f32(prob.v))
    dq, dk, dv = vjp(f32(prob.do))
    return {"fwd": (out,), "dq": (dq,), "dkv": (dk, dv), "bwd": (dq, dk, dv), "dq_cached": (dq,)}


def timing_mask(pattern: str, seq: int, block: int, sparsity: float) -> masks_lib.BlockMask:
    if pattern == "causal":
        return masks_lib.CausalMask()
    return masks_lib.BlockLayoutMask(make_layout(seq // block, sparsity, pattern))


def geomean(xs) -> float:
    return float(np.exp(np.mean(np.log(list(xs)))))


def best_of(results: list) -> tuple | None:
    """``results``: (candidate, correct, {pattern: seconds}) per timed candidate.
    Returns (candidate, score, times) of the correct one with the lowest score
    (geometric mean over patterns), or None if none is correct."""
    good = [(geomean(times.values()), cand, times) for cand, ok, times in results if ok]
    if not good:
        return None
    score, cand, times = min(good, key=lambda r: r[0])
    return cand, score, times


def rel_err(got, want) -> float:
    errs = []
    for x, r in zip(got, want):
        x, r = np.asarray(x, np.float32), np.asarray(r, np.float32)
        if not np.all(np.isfinite(x)):
            return float("inf")
        errs.append(float(np.max(np.abs(x - r)) / max(float(np.max(np.abs(r))), 1e-6)))
    return max(errs)


def astuple(pc: gcfg.PassConfig) -> tuple:
    return (pc.rows, pc.cols, pc.num_warps, pc.num_stages)


def with_pass(name, cand) -> gcfg.GpuConfig:
    rows, cols, warps, stages = cand
    pc = gcfg.PassConfig(rows, cols, warps, stages)
    return dataclasses.replace(gcfg.GpuConfig(), **{name: pc})


def write_tuning(head_dim: int, winners: dict, device: str, path=None,
                 backward: str | None = None, max_seq: int | None = None) -> dict:
    """Store ``winners`` (and ``backward`` unless None) in the entry for head
    dims up to ``head_dim``'s power of two and, with ``max_seq``, sequences up to
    ``max_seq`` only (else every length).

    A new entry starts as a copy of the one that served it, with every pass listed
    as ``untuned`` until this or a later run measures it.
    """
    path = gcfg.TUNING_FILE if path is None else path
    entries = json.loads(path.read_text())["entries"]
    bucket = 1 << (head_dim - 1).bit_length()
    entry = next((e for e in entries if e["max_head_dim"] == bucket
                  and e.get("max_seq") == max_seq), None)
    if entry is None:
        base = gcfg.pick_entry(entries, bucket, max_seq)
        entry = {**base, "max_head_dim": bucket, "untuned": list(gcfg.PASSES)}
        entry.pop("max_seq", None)
        if max_seq is not None:
            entry["max_seq"] = max_seq
        entries.append(entry)
    entry.update({p: dataclasses.asdict(pc) for p, pc in winners.items()})
    untuned = [p for p in entry.pop("untuned", []) if p not in winners]
    if untuned:  # passes whose settings are guesses, not measurements on tuned_on
        entry["untuned"] = untuned
    if backward is not None:
        entry["backward"] = backward
    entry["tuned_on"] = device
    entries.sort(key=lambda e: (e["max_head_dim"], gcfg.seq_limit(e)))
    path.write_text(json.dumps({"entries": entries}, indent=2) + "\n")
    gcfg.default_config.cache_clear()
    print(f"wrote {path} (max_head_dim={bucket}, max_seq={max_seq})")
    return entry


def choose_backward(best_times, timing, patterns, dkv_tiles, interpret, args) -> str:
    """The backward with the lowest score: split, fused, or cached (the dk/dv store
    pass timed here with the winning dk/dv tiles; split where the store would
    exceed the default ``ds_cache_max_bytes``)."""
    cap = gcfg.GpuConfig().ds_cache_max_bytes
    config = dataclasses.replace(gcfg.GpuConfig(), dkv=dkv_tiles)
    jobs = {p: timing[p].job("dkv_store", config, interpret) for p in patterns}
    compiled = compile_all(jobs)
    times = {"split": {}, "fused": best_times["bwd"], "cached": {}}
    for p in patterns:
        times["split"][p] = best_times["dq"][p] + best_times["dkv"][p]
        fits = timing[p].store_bytes() <= cap and not isinstance(compiled[p], Exception)
        times["cached"][p] = (time_calls(compiled[p], jobs[p][1], args.iters, args.repeats)
                              + best_times["dq_cached"][p]) if fits else times["split"][p]
    scores = {name: geomean(t.values()) for name, t in times.items()}
    best = min(scores, key=scores.get)
    print("\nbackward: " + ", ".join(f"{name} score {sc * 1e3:.3f} ms"
                                     for name, sc in scores.items()) + f" -> {best}", flush=True)
    return best


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=8192, help="timing sequence length")
    p.add_argument("--sparsity", type=float, default=0.9, help="timing block sparsity")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--check-seq", type=int, default=1024, help="correctness-check length")
    p.add_argument("--passes", default=",".join(gcfg.PASSES))
    p.add_argument("--patterns", default="random,causal",
                   help=f"timing masks, scored by the geometric mean of their times; "
                        f"of {PATTERNS}")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--write", action="store_true", help="store the winners in gpu_tuning.json")
    p.add_argument("--max-seq", type=int, default=None,
                   help="with --write: store them for sequences up to this length only "
                        "(default: for every length)")
    p.add_argument("--quick", action="store_true", help="tiny shapes in interpret mode (CPU)")
    args = p.parse_args(argv)
    passes = [s for s in args.passes.split(",") if s]
    bad = [s for s in passes if s not in gcfg.PASSES]
    if bad:
        raise ValueError(f"--passes: {bad} not in {gcfg.PASSES}")
    patterns = [s for s in args.patterns.split(",") if s]
    bad = [s for s in patterns if s not in PATTERNS]
    if bad or not patterns:
        raise ValueError(f"--patterns: {bad or args.patterns!r}; give one or more of {PATTERNS}")
    if args.max_seq is not None and args.max_seq < args.seq:
        raise ValueError(f"--max-seq: {args.max_seq} is below the timed --seq {args.seq}; the "
                         "tuned length must lie in the bucket it is stored for.")
    interpret = args.quick or jax.default_backend() != "gpu"
    candidates = CANDIDATES
    if args.quick:
        args.seq, args.check_seq, args.heads, args.head_dim, args.block = 64, 64, 2, 16, 32
        args.iters, args.repeats = 1, 1
        candidates = QUICK_CANDIDATES
    device = jax.devices()[0].device_kind
    print(f"device: {device}, interpret={interpret}, timing seq={args.seq} "
          f"patterns={','.join(patterns)} sparsity={args.sparsity} heads={args.heads} "
          f"head_dim={args.head_dim} block={args.block}; check seq={args.check_seq} "
          "causal+segments+GQA 4:1", flush=True)

    cs = args.check_seq
    seg = jnp.asarray((np.arange(cs) >= cs // 3).astype(np.int32) + (np.arange(cs) >= cs // 2))
    check = make_problem(cs, 8, 2, args.head_dim, args.block, masks_lib.CausalMask(), seg[None],
                         seed=1, interpret=interpret)
    want = reference_outputs(check)
    timing = {pat: make_problem(args.seq, args.heads, args.heads, args.head_dim, args.block,
                                timing_mask(pat, args.seq, args.block, args.sparsity), None,
                                seed=2, interpret=interpret) for pat in patterns}
    block_flops = 2 * args.block * args.block * args.head_dim

    winners, speedups, best_times = {}, {}, {}
    for name in passes:
        cols = "".join(f" {pat + ' ms':>11} {'TFLOP/s':>7}" for pat in patterns)
        print(f"\n{name}: {'rows':>4} {'cols':>4} {'warps':>5} {'stages':>6}{cols} "
              f"{'score':>8} {'err':>8}", flush=True)
        current = getattr(gcfg.default_config(args.head_dim, args.seq), name)
        current = astuple(current.fit(args.block, args.block))
        cands = [current] + [c for c in candidates[name] if c != current]
        results = []
        jobs = {}
        for cand in cands:
            jobs[cand, "check"] = check.job(name, with_pass(name, cand), interpret)
            for pat in patterns:
                jobs[cand, pat] = timing[pat].job(name, with_pass(name, cand), interpret)
        compiled = compile_all(jobs)
        for cand in cands:
            try:
                bad = next((compiled[cand, x] for x in ("check", *patterns)
                            if isinstance(compiled[cand, x], Exception)), None)
                if bad is not None:
                    raise bad
                got = compiled[cand, "check"](*jobs[cand, "check"][1])
                got = got if isinstance(got, tuple) else (got,)
                err = rel_err(got[: len(want[name])], want[name])
                times = {pat: time_calls(compiled[cand, pat], jobs[cand, pat][1], args.iters,
                                         args.repeats) for pat in patterns}
            except Exception as e:  # noqa: BLE001 - a config may not fit the chip; keep going
                print(f"{'':>5} {cand} failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
                continue
            ok = err <= BF16_TOL
            score = geomean(times.values())
            results.append((cand, ok, times))
            row = "".join(f" {times[pat] * 1e3:>11.3f} "
                          f"{MATMULS[name] * block_flops * timing[pat].pairs / times[pat] / 1e12:>7.1f}"
                          for pat in patterns)
            print(f"{'':>5} {cand[0]:>4} {cand[1]:>4} {cand[2]:>5} {cand[3]:>6}{row} "
                  f"{score * 1e3:>8.3f} {err:>8.1e}{'' if ok else '  WRONG'}"
                  f"{'  (current default)' if cand == current else ''}", flush=True)
        best = best_of(results)
        if best is None:
            print(f"{name}: no correct candidate", flush=True)
            continue
        cand, score, best_times[name] = best
        winners[name] = getattr(with_pass(name, cand), name)
        base = next((geomean(t.values()) for c, _, t in results if c == current), None)
        speedups[name] = None if base is None else base / score
        print(f"{name}: best {cand} score {score * 1e3:.3f} ms", flush=True)
        if args.write and not interpret:  # pass by pass: a cut-short run keeps what it found
            write_tuning(args.head_dim, {name: winners[name]}, device, max_seq=args.max_seq)
    backward = None
    if {"dq", "dkv", "bwd", "dq_cached"} <= set(best_times):
        backward = choose_backward(best_times, timing, patterns, winners["dkv"], interpret, args)
        if args.write and not interpret:
            write_tuning(args.head_dim, {}, device, backward=backward, max_seq=args.max_seq)
    result = {"winners": {p: dataclasses.asdict(pc) for p, pc in winners.items()},
              "backward": backward, "current_default_over_best": speedups, "device": device}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
