"""Block-sparse vs dense attention, forward + backward, across sequence lengths and sparsities.

Dense baseline: ``jax.nn.dot_product_attention`` (cuDNN on GPU when it works,
otherwise the default implementation), timed in the same run. Block layouts
are causal-free, random (each query block keeps a fixed number of kv blocks,
diagonal included) or banded. A causal row compares ``CausalMask`` with dense
causal attention (``CausalMask`` goes to cuDNN through the op's dense fast path;
a "kernel only" row times the Pallas kernel on it, as for 0%). Each row also
times the forward alone (inference,
prefill). Prints the device, a table, and as its last line a JSON object with
the dense/block-sparse time ratio (forward + backward) per sparsity and for
causal (geometric means over sequence lengths), the same for the forward
alone under ``"forward"``, plus the device. Times are per call from
back-to-back calls (median of five samples); each sequence length's kernels
compile in parallel before timing.

  python benchmarks/block_sparse_attention.py              # GPU/TPU: 4k..32k
  python benchmarks/block_sparse_attention.py --quick      # small shapes, CPU/XLA path
"""
from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse_attention import masks as masks_lib
from pallas_kernels.block_sparse_attention import ops


def make_layout(num_blocks: int, sparsity: float, pattern: str, seed: int = 0) -> np.ndarray:
    """``[1, nb, nb]`` layout keeping ``round((1 - sparsity) * nb)`` (>= 1) blocks per row."""
    keep = max(1, int(round((1.0 - sparsity) * num_blocks)))
    layout = np.zeros((num_blocks, num_blocks), bool)
    rng = np.random.default_rng(seed)
    for i in range(num_blocks):
        if pattern == "banded":
            cols = (i + np.arange(keep) - keep // 2) % num_blocks
        else:
            others = rng.permutation(np.delete(np.arange(num_blocks), i))[: keep - 1]
            cols = np.concatenate([[i], others])
        layout[i, cols] = True
    return layout[None]


def time_calls(fn, args, iters: int = 10, repeats: int = 5) -> float:
    """Seconds per call: median over ``repeats`` of ``iters`` back-to-back (async) calls.

    Back-to-back calls overlap host dispatch with device work, as a training
    loop does, so small problems are not dominated by per-call host latency.
    """
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / iters)
    return statistics.median(samples)


def compile_all(jobs: dict, workers: int = 8) -> dict:
    """``{label: (jitted fn, args)}`` -> ``{label: compiled fn or the exception}``.

    Lowering runs here; XLA compilation (the slow part for Pallas kernels)
    runs on a thread pool.
    """
    lowered, out = {}, {}
    for label, (fn, args) in jobs.items():
        try:
            lowered[label] = fn.lower(*args)
        except Exception as e:  # noqa: BLE001 - reported by the caller
            out[label] = e

    def compile_one(item):
        label, low = item
        try:
            return label, low.compile()
        except Exception as e:  # noqa: BLE001
            return label, e

    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        out.update(dict(pool.map(compile_one, lowered.items())))
    return out


def _fwd_bwd(attn):
    def loss(q, k, v, ct):
        return jnp.sum(attn(q, k, v).astype(jnp.float32) * ct)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _fwd(attn):
    return jax.jit(lambda q, k, v, ct: attn(q, k, v))


def _dense_impls():
    if jax.default_backend() == "gpu":
        return ["cudnn", None]
    return [None]


def time_dense(q, k, v, ct, iters, causal=False):
    """(forward + backward seconds, forward seconds, implementation name)."""
    for impl in _dense_impls():
        attn = lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation=impl)
        try:
            return (time_calls(_fwd_bwd(attn), (q, k, v, ct), iters),
                    time_calls(_fwd(attn), (q, k, v, ct), iters), impl or "xla")
        except Exception as e:  # noqa: BLE001 - cuDNN may be unavailable or OOM
            print(f"  dense implementation={impl!r} failed: {type(e).__name__}: {str(e)[:120]}")
    return float("nan"), float("nan"), "failed"


