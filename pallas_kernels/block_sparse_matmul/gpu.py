"""Block-sparse matmul kernels for Hopper GPUs (sm_90), written with Pallas Mosaic GPU
(`plgpu`).

Same interface as xla.py (see reference.py for the op). Each kernel is a `plgpu.kernel` with
a static 2-D grid of programs (one warpgroup each); a program loops over its stored blocks,
and each step TMA-copies one block of each operand from GMEM into SMEM, waits on a barrier
and issues a WGMMA into an f32 register accumulator; the accumulator goes back to GMEM
through SMEM with one TMA store.

* forward:     program (token tile m, output block o); steps j < k:
               acc += x[m, indices[o, j]] @ values[o, j]
* grad_values: program (o, j); steps over token tiles t:
               acc += xᵀ[indices[o, j], t] @ dy[t, o]
* grad_input:  program (token tile m, input block i); steps over the transposed layout's
               entries e in offsets[i] .. offsets[i+1]-2 (the last entry of a block is a
               placeholder): acc += dy[m, out_block[e]] @ valuesᵀ[out_block[e], slot[e]];
               a block no stored block reads stores zeros.

Indices and layout entries are read as scalars from GMEM inside the loop, so they stay data
(the weight's sparsity pattern can change between steps without recompiling).

Formulation, chosen so that one kernel body both runs in Mosaic GPU interpret mode on CPU
(mosaic_gpu_interpret.py, for the tests) and lowers for Hopper:

* Matmuls are WGMMAs: Mosaic GPU lowers no register-level `dot`. WGMMA takes A [M, K] and
  B [K, N] from SMEM, tiled (8, swizzle) and swizzled (one swizzle for both: the largest
  that divides every operand's minor dimension), with M a multiple of 64 and N <= 256.
* No operand is a transposed view (`ref.T`): the interpreter cannot read one. So every
  operand is laid out in GMEM as the product needs it, A [M, K] and B [K, N] row-major:
  grad_input reads valuesᵀ and grad_values reads xᵀ, both transposed by XLA beforehand.
* float32 is computed as three bfloat16 WGMMAs (x = hi + lo, both bfloat16; hi·hi + hi·lo +
  lo·hi, the split XLA calls BF16_BF16_F32_X3): a relative error near 5e-6 in the tests,
  where TF32 would give about 3e-4, for three times the WGMMAs and the same operand bytes.
  Hopper's f32 WGMMA is TF32 and needs both operands K-major, i.e. B as a transposed view,
  which the interpreter refuses; the split keeps B N-major, which 16-bit WGMMA accepts.
  float16 and bfloat16 operands take one WGMMA; mixed operand dtypes are promoted first.
* grad_values' M is block_in, padded up to a multiple of 64: the program reads that many
  rows of xᵀ from its input block on (xᵀ is padded at the end so the read stays in bounds)
  and only the first block_in rows of its result are kept.
* Tokens are padded with zeros to a multiple of the token tile and sliced back.

Block sizes must be multiples of 16 and at most 256 (WGMMA N and swizzle limits).

Performance ideas, none needed for correctness: multi-buffer the loop (2-3 SMEM stages with
a barrier each) so TMA copies overlap the WGMMAs, which the single-buffered loop here
serialises; give each program several output blocks (or an N tile wider than block_out) and
two consumer warpgroups with 128-row token tiles; in grad_values stack the 64 // block_in
slots of one output block that share dy[t, o] along M instead of padding M; for 16-bit
dtypes drop the XLA transposes by passing transposed operand views (WGMMA supports them for
16-bit types) once the interpreter reads them; use TF32 WGMMA for float32 where its
precision is enough.
"""
from __future__ import annotations

import functools

import gin
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import mosaic_gpu_interpret
from pallas_kernels.block_sparse_matmul.metadata import TransposedLayout

# WGMMA products per step for an operand split into `parts` bfloat16 terms: (A part, B part).
_PRODUCTS = {1: ((0, 0),), 2: ((0, 0), (0, 1), (1, 0))}


@gin.configurable
def block_sparse_matmul_gpu_tiles(token_tile: int = 64,
                                  grad_values_token_tile: int = 64) -> tuple[int, int]:
    """(token_tile, grad_values_token_tile): rows of x per program in forward/grad_input
    (the WGMMA M: a multiple of 64; 128 doubles the accumulator's registers) and tokens per
    step of grad_values (its WGMMA K: a multiple of 64 keeps the 128-byte swizzle)."""
    return token_tile, grad_values_token_tile


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b


