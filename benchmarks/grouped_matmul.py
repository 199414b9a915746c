"""Grouped matmul benchmark: Pallas `gmm` vs `jax.lax.ragged_dot` vs a dense batched matmul.

For MoE-like shapes (bf16) it times, in one run on one device:
  gmm forward and forward+backward (custom VJP kernels),
  jax.lax.ragged_dot forward and forward+backward,
  a dense batched matmul `[g, m/g, k] @ [g, k, n]` doing the same FLOPs,
with balanced and skewed (Zipf) group sizes. Prints a table, the device, and
as the last line a JSON object:
  tflops_vs_dense     balanced gmm fwd throughput / dense fwd throughput
  skewed_vs_balanced  gmm fwd time skewed / balanced
  vs_ragged_dot       ragged_dot fwd time / gmm fwd time
(geometric means over shapes) plus `device` and `backend`.

Usage: python benchmarks/grouped_matmul.py            # accelerator, full shapes
       python benchmarks/grouped_matmul.py --quick    # CPU smoke run: the "xla" backend
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.grouped_matmul import ops  # noqa: E402

FULL_SHAPES = [(16384, kn, kn, g) for kn in (1024, 2048, 4096) for g in (8, 64)]
QUICK_SHAPES = [(256, 64, 64, 4), (512, 128, 128, 8)]


def group_sizes_for(m: int, g: int, kind: str, zipf_s: float = 1.2) -> np.ndarray:
    """Balanced: m/g each. Skewed: Zipf(s) shares, largest first; always sums to m."""
    if kind == "balanced":
        sizes = np.full(g, m // g, np.int64)
    else:
        p = 1.0 / np.arange(1, g + 1) ** zipf_s
        sizes = np.floor(m * p / p.sum()).astype(np.int64)
    sizes[0] += m - sizes.sum()
    return sizes.astype(np.int32)


def time_fn(fn, *args, iters: int, warmup: int = 2) -> float:
    """Median wall time (s) of `fn(*args)` after warm-up, synchronizing every run."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fwd_bwd(f):
    def loss(lhs, rhs, gs, ct):
        return jnp.sum(f(lhs, rhs, gs).astype(jnp.float32) * ct)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def bench_shape(m, k, n, g, *, backend, tiling, iters, dtype):
    key = jax.random.PRNGKey(m + k + n + g)
    k1, k2, k3 = jax.random.split(key, 3)
    lhs = jax.random.normal(k1, (m, k), dtype)
    rhs = (jax.random.normal(k2, (g, k, n), jnp.float32) / math.sqrt(k)).astype(dtype)
    ct = jax.random.normal(k3, (m, n), jnp.float32)
    x_dense = lhs.reshape(g, m // g, k)

    gmm_f = lambda l, r, s: ops.gmm(l, r, s, backend=backend, tiling=tiling)  # noqa: E731
    rd_f = lambda l, r, s: jax.lax.ragged_dot(l, r, s)  # noqa: E731
    gmm_fwd, rd_fwd = jax.jit(gmm_f), jax.jit(rd_f)
    gmm_fb, rd_fb = _fwd_bwd(gmm_f), _fwd_bwd(rd_f)
    dense_fwd = jax.jit(lambda x, w: jnp.einsum("gmk,gkn->gmn", x, w))

    flops = 2.0 * m * k * n
    row = {"shape": f"m={m} k={k} n={n} g={g}"}
    row["dense_fwd"] = time_fn(dense_fwd, x_dense, rhs, iters=iters)
    for kind in ("balanced", "skewed"):
        gs = jnp.asarray(group_sizes_for(m, g, kind))
        out, ref = gmm_fwd(lhs, rhs, gs), rd_fwd(lhs, rhs, gs)
        err = float(
            jnp.linalg.norm((out - ref).astype(jnp.float32))
            / (jnp.linalg.norm(ref.astype(jnp.float32)) + 1e-30)
        )
        row[f"{kind}_relerr"] = err
        row[f"{kind}_gmm_fwd"] = time_fn(gmm_fwd, lhs, rhs, gs, iters=iters)
        row[f"{kind}_gmm_fb"] = time_fn(gmm_fb, lhs, rhs, gs, ct, iters=iters)
        row[f"{kind}_rd_fwd"] = time_fn(rd_fwd, lhs, rhs, gs, iters=iters)
        row[f"{kind}_rd_fb"] = time_fn(rd_fb, lhs, rhs, gs, ct, iters=iters)
    row["tflops_gmm_bal"] = flops / row["balanced_gmm_fwd"] / 1e12
    row["tflops_dense"] = flops / row["dense_fwd"] / 1e12
    return row


def _geomean(xs):
    return float(math.exp(sum(math.log(x) for x in xs) / len(xs)))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes, the xla backend (CPU smoke run)")
    p.add_argument("--iters", type=int, default=None, help="timed runs per measurement (median)")
    p.add_argument("--backend", default=None, choices=["gpu", "tpu", "xla"], help="default: platform")
    p.add_argument("--tiling", default=None, help="tm,tk,tn for gmm (default: per backend)")
    p.add_argument("--shapes", default=None, help="m:k:n:g,... overrides the shape list")
    args = p.parse_args(argv)

    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split(":")) for s in args.shapes.split(",")]
    backend = "xla" if args.quick and args.backend is None else args.backend
    resolved = backend or (jax.default_backend() if jax.default_backend() in ("gpu", "tpu") else "xla")
    tiling = tuple(int(t) for t in args.tiling.split(",")) if args.tiling else None
    iters = args.iters or (3 if args.quick else 10)
    device = jax.devices()[0].device_kind
    label = resolved
    print(f"device: {device}  backend: {label}  dtype: bfloat16  iters: {iters} (median)")

    rows = [bench_shape(*s, backend=backend, tiling=tiling, iters=iters, dtype=jnp.bfloat16) for s in shapes]

    hdr = (
        f"{'shape':<28}{'groups':<10}{'gmm fwd':>10}{'rd fwd':>10}{'dense fwd':>10}"
        f"{'gmm f+b':>10}{'rd f+b':>10}{'gmm TF/s':>10}{'relerr':>10}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        m, k, n, g = (int(t.split("=")[1]) for t in r["shape"].split())
        flops = 2.0 * m * k * n
        for kind in ("balanced", "skewed"):
            print(
                f"{r['shape']:<28}{kind:<10}"
                f"{r[f'{kind}_gmm_fwd'] * 1e3:>9.3f}m{r[f'{kind}_rd_fwd'] * 1e3:>9.3f}m"
                f"{r['dense_fwd'] * 1e3:>9.3f}m"
                f"{r[f'{kind}_gmm_fb'] * 1e3:>9.3f}m{r[f'{kind}_rd_fb'] * 1e3:>9.3f}m"
                f"{flops / r[f'{kind}_gmm_fwd'] / 1e12:>10.1f}{r[f'{kind}_relerr']:>10.1e}"
            )
    print("(times in ms; rd = jax.lax.ragged_dot; dense = [g, m/g, k] @ [g, k, n]; f+b = forward+backward)")

    summary = {
        "tflops_vs_dense": _geomean([r["tflops_gmm_bal"] / r["tflops_dense"] for r in rows]),
        "skewed_vs_balanced": _geomean([r["skewed_gmm_fwd"] / r["balanced_gmm_fwd"] for r in rows]),
        "vs_ragged_dot": _geomean(
            [r[f"{kd}_rd_fwd"] / r[f"{kd}_gmm_fwd"] for r in rows for kd in ("balanced", "skewed")]
        ),
        "vs_ragged_dot_fwd_bwd": _geomean(
            [r[f"{kd}_rd_fb"] / r[f"{kd}_gmm_fb"] for r in rows for kd in ("balanced", "skewed")]
        ),
        "max_relerr": max(max(r["balanced_relerr"], r["skewed_relerr"]) for r in rows),
        "device": device,
        "backend": label,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
