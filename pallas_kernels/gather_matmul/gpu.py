"""Gathered matmul kernels for GPU, written with the Pallas Triton backend.

mode "rows" (`rows_gpu`): grid over output column tiles (tn). Each program loops over the
active slots in blocks of tc (a dynamic trip count: ceil(count / tc), so work follows the
active count, not the capacity), gathers those rows of w (its tile of columns) and of
xᵀ with one indexed load each, and accumulates ``xᵀ_blockᵀ @ w_block`` in float32.

mode "cols" (`cols_gpu`): grid over slot tiles (tc). A program whose slots are all past
`count` skips its k loop and stores zeros; the others loop over k in tiles of tk, gathering
w's active columns, and store their compact [B, tc] block.

Indexed loads use integer-array indexers on every dimension (interpret mode discharges
those as a gather; mixing slices and arrays it cannot). Every load and store is masked;
load indices are clipped into range, store indices stay distinct (interpret mode scatters
masked lanes too, so a repeated index could overwrite a real one), so no shape needs to be
a multiple of a tile. The batch is padded to at
least 16 rows (Triton's `dot` needs dims >= 16).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def _params(interpret: bool):
    return None if interpret else plgpu.CompilerParams(num_warps=4, num_stages=2)


def _dot(a, b, contract):
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                               preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("tc", "tn", "out_dtype", "interpret"))
def rows_gpu(xt: jax.Array, w: jax.Array, idx: jax.Array, count: jax.Array, *, tc: int,
             tn: int, out_dtype, interpret: bool = False) -> jax.Array:
    """xt [K, Bp] (x transposed, Bp >= 16), w [K, N], idx [Cp] (Cp % tc == 0), count [1]
    -> [Bp, N] float32 sums over the first `count` slots."""
    k, bp = xt.shape
    n = w.shape[1]
    dtype = jnp.promote_types(xt.dtype, w.dtype)

    def kernel(cnt_ref, idx_ref, xt_ref, w_ref, o_ref):
        n_i = pl.program_id(0)
        cnt = cnt_ref[0]
        out_cols = n_i * tn + jnp.arange(tn, dtype=jnp.int32)
        col_ok = out_cols < n
        cols = jnp.minimum(out_cols, n - 1)  # loads: clipped; the store keeps lanes distinct
        batch = jnp.arange(bp, dtype=jnp.int32)

        def body(i, acc):
            slots = i * tc + jnp.arange(tc, dtype=jnp.int32)
            ok = slots < cnt
            rows = plgpu.load(idx_ref.at[slots], mask=ok, other=0)
            rows = jnp.clip(rows, 0, k - 1)
            xb = plgpu.load(xt_ref.at[rows[:, None], batch[None, :]], mask=ok[:, None],
                            other=0.0)  # [tc, Bp]
            wb = plgpu.load(w_ref.at[rows[:, None], cols[None, :]],
                            mask=ok[:, None] & col_ok[None, :], other=0.0)  # [tc, tn]
            return acc + _dot(xb.astype(dtype), wb.astype(dtype), (0, 0))

        acc = jax.lax.fori_loop(0, (cnt + tc - 1) // tc, body, jnp.zeros((bp, tn), jnp.float32))
        plgpu.store(o_ref.at[batch[:, None], out_cols[None, :]], acc.astype(o_ref.dtype),
                    mask=col_ok[None, :] & (batch[:, None] >= 0))

    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((bp, n), out_dtype),
        grid=(pl.cdiv(n, tn),), interpret=interpret, compiler_params=_params(interpret),
        name="sparsejax_gather_matmul_rows",
    )(count, idx, xt, w)


@functools.partial(jax.jit, static_argnames=("tc", "tk", "out_dtype", "interpret", "transpose_w"))
def cols_gpu(x: jax.Array, w: jax.Array, idx: jax.Array, count: jax.Array, *, tc: int,
             tk: int, out_dtype, interpret: bool = False, transpose_w: bool = False) -> jax.Array:
    """x [Bp, K] (Bp >= 16), w [K, N] (transpose_w: [N, K]), idx [Cp] (Cp % tc == 0),
    count [1] -> [Bp, Cp]: the active columns of x @ w, zeros from slot `count` on."""
    bp, k = x.shape
    n = w.shape[0] if transpose_w else w.shape[1]
    cp = idx.shape[0]
    dtype = jnp.promote_types(x.dtype, w.dtype)

    def kernel(cnt_ref, idx_ref, x_ref, w_ref, o_ref):
        j = pl.program_id(0)
        cnt = cnt_ref[0]
        slots = j * tc + jnp.arange(tc, dtype=jnp.int32)
        ok = slots < cnt
        cols = jnp.clip(plgpu.load(idx_ref.at[slots], mask=ok, other=0), 0, n - 1)
        batch = jnp.arange(bp, dtype=jnp.int32)

        def body(kk, acc):
            ks = kk * tk + jnp.arange(tk, dtype=jnp.int32)
            k_ok = ks < k
            ks = jnp.minimum(ks, k - 1)
            xb = plgpu.load(x_ref.at[batch[:, None], ks[None, :]], mask=k_ok[None, :],
                            other=0.0)  # [Bp, tk]
            if transpose_w:
                wb = plgpu.load(w_ref.at[cols[None, :], ks[:, None]],
                                mask=k_ok[:, None] & ok[None, :], other=0.0)  # [tk, tc]
            else:
                wb = plgpu.load(w_ref.at[ks[:, None], cols[None, :]],
                                mask=k_ok[:, None] & ok[None, :], other=0.0)  # [tk, tc]
            return acc + _dot(xb.astype(dtype), wb.astype(dtype), (1, 0))

        # Tiles wholly past `count` skip the loop (a product, not a scalar where: see gmm).
        trips = (j * tc < cnt).astype(jnp.int32) * pl.cdiv(k, tk)
        acc = jax.lax.fori_loop(0, trips, body, jnp.zeros((bp, tc), jnp.float32))
        plgpu.store(o_ref.at[batch[:, None], slots[None, :]], acc.astype(o_ref.dtype),
                    mask=(batch[:, None] >= 0) & (slots[None, :] < cp))

    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((bp, cp), out_dtype),
        grid=(cp // tc,), interpret=interpret, compiler_params=_params(interpret),
        name="sparsejax_gather_matmul_cols",
    )(count, idx, x, w)