def _check_device(interpret: bool) -> None:
    """Compiled kernels need Hopper (sm_90): WGMMA is a Hopper instruction (Blackwell's
    tensor cores take tcgen05 instead)."""
    if interpret:
        return
    cc = getattr(jax.devices()[0], "compute_capability", None)
    if cc is not None and not str(cc).startswith("9."):
        raise ValueError(f"the Mosaic GPU block-sparse matmul runs on Hopper (compute "
                         f"capability 9.x), not on {jax.devices()[0].device_kind} ({cc}); "
                         f"use backend='xla'")


def _check_tiles(token_tile: int, gv_tile: int) -> None:
    if token_tile % 64 or token_tile <= 0:
        raise ValueError(f"token_tile={token_tile} must be a positive multiple of 64 (WGMMA M)")
    if gv_tile % 16 or gv_tile <= 0:
        raise ValueError(f"grad_values_token_tile={gv_tile} must be a positive multiple of 16")


def _check_block(name: str, size: int) -> None:
    if size % 16 or not 16 <= size <= 256:
        raise ValueError(f"the Mosaic GPU block-sparse matmul needs {name} a multiple of 16 in "
                         f"[16, 256] (WGMMA N and swizzle limits), got {size}; use backend='xla'")


def _split(a: jax.Array, dtype) -> jax.Array:
    """[parts, *a.shape] WGMMA operand terms: a as `dtype` (parts=1), or for float32 its
    bfloat16 hi and lo parts (a ≈ hi + lo, parts=2)."""
    if jnp.dtype(dtype) != jnp.float32:
        return a.astype(dtype)[None]
    a = a.astype(jnp.float32)
    hi = a.astype(jnp.bfloat16)
    lo = (a - hi.astype(jnp.float32)).astype(jnp.bfloat16)
    return jnp.stack([hi, lo])


def _swizzle(dtype, *minor_dims: int) -> int:
    """The largest swizzle (bytes) that divides every operand's minor dimension."""
    bits = jnp.dtype(dtype).itemsize * 8
    return min(plgpu.find_swizzle(d * bits) for d in minor_dims)


def _smem(shape: tuple[int, ...], dtype, swizzle: int):
    """An SMEM buffer tiled and swizzled for WGMMA / TMA."""
    elems = swizzle // jnp.dtype(dtype).itemsize
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, elems)),
                                                plgpu.SwizzleTransform(swizzle)))


def _out_smem(shape: tuple[int, int], dtype):
    return _smem(shape, dtype, plgpu.find_swizzle(shape[1] * jnp.dtype(dtype).itemsize * 8))


def _mma_loop(acc, a_smem, b_smem, barrier, start, stop, operands) -> None:
    """acc += sum over steps s in [start, stop) of A_s @ B_s, where operands(s) gives the
    GMEM views [parts, M, K] and [parts, K, N] of step s; `barrier` expects 2 * parts
    arrivals. Single-buffered: each step's copies land in the SMEM its previous WGMMAs
    read, so the WGMMAs are awaited before the loop goes on."""
    parts = a_smem.shape[0]

    def body(s, carry):
        a_src, b_src = operands(s)
        for p in range(parts):  # one 2-D copy per part: TMA takes at most 5 strided dims
            plgpu.copy_gmem_to_smem(a_src.at[p], a_smem.at[p], barrier)
            plgpu.copy_gmem_to_smem(b_src.at[p], b_smem.at[p], barrier)
        plgpu.barrier_wait(barrier)
        for pa, pb in _PRODUCTS[parts]:
            plgpu.wgmma(acc, a_smem.at[pa], b_smem.at[pb])
        plgpu.wgmma_wait(0)
        return carry

    jax.lax.fori_loop(start, stop, body, None)


def _accumulate(shape: tuple[int, int], loop) -> jax.Array:
    """Runs loop(acc) on a zeroed f32 WGMMA accumulator of `shape` and returns its value.
    (The accumulator gets a run_scoped of its own: the interpreter allocates registers
    apart from SMEM.)"""

    def run(acc):
        loop(acc)
        return acc[...]

    return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))


