"""Grouped matmul kernels for GPU, written with the Pallas Triton backend.

`gmm_gpu`: grid (n tiles, work items). Each program loads its item's group and
row tile from the on-device schedule (metadata.py), loops over k with
`fori_loop` doing masked loads (rows of its group, k and n in range) and an
f32-accumulated `dot`, then stores only the rows of its group. Rows past the
last group form a virtual group whose programs skip the k loop and store zeros,
so every output row is written exactly once and needs no memset. n tiles vary
fastest, so consecutive programs reuse one lhs tile and one expert's rhs from L2.

`tgmm_gpu`: grid (n tiles, k tiles, groups). Each program loops over the row
tiles of its group (dynamic trip count), masking rows outside the group, and
accumulates `lhs_tileᵀ @ grad_tile`; empty groups store zeros.

Shapes need not be multiples of the tiles: every load and store is masked.
Triton needs power-of-two block dims (>= 16 for `dot` when compiled).
"""

from __future__ import annotations

import functools

import gin
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.grouped_matmul import metadata


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@gin.configurable
def gmm_gpu_compiler_params(num_warps: int = 8, num_stages: int = 3) -> tuple[int, int]:
    """Triton launch parameters (num_warps, num_stages) for the gmm/tgmm kernels."""
    return num_warps, num_stages


def _params(interpret: bool, launch: tuple[int, int] | None):
    if interpret:
        return None
    num_warps, num_stages = launch or gmm_gpu_compiler_params()
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


@functools.partial(
    jax.jit,
    static_argnames=("tiling", "transpose_rhs", "out_dtype", "interpret", "launch"),
)
def gmm_gpu(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    tiling: tuple[int, int, int],
    transpose_rhs: bool,
    out_dtype: jnp.dtype,
    interpret: bool = False,
    launch: tuple[int, int] | None = None,
) -> jax.Array:
    """lhs [m, k], rhs [g, k, n] (or [g, n, k] if transpose_rhs) -> [m, n]."""
    m, k = lhs.shape
    g = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tk, tn = tiling
    tiles_m, tiles_k, tiles_n = _cdiv(m, tm), _cdiv(k, tk), _cdiv(n, tn)
    starts, ends = metadata.group_bounds(group_sizes, m, rows=m, trailing_group=True)
    sched = metadata.make_tile_schedule(
        starts, ends, tm=tm, tiles_m=tiles_m, visit_empty_groups=False
    )
    num_items = sched.group_ids.shape[0]
    compute_dtype = jnp.promote_types(lhs.dtype, rhs.dtype)

    def kernel(gid_ref, tile_ref, start_ref, end_ref, active_ref, lhs_ref, rhs_ref, out_ref):
        n_i = pl.program_id(0)
        w = pl.program_id(1)

        @pl.when(w < active_ref[0])
        def _work():
            group = gid_ref[w]
            row0 = tile_ref[w] * tm
            rows = row0 + jnp.arange(tm, dtype=jnp.int32)
            row_mask = (rows >= start_ref[group]) & (rows < end_ref[group])
            cols = n_i * tn + jnp.arange(tn, dtype=jnp.int32)
            col_mask = cols < n
            rhs_group = jnp.minimum(group, g - 1)

            def body(k_i, acc):
                ks = k_i * tk + jnp.arange(tk, dtype=jnp.int32)
                k_mask = ks < k
                a = plgpu.load(
                    lhs_ref.at[pl.ds(row0, tm), pl.ds(k_i * tk, tk)],
                    mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                if transpose_rhs:
                    b = plgpu.load(
                        rhs_ref.at[rhs_group, pl.ds(n_i * tn, tn), pl.ds(k_i * tk, tk)],
                        mask=col_mask[:, None] & k_mask[None, :],
                        other=0.0,
                    )
                    prod = _dot(a.astype(compute_dtype), b.astype(compute_dtype), (1, 1))
                else:
                    b = plgpu.load(
                        rhs_ref.at[rhs_group, pl.ds(k_i * tk, tk), pl.ds(n_i * tn, tn)],
                        mask=k_mask[:, None] & col_mask[None, :],
                        other=0.0,
                    )
                    prod = _dot(a.astype(compute_dtype), b.astype(compute_dtype), (1, 0))
                return acc + prod.astype(jnp.float32)

            # The virtual trailing group (id g) skips the k loop and stores zeros.
            # (Written as a product: a scalar jnp.where here lowered to an i1 loop
            # bound in the Triton backend of jax 0.10/0.11.)
            trips = (group < g).astype(jnp.int32) * tiles_k
            acc = jax.lax.fori_loop(0, trips, body, jnp.zeros((tm, tn), jnp.float32))
            plgpu.store(
                out_ref.at[pl.ds(row0, tm), pl.ds(n_i * tn, tn)],
                acc.astype(out_ref.dtype),
                mask=row_mask[:, None] & col_mask[None, :],
            )

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(tiles_n, num_items),
        interpret=interpret,
        compiler_params=_params(interpret, launch),
        name="sparsejax_gmm",
    )(sched.group_ids, sched.tile_ids, sched.starts, sched.ends, sched.num_active, lhs, rhs)


