"""Grouped matmul kernels for TPU, written with the Pallas Mosaic backend.

The tile schedule (metadata.py) is computed on device and handed to the kernel
by scalar prefetch (`pltpu.PrefetchScalarGridSpec`), so BlockSpec index maps can
pick each work item's lhs row tile and expert. Operands are padded here to tile
multiples (a no-op for aligned MoE shapes); padded rows belong to no group.

`gmm_tpu`: grid (n tiles, work items, k tiles). The f32 accumulator lives in
VMEM scratch; at the last k step the rows of the item's group are merged into
the resident output block. Items of one row tile are consecutive, so the block
is written back once, after all groups in it were merged. A virtual trailing
group covers rows past the last group and merges zeros.

`tgmm_tpu`: grid (n tiles, k tiles, work items), one item per (group, row tile)
and one for each empty group; the accumulator is reset when the group changes
and stored when it is about to change, so empty groups store zeros.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.grouped_matmul import metadata


def _round_up(x: int, t: int) -> int:
    return -(-x // t) * t


def _pad_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    if tuple(x.shape) == tuple(shape):
        return x
    return jnp.pad(x, [(0, s - d) for d, s in zip(x.shape, shape)])


def _call_kwargs(interpret: bool) -> dict:
    if interpret:
        return {"interpret": pltpu.InterpretParams()}
    return {}


def _mosaic_params(semantics: tuple[str, ...]):
    return pltpu.CompilerParams(dimension_semantics=semantics)


@functools.partial(
    jax.jit,
    static_argnames=("tiling", "transpose_rhs", "out_dtype", "interpret"),
)
def gmm_tpu(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    tiling: tuple[int, int, int],
    transpose_rhs: bool,
    out_dtype: jnp.dtype,
    interpret: bool = False,
) -> jax.Array:
    """lhs [m, k], rhs [g, k, n] (or [g, n, k] if transpose_rhs) -> [m, n]."""
    m, k = lhs.shape
    g = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tk, tn = tiling
    mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
    lhs_p = _pad_to(lhs, (mp, kp))
    rhs_p = _pad_to(rhs, (g, np_, kp) if transpose_rhs else (g, kp, np_))
    tiles_m, tiles_k, tiles_n = mp // tm, kp // tk, np_ // tn

    starts, ends = metadata.group_bounds(group_sizes, m, rows=mp, trailing_group=True)
    sched = metadata.make_tile_schedule(
        starts, ends, tm=tm, tiles_m=tiles_m, visit_empty_groups=False
    )
    num_items = sched.group_ids.shape[0]
    compute_dtype = jnp.promote_types(lhs.dtype, rhs.dtype)
    dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

    def kernel(gid_ref, tile_ref, start_ref, end_ref, active_ref, lhs_ref, rhs_ref, out_ref, acc_ref):
        w = pl.program_id(1)
        k_i = pl.program_id(2)
        group = gid_ref[w]
        active = w < active_ref[0]

        @pl.when(k_i == 0)
        def _zero():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when(active & (group < g))
        def _accumulate():
            acc_ref[...] += jax.lax.dot_general(
                lhs_ref[...].astype(compute_dtype),
                rhs_ref[...].astype(compute_dtype),
                dims,
                preferred_element_type=jnp.float32,
            )

        @pl.when(active & (k_i == tiles_k - 1))
        def _merge():
            rows = tile_ref[w] * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
            mask = (rows >= start_ref[group]) & (rows < end_ref[group])
            out_ref[...] = jnp.where(
                mask, acc_ref[...], out_ref[...].astype(jnp.float32)
            ).astype(out_ref.dtype)

    def lhs_map(n_i, w, k_i, gid, tile, *_):
        return tile[w], k_i

    def rhs_map(n_i, w, k_i, gid, *_):
        e = jnp.minimum(gid[w], g - 1)
        return (e, n_i, k_i) if transpose_rhs else (e, k_i, n_i)

    def out_map(n_i, w, k_i, gid, tile, *_):
        return tile[w], n_i

    rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(tiles_n, num_items, tiles_k),
            in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
            out_specs=pl.BlockSpec((tm, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        compiler_params=_mosaic_params(("parallel", "arbitrary", "arbitrary")),
        name="sparsejax_gmm",
        **_call_kwargs(interpret),
    )(sched.group_ids, sched.tile_ids, sched.starts, sched.ends, sched.num_active, lhs_p, rhs_p)
    return out[:m, :n]


@functools.partial(jax.jit, static_argnames=("tiling", "out_dtype", "interpret"))
def tgmm_tpu(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    *,
    tiling: tuple[int, int, int],
    out_dtype: jnp.dtype,
    interpret: bool = False,
) -> jax.Array:
    """lhs [m, k], grad [m, n], group_sizes [g] -> [g, k, n] (per-group lhsᵀ @ grad)."""
    m, k = lhs.shape
    n = grad.shape[1]
    g = group_sizes.shape[0]
    tm, tk, tn = tiling
    mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
    lhs_p = _pad_to(lhs, (mp, kp))
    grad_p = _pad_to(grad, (mp, np_))
    tiles_m, tiles_k, tiles_n = mp // tm, kp // tk, np_ // tn

    starts, ends = metadata.group_bounds(group_sizes, m, rows=mp, trailing_group=False)
    sched = metadata.make_tile_schedule(
        starts, ends, tm=tm, tiles_m=tiles_m, visit_empty_groups=True
    )
    num_items = sched.group_ids.shape[0]
    compute_dtype = jnp.promote_types(lhs.dtype, grad.dtype)

    def kernel(gid_ref, tile_ref, start_ref, end_ref, active_ref, lhs_ref, grad_ref, out_ref, acc_ref):
        w = pl.program_id(2)
        group = gid_ref[w]
        prev_group = gid_ref[jnp.maximum(w - 1, 0)]
        last_item = w == pl.num_programs(2) - 1
        next_group = gid_ref[jnp.minimum(w + 1, pl.num_programs(2) - 1)]
        start = start_ref[group]
        end = end_ref[group]

        @pl.when((w == 0) | (group != prev_group))
        def _zero():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when((w < active_ref[0]) & (end > start))
        def _accumulate():
            row0 = tile_ref[w] * tm
            rows_k = row0 + jax.lax.broadcasted_iota(jnp.int32, (tm, tk), 0)
            rows_n = row0 + jax.lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
            a = jnp.where((rows_k >= start) & (rows_k < end), lhs_ref[...].astype(jnp.float32), 0.0)
            b = jnp.where((rows_n >= start) & (rows_n < end), grad_ref[...].astype(jnp.float32), 0.0)
            acc_ref[...] += jax.lax.dot(
                a.astype(compute_dtype).swapaxes(0, 1),
                b.astype(compute_dtype),
                preferred_element_type=jnp.float32,
            )

        @pl.when(last_item | (group != next_group))
        def _store():
            out_ref[...] = acc_ref[...].astype(out_ref.dtype)

    def lhs_map(n_i, k_i, w, gid, tile, *_):
        return tile[w], k_i

    def grad_map(n_i, k_i, w, gid, tile, *_):
        return tile[w], n_i

    def out_map(n_i, k_i, w, gid, *_):
        return gid[w], k_i, n_i

    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((g, kp, np_), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(tiles_n, tiles_k, num_items),
            in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((tm, tn), grad_map)],
            out_specs=pl.BlockSpec((None, tk, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
        ),
        compiler_params=_mosaic_params(("parallel", "arbitrary", "arbitrary")),
        name="sparsejax_tgmm",
        **_call_kwargs(interpret),
    )(sched.group_ids, sched.tile_ids, sched.starts, sched.ends, sched.num_active, lhs_p, grad_p)
    return out[:, :k, :n]