def _store(value: jax.Array, o_smem, dst) -> None:
    """Writes a register tile to GMEM `dst` through SMEM with one TMA copy."""
    o_smem[...] = value.astype(o_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, dst)
    plgpu.wait_smem_to_gmem(0)


def _compiler_params(interpret: bool):
    return None if interpret else plgpu.CompilerParams(
        dimension_semantics=("parallel", "parallel"))


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret", "tm"))
def _forward(x, values, indices, *, out_dtype, interpret, tm):
    tokens = x.shape[0]
    ob, k, bi, bo = values.shape
    dtype = jnp.promote_types(x.dtype, values.dtype)
    tp = _round_up(tokens, tm)
    xs = _split(jnp.pad(x, ((0, tp - tokens), (0, 0))), dtype)  # [parts, tp, in]
    vs = _split(values, dtype)  # [parts, ob, k, bi, bo]
    parts, op_dtype = xs.shape[0], xs.dtype
    sw = _swizzle(op_dtype, bi, bo)

    def kernel(x_ref, v_ref, idx_ref, o_ref, a_smem, b_smem, o_smem, barrier):
        m = jax.lax.axis_index("m")
        o = jax.lax.axis_index("o")

        def operands(j):
            i = idx_ref[o, j]
            return (x_ref.at[:, pl.ds(m * tm, tm), pl.ds(i * bi, bi)],
                    v_ref.at[:, o, j])

        y = _accumulate((tm, bo), lambda acc: _mma_loop(acc, a_smem, b_smem, barrier, 0, k,
                                                        operands))
        _store(y, o_smem, o_ref.at[pl.ds(m * tm, tm), pl.ds(o * bo, bo)])

    y = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((tp, ob * bo), out_dtype),
        grid=(tp // tm, ob), grid_names=("m", "o"),
        scratch_types=(_smem((parts, tm, bi), op_dtype, sw), _smem((parts, bi, bo), op_dtype, sw),
                       _out_smem((tm, bo), out_dtype), plgpu.Barrier(num_arrivals=2 * parts)),
        compiler_params=_compiler_params(interpret),
        interpret=mosaic_gpu_interpret.kernel_interpret(interpret),
        kernel_name="sparsejax_bsm_forward",
    )(xs, vs, indices)
    return y[:tokens]