def sparse_fn(layout, block, backend, dense_fast_path=True, forward_only=False,
              interpret=False):
    """Block-sparse forward + backward (or forward alone) over ``layout`` (a mask
    object if not an array)."""
    mask = masks_lib.BlockLayoutMask(layout) if isinstance(layout, np.ndarray) else layout
    wrap = _fwd if forward_only else _fwd_bwd
    return wrap(lambda q, k, v: ops.block_sparse_attention(
        q, k, v, mask, block_q=block, block_k=block, backend=backend, interpret=interpret,
        dense_fast_path=dense_fast_path))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", default=None,
                   help="comma-separated (default 4096,8192,16384,32768; 512,1024 with --quick)")
    p.add_argument("--sparsities", default="0,0.5,0.75,0.9,0.95")
    p.add_argument("--pattern", choices=["random", "banded"], default="random")
    p.add_argument("--heads", type=int, default=None, help="default 16 (4 with --quick)")
    p.add_argument("--head-dim", type=int, default=None, help="default 128 (64 with --quick)")
    p.add_argument("--block", type=int, default=None, help="default 128 (64 with --quick)")
    p.add_argument("--iters", type=int, default=None,
                   help="back-to-back calls per sample (default 10, 2 with --quick)")
    p.add_argument("--backend", default=None, help="gpu | tpu | xla (default: by platform)")
    p.add_argument("--quick", action="store_true",
                   help="small shapes through the XLA path (flags given explicitly still apply)")
    p.add_argument("--interpret", action="store_true",
                   help="run the Pallas kernels in interpret mode (a CPU check of --backend gpu)")
    args = p.parse_args(argv)
    defaults = dict(seq_lens="4096,8192,16384,32768", heads=16, head_dim=128, block=128, iters=10)
    if args.quick:
        defaults.update(seq_lens="512,1024", heads=4, head_dim=64, block=64, iters=2)
        args.backend = args.backend or "xla"
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    sparsities = [float(s) for s in args.sparsities.split(",")]
    backend = args.backend or ops.default_backend()
    device = jax.devices()[0].device_kind
    print(f"device: {device} ({jax.default_backend()}), backend={backend}, heads={args.heads}, "
          f"head_dim={args.head_dim}, block={args.block}, bf16, pattern={args.pattern}")
    print(f"{'seq':>6} {'sparsity':>8} {'nnz/row':>7} {'dense ms':>9} {'sparse ms':>9} "
          f"{'ratio':>6} {'fwd ratio':>9}  dense impl")
    ratios: dict = {s: [] for s in [*sparsities, "causal"]}
    fwd_ratios: dict = {s: [] for s in ratios}
    kernel_only: dict = {"sparsity_0": {}, "causal": {}}  # the kernel without the cuDNN route
    for seq in seq_lens:
        keys = jax.random.split(jax.random.PRNGKey(seq), 4)
        shape = (1, seq, args.heads, args.head_dim)
        q, k, v, ct = (jax.random.normal(kk, shape, jnp.bfloat16) for kk in keys)
        inputs = (q, k, v, ct)
        dense = {"full": time_dense(q, k, v, ct, args.iters),
                 "causal": time_dense(q, k, v, ct, args.iters, causal=True)}
        impl = dense["full"][2]
        layouts = {s: make_layout(seq // args.block, s, args.pattern) for s in sparsities}
        layouts["causal"] = masks_lib.CausalMask()
        jobs = {}
        fn = functools.partial(sparse_fn, block=args.block, backend=backend,
                               interpret=args.interpret)
        for s, layout in layouts.items():
            jobs[s] = (fn(layout), inputs)
            jobs[s, "fwd"] = (fn(layout, forward_only=True), inputs)
        if backend == "gpu":  # layouts the op would send to cuDNN, through the kernel instead
            for s in [x for x in (0.0, "causal") if x in layouts]:
                jobs["kernel", s] = (fn(layouts[s], dense_fast_path=False), inputs)
        compiled = compile_all(jobs)
        for label, fn in compiled.items():
            if isinstance(fn, Exception):
                print(f"  block-sparse seq={seq} {label} failed: {type(fn).__name__}: "
                      f"{str(fn)[:200]}")
        times = {label: time_calls(fn, inputs, args.iters) for label, fn in compiled.items()
                 if not isinstance(fn, Exception)}
        for s in layouts:
            if s not in times:
                continue
            dense_t, dense_fwd_t, _ = dense["causal" if s == "causal" else "full"]
            ratio = dense_t / times[s]
            fwd_ratio = dense_fwd_t / times[s, "fwd"] if (s, "fwd") in times else float("nan")
            if math.isfinite(ratio):
                ratios[s].append(ratio)
            if math.isfinite(fwd_ratio):
                fwd_ratios[s].append(fwd_ratio)
            label = "causal" if s == "causal" else f"{s:.2f}"
            nnz = "" if s == "causal" else int(layouts[s][0].sum(1).max())
            print(f"{seq:>6} {label:>8} {nnz:>7} {dense_t * 1e3:>9.2f} {times[s] * 1e3:>9.2f} "
                  f"{ratio:>6.2f} {fwd_ratio:>9.2f}  {impl}{', both causal' if s == 'causal' else ''}")
        for s, key in ((0.0, "sparsity_0"), ("causal", "causal")):
            if ("kernel", s) in times:
                dense_t = dense["causal" if s == "causal" else "full"][0]
                kernel_only[key][f"seq_{seq}"] = ratio = dense_t / times["kernel", s]
                label = "causal" if s == "causal" else f"{s:.2f}"
                print(f"{seq:>6} {label:>8} {'(kernel only, no cuDNN route)':>27} "
                      f"{times['kernel', s] * 1e3:>9.2f} {ratio:>6.2f}")

    def summary(table):
        return {(s if s == "causal" else f"sparsity_{s:g}"):
                (float(np.exp(np.mean(np.log(r)))) if r else None) for s, r in table.items()}

    result: dict = summary(ratios)
    result["forward"] = summary(fwd_ratios)
    if any(kernel_only.values()):
        result["kernel_only"] = kernel_only
    result["device"] = device
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
