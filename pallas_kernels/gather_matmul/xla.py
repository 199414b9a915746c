"""The gathered matmul in plain XLA (the CPU and TPU path).

* mode "rows": a loop over the active slots, `ROWS_PER_STEP` weight rows per iteration, for
  `ceil(count / ROWS_PER_STEP)` iterations: each active weight row is read once, straight
  into the accumulator, and the work follows the step's own active count, not the site's
  capacity. The rows of one iteration go to `ACCUMULATORS` partial sums (summed after the
  loop), so the adds form that many independent chains. (Gathering the rows with `jnp.take`
  and multiplying after writes the gathered rows out and reads them back: at batch 1 on CPU
  that costs more than the dense product at 50% sparsity.) Active rows are scattered over
  the weight, so each starts a new memory stream, and short rows (2-4 KB) are read at half to
  two thirds of the dense product's rate (benchmarks/activation_sparsity.py, part 3). More
  rows per iteration keep more of those streams in flight: in two same-run comparisons on
  this project's CPU, whole-model TEAL 50% generation went from 1.53x and 1.58x dense with 8
  rows and one sum to 1.61x and 1.62x with 16 rows and 2 (4 sums, 24 or 32 rows were no
  better).
* mode "cols" on a neuron-major weight (`transpose_w`): a loop that gathers `COLS_PER_STEP`
  rows at a time (a block that stays in cache) and multiplies them, for as many blocks as
  the step has active slots.
* mode "cols" on a [K, N] weight: the active columns are strided in memory, so they are
  gathered (`jnp.take`) and multiplied in one matmul.

Slots past `count` contribute exact zeros."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

ROWS_PER_STEP = 16
ACCUMULATORS = 2
COLS_PER_STEP = 64


def _rows_loop(x: jax.Array, w: jax.Array, idx: jax.Array, count: jax.Array) -> jax.Array:
    """[B, N] float32: sum over the first `count` slots c of x[:, idx[c]] * w[idx[c]]."""
    c, r = idx.shape[0], ROWS_PER_STEP
    pad = (-c) % r
    valid = jnp.arange(c + pad) < count
    xs = jnp.pad(jnp.take(x, idx, axis=1, mode="clip"), ((0, 0), (0, pad)))
    xs = jnp.where(valid[None, :], xs.astype(jnp.float32), 0.0)
    idx = jnp.pad(jnp.clip(idx, 0, w.shape[0] - 1), (0, pad))

    def body(j, accs):
        accs = list(accs)
        for k in range(r):
            i = j * r + k
            row = jax.lax.dynamic_slice_in_dim(w, idx[i], 1, 0).astype(jnp.float32)  # [1, N]
            accs[k % ACCUMULATORS] += jax.lax.dynamic_slice_in_dim(xs, i, 1, 1) * row
        return tuple(accs)

    steps = (jnp.clip(count, 0, c) + r - 1) // r
    zero = jnp.zeros((x.shape[0], w.shape[1]), jnp.float32)
    accs = jax.lax.fori_loop(0, steps, body, (zero,) * ACCUMULATORS)
    return functools.reduce(jnp.add, accs)


def _cols_loop(x: jax.Array, w_t: jax.Array, idx: jax.Array, count: jax.Array) -> jax.Array:
    """[B, C] float32: x @ w_t[idx[c]] for the first `count` slots c (w_t [N, K] neuron-major),
    0 after: `COLS_PER_STEP` rows gathered (a block that stays in cache) and multiplied per
    iteration."""
    c, r = idx.shape[0], COLS_PER_STEP
    pad = (-c) % r
    idx_p = jnp.pad(jnp.clip(idx, 0, w_t.shape[0] - 1), (0, pad))
    x32 = x.astype(jnp.float32)

    def body(j, y):
        rows = jnp.take(w_t, jax.lax.dynamic_slice_in_dim(idx_p, j * r, r), axis=0)
        out = jax.lax.dot_general(x32, rows.astype(jnp.float32), (((1,), (1,)), ((), ())))
        return jax.lax.dynamic_update_slice_in_dim(y, out, j * r, 1)

    steps = (jnp.clip(count, 0, c) + r - 1) // r
    y = jax.lax.fori_loop(0, steps, body, jnp.zeros((x.shape[0], c + pad), jnp.float32))
    return jnp.where((jnp.arange(c) < count)[None, :], y[:, :c], 0.0)


def gather_matmul_xla(x: jax.Array, w: jax.Array, idx: jax.Array, count: jax.Array,
                      mode: str, out_dtype, transpose_w: bool = False) -> jax.Array:
    if mode == "rows":
        y = _rows_loop(x, w, idx, count)
    elif transpose_w:  # w [N, K]: the active columns are contiguous rows
        y = _cols_loop(x, w, idx, count)
    else:
        valid = jnp.arange(idx.shape[0]) < count
        dtype = jnp.promote_types(x.dtype, w.dtype)
        y = jnp.dot(x.astype(dtype), jnp.take(w, idx, axis=1, mode="clip").astype(dtype),
                    preferred_element_type=jnp.float32)
        y = jnp.where(valid[None, :], y, 0.0)
    return y.astype(out_dtype)
