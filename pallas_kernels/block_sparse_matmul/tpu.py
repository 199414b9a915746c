"""The block-sparse matmul as Pallas TPU (Mosaic) kernels (see reference.py for the op).

Each kernel reads the sparsity pattern by scalar prefetch (`pltpu.PrefetchScalarGridSpec`):
the index arrays land in SMEM before the grid runs, and the BlockSpec index maps read them,
so every grid step DMAs exactly the stored block and the activation block it needs. Products
accumulate in a float32 VMEM scratch; float32 operands multiply at the highest precision.

* forward:      grid (token tiles, out_blocks, k). Step (t, o, j) adds
                x[t, indices[o, j]] @ values[o, j] to the accumulator of output block (t, o)
                and writes it at the last j.
* grad_values:  grid (out_blocks, k, token tiles). Step (o, j, t) adds
                x[t, indices[o, j]]ᵀ @ dy[t, o]; dvalues[o, j] is written at the last t.
* grad_input:   grid (token tiles, entries of the transposed layout, metadata.py). Entries are
                sorted by input block, so the steps that add into one dx block are consecutive:
                the accumulator is zeroed at a block's first entry and written at its last.
                Every input block owns one placeholder entry (valid == 0) that adds nothing, so
                blocks no stored block reads are still zeroed and written. A placeholder fetches
                the same dy and values blocks as the step before it, which Pallas does not copy
                again.

Tokens are padded to a multiple of the token tile (`bsm_tpu_token_tiles`) with zeros, which
add nothing to any product, and sliced off again.

Block sizes on a real TPU: a BlockSpec's last two dims must be multiples of (8, 128) or span
the whole array. The stored blocks [block_in, block_out] always span values' last two dims;
the activation blocks are [tm, block_in] (x, dx) and [tm, block_out] (y, dy), so block_in and
block_out must be multiples of 128 (128 fills the MXU on v5e; 256 on v6e) unless the layer
has a single input (output) block. The token tile is a multiple of 8, or of 16 for 16-bit
activations (their native (16, 128) tile). Interpret mode takes any block size. The index
arrays live in SMEM (16 KiB on v2/v3, 1 MiB on later chips): forward and grad_values hold
out_blocks * k int32, grad_input four arrays of out_blocks * k + in_blocks.

VMEM per step (double-buffered inputs and output, plus the scratch), e.g. forward:
2 * (tm * block_in + block_in * block_out) * itemsize + 2 * tm * block_out * itemsize
+ tm * block_out * 4 bytes; with tm = 512 and 128 x 128 blocks in bfloat16 that is 0.8 MiB.
"""
from __future__ import annotations

import functools

import gin
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.block_sparse_matmul.metadata import TransposedLayout

LANES = 128