@functools.partial(jax.jit, static_argnames=("tiling", "out_dtype", "interpret", "launch"))
def tgmm_gpu(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    *,
    tiling: tuple[int, int, int],
    out_dtype: jnp.dtype,
    interpret: bool = False,
    launch: tuple[int, int] | None = None,
) -> jax.Array:
    """lhs [m, k], grad [m, n], group_sizes [g] -> [g, k, n] (per-group lhsᵀ @ grad)."""
    m, k = lhs.shape
    n = grad.shape[1]
    g = group_sizes.shape[0]
    tm, tk, tn = tiling
    tiles_k, tiles_n = _cdiv(k, tk), _cdiv(n, tn)
    starts, ends = metadata.group_bounds(group_sizes, m, rows=m, trailing_group=False)
    compute_dtype = jnp.promote_types(lhs.dtype, grad.dtype)

    def kernel(start_ref, end_ref, lhs_ref, grad_ref, out_ref):
        n_i = pl.program_id(0)
        k_i = pl.program_id(1)
        group = pl.program_id(2)
        start = start_ref[group]
        end = end_ref[group]
        ks = k_i * tk + jnp.arange(tk, dtype=jnp.int32)
        k_mask = ks < k
        cols = n_i * tn + jnp.arange(tn, dtype=jnp.int32)
        col_mask = cols < n
        first_tile = start // tm
        last_tile = jnp.where(end > start, _cdiv_traced(end, tm), first_tile)

        def body(t, acc):
            rows = t * tm + jnp.arange(tm, dtype=jnp.int32)
            row_mask = (rows >= start) & (rows < end)
            a = plgpu.load(
                lhs_ref.at[pl.ds(t * tm, tm), pl.ds(k_i * tk, tk)],
                mask=row_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            b = plgpu.load(
                grad_ref.at[pl.ds(t * tm, tm), pl.ds(n_i * tn, tn)],
                mask=row_mask[:, None] & col_mask[None, :],
                other=0.0,
            )
            prod = _dot(a.astype(compute_dtype), b.astype(compute_dtype), (0, 0))
            return acc + prod.astype(jnp.float32)

        acc = jax.lax.fori_loop(first_tile, last_tile, body, jnp.zeros((tk, tn), jnp.float32))
        plgpu.store(
            out_ref.at[group, pl.ds(k_i * tk, tk), pl.ds(n_i * tn, tn)],
            acc.astype(out_ref.dtype),
            mask=k_mask[:, None] & col_mask[None, :],
        )

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((g, k, n), out_dtype),
        grid=(tiles_n, tiles_k, g),
        interpret=interpret,
        compiler_params=_params(interpret, launch),
        name="sparsejax_tgmm",
    )(starts, ends, lhs, grad)


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    """2-D dot contracting a's dim contract[0] with b's contract[1], f32 result."""
    return jax.lax.dot_general(
        a, b, (((contract[0],), (contract[1],)), ((), ())), preferred_element_type=jnp.float32
    )


def _cdiv_traced(a: jax.Array, b: int) -> jax.Array:
    return (a + b - 1) // b