@functools.partial(jax.jit, static_argnames=("block_in", "out_dtype", "interpret", "tk"))
def _grad_values(x, dy, indices, *, block_in, out_dtype, interpret, tk):
    tokens = x.shape[0]
    ob, k = indices.shape
    bi, bo = block_in, dy.shape[1] // ob
    mp = _round_up(bi, 64)  # WGMMA M
    dtype = jnp.promote_types(x.dtype, dy.dtype)
    tp = _round_up(tokens, tk)
    # xᵀ, padded so the mp rows read from the last input block on stay in bounds
    xt = _split(jnp.pad(x.T, ((0, mp - bi), (0, tp - tokens))), dtype)  # [parts, in+, tp]
    dys = _split(jnp.pad(dy, ((0, tp - tokens), (0, 0))), dtype)  # [parts, tp, out]
    parts, op_dtype = xt.shape[0], xt.dtype
    sw = _swizzle(op_dtype, tk, bo)

    def kernel(xt_ref, dy_ref, idx_ref, o_ref, a_smem, b_smem, o_smem, barrier):
        o = jax.lax.axis_index("o")
        j = jax.lax.axis_index("j")
        i = idx_ref[o, j]

        def operands(t):
            return (xt_ref.at[:, pl.ds(i * bi, mp), pl.ds(t * tk, tk)],
                    dy_ref.at[:, pl.ds(t * tk, tk), pl.ds(o * bo, bo)])

        dv = _accumulate((mp, bo), lambda acc: _mma_loop(acc, a_smem, b_smem, barrier, 0,
                                                         tp // tk, operands))
        _store(dv, o_smem, o_ref.at[o, j])

    dv = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((ob, k, mp, bo), out_dtype),
        grid=(ob, k), grid_names=("o", "j"),
        scratch_types=(_smem((parts, mp, tk), op_dtype, sw), _smem((parts, tk, bo), op_dtype, sw),
                       _out_smem((mp, bo), out_dtype), plgpu.Barrier(num_arrivals=2 * parts)),
        compiler_params=_compiler_params(interpret),
        interpret=mosaic_gpu_interpret.kernel_interpret(interpret),
        kernel_name="sparsejax_bsm_grad_values",
    )(xt, dys, indices)
    return dv[:, :, :bi]


@functools.partial(jax.jit, static_argnames=("in_blocks", "out_dtype", "interpret", "tm"))
def _grad_input(dy, values, out_block, slot, offsets, *, in_blocks, out_dtype, interpret, tm):
    tokens = dy.shape[0]
    ob, k, bi, bo = values.shape
    dtype = jnp.promote_types(dy.dtype, values.dtype)
    tp = _round_up(tokens, tm)
    dys = _split(jnp.pad(dy, ((0, tp - tokens), (0, 0))), dtype)  # [parts, tp, out]
    vt = _split(values.transpose(0, 1, 3, 2), dtype)  # [parts, ob, k, bo, bi]
    parts, op_dtype = dys.shape[0], dys.dtype
    sw = _swizzle(op_dtype, bo, bi)

    def kernel(dy_ref, vt_ref, out_block_ref, slot_ref, offsets_ref, o_ref, a_smem, b_smem,
               o_smem, barrier):
        m = jax.lax.axis_index("m")
        i = jax.lax.axis_index("i")
        # the block's last entry is its placeholder
        start, stop = offsets_ref[i], offsets_ref[i + 1] - 1

        def operands(e):
            o, j = out_block_ref[e], slot_ref[e]
            return (dy_ref.at[:, pl.ds(m * tm, tm), pl.ds(o * bo, bo)],
                    vt_ref.at[:, o, j])

        dx = _accumulate((tm, bi), lambda acc: _mma_loop(acc, a_smem, b_smem, barrier, start,
                                                         stop, operands))
        _store(dx, o_smem, o_ref.at[pl.ds(m * tm, tm), pl.ds(i * bi, bi)])

    dx = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((tp, in_blocks * bi), out_dtype),
        grid=(tp // tm, in_blocks), grid_names=("m", "i"),
        scratch_types=(_smem((parts, tm, bo), op_dtype, sw), _smem((parts, bo, bi), op_dtype, sw),
                       _out_smem((tm, bi), out_dtype), plgpu.Barrier(num_arrivals=2 * parts)),
        compiler_params=_compiler_params(interpret),
        interpret=mosaic_gpu_interpret.kernel_interpret(interpret),
        kernel_name="sparsejax_bsm_grad_input",
    )(dys, vt, out_block, slot, offsets)
    return dx[:tokens]


def _tiles(interpret: bool) -> tuple[int, int]:
    _check_device(interpret)
    tm, tk = block_sparse_matmul_gpu_tiles()
    _check_tiles(tm, tk)
    return tm, tk


def forward(x: jax.Array, values: jax.Array, indices: jax.Array, *, out_dtype,
            interpret: bool = False) -> jax.Array:
    """x [tokens, in] -> [tokens, out_blocks * block_out]."""
    _check_block("block_in", values.shape[2])
    _check_block("block_out", values.shape[3])
    tm, _ = _tiles(interpret)
    return _forward(x, values, indices, out_dtype=jnp.dtype(out_dtype), interpret=interpret,
                    tm=tm)


def grad_values(x: jax.Array, dy: jax.Array, indices: jax.Array, block_in: int, *, out_dtype,
                interpret: bool = False) -> jax.Array:
    """[out_blocks, k, block_in, block_out]: each stored block's gradient."""
    _check_block("block_in", block_in)
    _check_block("block_out", dy.shape[1] // indices.shape[0])
    _, tk = _tiles(interpret)
    return _grad_values(x, dy, indices, block_in=block_in, out_dtype=jnp.dtype(out_dtype),
                        interpret=interpret, tk=tk)


def grad_input(dy: jax.Array, values: jax.Array, indices: jax.Array, layout: TransposedLayout,
               in_blocks: int, *, out_dtype, interpret: bool = False) -> jax.Array:
    """[tokens, in_blocks * block_in]: dy @ Wᵀ, one program per (token tile, input block)
    over the stored blocks that read the input block (`layout`; `indices` is unused)."""
    del indices
    _check_block("block_in", values.shape[2])
    _check_block("block_out", values.shape[3])
    tm, _ = _tiles(interpret)
    return _grad_input(dy, values, layout.out_block, layout.slot, layout.offsets,
                       in_blocks=in_blocks, out_dtype=jnp.dtype(out_dtype),
                       interpret=interpret, tm=tm)