@gin.configurable
def bsm_tpu_token_tiles(forward: int = 512, grad_input: int = 512,
                        grad_values: int = 512) -> tuple[int, int, int]:
    """Largest token tile (rows of x, y, dx and dy per grid step) of each kernel; positive
    multiples of 8. A problem with fewer tokens gets one tile of its own (rounded up) size,
    and tokens are split into equal tiles, so padding stays under one sublane tile per tile."""
    for name, t in (("forward", forward), ("grad_input", grad_input),
                    ("grad_values", grad_values)):
        if not isinstance(t, int) or t <= 0 or t % 8:
            raise ValueError(f"bsm_tpu_token_tiles.{name}={t!r} must be a positive multiple "
                             f"of 8")
    return forward, grad_input, grad_values


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _token_tile(tm_max: int, tokens: int, *dtypes) -> int:
    """The fewest tiles of at most `tm_max` tokens (rounded up to the sublane tile of the
    narrowest activation dtype: 8 rows for 32-bit, 16 for 16-bit) that cover `tokens`, sized
    evenly."""
    align = 8 * max(1, 4 // min(jnp.dtype(d).itemsize for d in dtypes))
    tm_max = _cdiv(tm_max, align) * align
    tiles = _cdiv(tokens, tm_max)
    return _cdiv(_cdiv(tokens, tiles), align) * align


def _pad_rows(a: jax.Array, rows: int) -> jax.Array:
    """Zero-pads a [tokens, features] array to `rows` rows."""
    return a if a.shape[0] == rows else jnp.pad(a, ((0, rows - a.shape[0]), (0, 0)))


def _check_blocks(block_in: int, block_out: int, in_blocks: int, out_blocks: int,
                  interpret: bool) -> None:
    """Refuses block sizes the Mosaic lowering cannot tile (see module doc)."""
    if interpret:
        return
    for name, b, n in (("block_in", block_in, in_blocks), ("block_out", block_out, out_blocks)):
        if b % LANES and n > 1:
            raise ValueError(f"{name}={b} must be a multiple of {LANES} for the TPU kernel "
                             f"(the minor dim of its activation blocks); use interpret=True "
                             f"or backend='xla' for other block sizes")


def _call_kwargs(interpret: bool) -> dict:
    return {"interpret": pltpu.InterpretParams()} if interpret else {}


def _compiler_params(semantics: tuple[str, ...]):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    """2-D product contracting a's dim contract[0] with b's contract[1], float32 result
    (float32 operands at the highest precision, not one bfloat16 pass)."""
    prec = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------- forward


def _forward_kernel(idx_ref, x_ref, v_ref, y_ref, acc_ref, *, compute_dtype):
    """Step (t, o, j): acc += x[t, indices[o, j]] [tm, bi] @ values[o, j] [bi, bo]."""
    j = pl.program_id(2)

    @pl.when(j == 0)
    def _zero():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    acc_ref[...] += _dot(x_ref[...].astype(compute_dtype), v_ref[...].astype(compute_dtype),
                         (1, 0))

    @pl.when(j == pl.num_programs(2) - 1)
    def _store():
        y_ref[...] = acc_ref[...].astype(y_ref.dtype)


@functools.partial(jax.jit, static_argnames=("tm", "out_dtype", "interpret"))
def _forward(x, values, indices, *, tm, out_dtype, interpret):
    tokens = x.shape[0]
    ob, k, bi, bo = values.shape
    rows = _cdiv(tokens, tm) * tm
    xp = _pad_rows(x, rows)  # [rows, in]
    compute_dtype = jnp.promote_types(x.dtype, values.dtype)

    def x_map(t, o, j, idx):
        return t, idx[o * k + j]

    def v_map(t, o, j, idx):
        return o, j, 0, 0

    def y_map(t, o, j, idx):
        return t, o

    y = pl.pallas_call(
        functools.partial(_forward_kernel, compute_dtype=compute_dtype),
        out_shape=jax.ShapeDtypeStruct((rows, ob * bo), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(rows // tm, ob, k),
            in_specs=[pl.BlockSpec((tm, bi), x_map),
                      pl.BlockSpec((None, None, bi, bo), v_map)],
            out_specs=pl.BlockSpec((tm, bo), y_map),
            scratch_shapes=[pltpu.VMEM((tm, bo), jnp.float32)],
        ),
        compiler_params=_compiler_params(("parallel", "parallel", "arbitrary")),
        name="sparsejax_bsm_fwd",
        **_call_kwargs(interpret),
    )(indices.reshape(-1), xp, values)
    return y[:tokens]


def forward(x: jax.Array, values: jax.Array, indices: jax.Array, *, out_dtype,
            interpret: bool = False) -> jax.Array:
    """x [tokens, in] -> [tokens, out_blocks * block_out]."""
    ob, _, bi, bo = values.shape
    _check_blocks(bi, bo, x.shape[1] // bi, ob, interpret)
    if x.shape[0] == 0:
        return jnp.zeros((0, ob * bo), out_dtype)
    tm = _token_tile(bsm_tpu_token_tiles()[0], x.shape[0], x.dtype, out_dtype)
    return _forward(x, values, indices, tm=tm, out_dtype=jnp.dtype(out_dtype),
                    interpret=interpret)


# ----------------------------------------------------------------------------- grad_values


def _grad_values_kernel(idx_ref, x_ref, dy_ref, dv_ref, acc_ref, *, compute_dtype):
    """Step (o, j, t): acc += x[t, indices[o, j]]ᵀ [bi, tm] @ dy[t, o] [tm, bo]."""
    t = pl.program_id(2)

    @pl.when(t == 0)
    def _zero():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    acc_ref[...] += _dot(x_ref[...].astype(compute_dtype), dy_ref[...].astype(compute_dtype),
                         (0, 0))

    @pl.when(t == pl.num_programs(2) - 1)
    def _store():
        dv_ref[...] = acc_ref[...].astype(dv_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_in", "tm", "out_dtype", "interpret"))
def _grad_values(x, dy, indices, *, block_in, tm, out_dtype, interpret):
    tokens = x.shape[0]
    ob, k = indices.shape
    bi = block_in
    bo = dy.shape[1] // ob
    rows = _cdiv(tokens, tm) * tm
    xp = _pad_rows(x, rows)  # [rows, in]
    dyp = _pad_rows(dy, rows)  # [rows, ob * bo]
    compute_dtype = jnp.promote_types(x.dtype, dy.dtype)

    def x_map(o, j, t, idx):
        return t, idx[o * k + j]

    def dy_map(o, j, t, idx):
        return t, o

    def dv_map(o, j, t, idx):
        return o, j, 0, 0

    return pl.pallas_call(
        functools.partial(_grad_values_kernel, compute_dtype=compute_dtype),
        out_shape=jax.ShapeDtypeStruct((ob, k, bi, bo), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(ob, k, rows // tm),
            in_specs=[pl.BlockSpec((tm, bi), x_map), pl.BlockSpec((tm, bo), dy_map)],
            out_specs=pl.BlockSpec((None, None, bi, bo), dv_map),
            scratch_shapes=[pltpu.VMEM((bi, bo), jnp.float32)],
        ),
        compiler_params=_compiler_params(("parallel", "parallel", "arbitrary")),
        name="sparsejax_bsm_grad_values",
        **_call_kwargs(interpret),
    )(indices.reshape(-1), xp, dyp)


def grad_values(x: jax.Array, dy: jax.Array, indices: jax.Array, block_in: int, *,
                out_dtype, interpret: bool = False) -> jax.Array:
    """[out_blocks, k, block_in, block_out]: each stored block's gradient
    x[:, block indices[o, j]]ᵀ @ dy[:, block o]."""
    ob, k = indices.shape
    bo = dy.shape[1] // ob
    _check_blocks(block_in, bo, x.shape[1] // block_in, ob, interpret)
    if x.shape[0] == 0:
        return jnp.zeros((ob, k, block_in, bo), out_dtype)
    tm = _token_tile(bsm_tpu_token_tiles()[2], x.shape[0], x.dtype, dy.dtype)
    return _grad_values(x, dy, indices, block_in=block_in, tm=tm,
                        out_dtype=jnp.dtype(out_dtype), interpret=interpret)


# ----------------------------------------------------------------------------- grad_input


def _grad_input_kernel(in_ref, out_ref, slot_ref, valid_ref, dy_ref, v_ref, dx_ref, acc_ref, *,
                       compute_dtype):
    """Step (t, e): acc += dy[t, out_block[e]] [tm, bo] @ values[out_block[e], slot[e]]ᵀ
    [bo, bi] for a stored entry; dx block (t, in_block[e]) is zeroed at its first entry and
    written at its last."""
    del out_ref, slot_ref  # read by the index maps only
    e = pl.program_id(1)
    n = pl.num_programs(1)
    block = in_ref[e]
    first = (e == 0) | (in_ref[jnp.maximum(e - 1, 0)] != block)
    last = (e == n - 1) | (in_ref[jnp.minimum(e + 1, n - 1)] != block)

    @pl.when(first)
    def _zero():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(valid_ref[e] == 1)
    def _accumulate():
        acc_ref[...] += _dot(dy_ref[...].astype(compute_dtype),
                             v_ref[...].astype(compute_dtype), (1, 1))

    @pl.when(last)
    def _store():
        dx_ref[...] = acc_ref[...].astype(dx_ref.dtype)


@functools.partial(jax.jit, static_argnames=("in_blocks", "tm", "out_dtype", "interpret"))
def _grad_input(dy, values, layout, *, in_blocks, tm, out_dtype, interpret):
    tokens = dy.shape[0]
    ob, k, bi, bo = values.shape
    rows = _cdiv(tokens, tm) * tm
    dyp = _pad_rows(dy, rows)  # [rows, ob * bo]
    n = layout.in_block.shape[0]  # nnz + in_blocks
    valid = layout.valid.astype(jnp.int32)
    # The block a placeholder fetches: that of the last stored entry before it (entry 0's,
    # placeholder or not, for placeholders that lead the list), so it costs no DMA.
    src = jax.lax.cummax(jnp.where(valid == 1, jnp.arange(n, dtype=jnp.int32), 0))
    fetch_out = layout.out_block.astype(jnp.int32)[src]  # [n]
    fetch_slot = layout.slot.astype(jnp.int32)[src]  # [n]
    compute_dtype = jnp.promote_types(dy.dtype, values.dtype)

    def dy_map(t, e, in_b, out_b, slot, valid):
        return t, out_b[e]

    def v_map(t, e, in_b, out_b, slot, valid):
        return out_b[e], slot[e], 0, 0

    def dx_map(t, e, in_b, out_b, slot, valid):
        return t, in_b[e]

    dx = pl.pallas_call(
        functools.partial(_grad_input_kernel, compute_dtype=compute_dtype),
        out_shape=jax.ShapeDtypeStruct((rows, in_blocks * bi), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(rows // tm, n),
            in_specs=[pl.BlockSpec((tm, bo), dy_map),
                      pl.BlockSpec((None, None, bi, bo), v_map)],
            out_specs=pl.BlockSpec((tm, bi), dx_map),
            scratch_shapes=[pltpu.VMEM((tm, bi), jnp.float32)],
        ),
        compiler_params=_compiler_params(("parallel", "arbitrary")),
        name="sparsejax_bsm_grad_input",
        **_call_kwargs(interpret),
    )(layout.in_block.astype(jnp.int32), fetch_out, fetch_slot, valid, dyp, values)
    return dx[:tokens]


def grad_input(dy: jax.Array, values: jax.Array, indices: jax.Array, layout: TransposedLayout,
               in_blocks: int, *, out_dtype, interpret: bool = False) -> jax.Array:
    """[tokens, in_blocks * block_in]: dy @ Wᵀ, walking `layout` (metadata.transpose_layout
    of `indices`, which is not read again here)."""
    del indices
    ob, k, bi, bo = values.shape
    if layout.in_block.shape != (ob * k + in_blocks,):
        raise ValueError(f"layout has {layout.in_block.shape} entries; want "
                         f"(out_blocks * k + in_blocks,) = {(ob * k + in_blocks,)} "
                         f"(metadata.transpose_layout of indices {(ob, k)})")
    _check_blocks(bi, bo, in_blocks, ob, interpret)
    if dy.shape[0] == 0:
        return jnp.zeros((0, in_blocks * bi), out_dtype)
    tm = _token_tile(bsm_tpu_token_tiles()[1], dy.shape[0], dy.dtype, out_dtype)
    return _grad_input(dy, values, layout, in_blocks=in_blocks, tm=tm,
                       out_dtype=jnp.dtype(out_dtype), interpret=interpret)
