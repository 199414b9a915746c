"""The block-sparse matmul's TPU (Mosaic) kernels: numbers in interpret mode against the
reference, block-shape and tile settings, and the real Mosaic lowering (see conftest)."""

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse_matmul import metadata, ops, reference, tpu

# Relative Frobenius error bounds, (forward, gradients). float32: CPU interpret mode is exact
# float32 up to summation order. bfloat16: the reference takes the same bf16 inputs in
# float32, so the error is the bf16 rounding of the output (2^-9 relative) and, for the
# gradients, of the bf16 cotangent too.
TOL = {"float32": (1e-5, 1e-5), "bfloat16": (1e-2, 1e-2)}

# (tokens, in_blocks, block_in, block_out, token tile, indices [out_blocks, k])
CASES = {
    # 8x8 blocks, three token tiles (the last padded); block 2 read by every column, block 3
    # by none
    "square8_shared_and_unread": (20, 4, 8, 8, 8, [[0, 2], [2, 1], [2, 0]]),
    # k = in_blocks: every column reads every block, in a different order
    "nonsquare16x8_k_full": (37, 3, 16, 8, 16, [[0, 1, 2], [2, 0, 1]]),
    # k = 1, block_out > block_in, fewer tokens than one tile
    "nonsquare8x32_k1": (9, 5, 8, 32, 16, [[4], [1], [4], [0]]),
    # the first four input blocks are read by nobody: the transposed layout starts with a
    # run of placeholders
    "square16_leading_unread": (40, 6, 16, 16, 16, [[5, 4], [4, 5]]),
    "square32_dense": (24, 2, 32, 32, 16, [[1, 0], [0, 1]]),
}
BF16_CASES = ["square8_shared_and_unread", "nonsquare8x32_k1", "square32_dense"]
PARAMS = [(c, "float32") for c in CASES] + [(c, "bfloat16") for c in BF16_CASES]


def _relerr(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30)


@pytest.fixture
def token_tiles():
    """``token_tiles(tm)`` binds every kernel's token tile to ``tm`` for the test."""
    def bind(tm):
        with gin.unlock_config():
            for op in ("forward", "grad_input", "grad_values"):
                gin.bind_parameter(f"bsm_tpu_token_tiles.{op}", tm)

    yield bind
    gin.clear_config()


@pytest.mark.parametrize("case, dtype", PARAMS, ids=[f"{c}-{d}" for c, d in PARAMS])
def test_forward_and_grads_match_reference(token_tiles, case, dtype):
    tokens, in_blocks, bi, bo, tm, idx = CASES[case]
    token_tiles(tm)
    indices = jnp.asarray(idx, jnp.int32)
    ob, k = indices.shape
    rng = np.random.default_rng(len(case))
    x = jnp.asarray(rng.standard_normal((tokens, in_blocks * bi)), dtype)
    values = jnp.asarray(rng.standard_normal((ob, k, bi, bo)), dtype)
    ct = jnp.asarray(rng.standard_normal((tokens, ob * bo)), dtype)
    fwd_tol, grad_tol = TOL[dtype]

    @jax.jit  # indices traced, as under dynamic sparse training
    def run(x, values, indices, ct):
        y, vjp = jax.vjp(lambda a, v: ops.block_sparse_matmul(a, v, indices, backend="tpu",
                                                              interpret=True), x, values)
        return (y, *vjp(ct))

    y, dx, dv = run(x, values, indices, ct)
    ref, ref_vjp = jax.vjp(lambda a, v: reference.block_sparse_matmul_reference(a, v, indices),
                           x.astype(jnp.float32), values.astype(jnp.float32))
    rdx, rdv = ref_vjp(ct.astype(jnp.float32))

    assert y.shape == (tokens, ob * bo) and y.dtype == x.dtype
    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert dv.shape == values.shape and dv.dtype == values.dtype
    assert _relerr(y, ref) <= fwd_tol
    assert _relerr(dx, rdx) <= grad_tol
    assert _relerr(dv, rdv) <= grad_tol
    unread = sorted(set(range(in_blocks)) - set(np.ravel(idx).tolist()))
    for i in unread:  # written by their placeholder alone
        np.testing.assert_array_equal(np.asarray(dx[:, i * bi:(i + 1) * bi], np.float32), 0.0)


def test_mixed_dtypes_compute_in_the_promoted_dtype():
    """bf16 activations with f32 weights: float32 output, bf16 dx and f32 dvalues."""
    rng = np.random.default_rng(3)
    indices = jnp.array([[1, 0], [1, 2]], jnp.int32)
    x = jnp.asarray(rng.standard_normal((12, 24)), jnp.bfloat16)
    values = jnp.asarray(rng.standard_normal((2, 2, 8, 8)), jnp.float32)
    f = lambda a, v: ops.block_sparse_matmul(a, v, indices, backend="tpu", interpret=True)
    y, vjp = jax.vjp(f, x, values)
    dx, dv = vjp(jnp.ones_like(y))
    assert (y.dtype, dx.dtype, dv.dtype) == (jnp.float32, jnp.bfloat16, jnp.float32)
    ref, ref_vjp = jax.vjp(lambda a, v: reference.block_sparse_matmul_reference(a, v, indices),
                           x.astype(jnp.float32), values)
    rdx, rdv = ref_vjp(jnp.ones_like(ref))
    assert _relerr(y, ref) <= 1e-5
    assert _relerr(dx, rdx) <= 1e-2  # bf16 output rounding
    assert _relerr(dv, rdv) <= 1e-5


def test_empty_token_batch():
    indices = jnp.array([[0], [1]], jnp.int32)
    x = jnp.zeros((0, 16), jnp.float32)
    values = jnp.ones((2, 1, 8, 8), jnp.float32)
    f = lambda a, v: ops.block_sparse_matmul(a, v, indices, backend="tpu", interpret=True)
    y, vjp = jax.vjp(f, x, values)
    dx, dv = vjp(y)
    assert y.shape == (0, 16) and dx.shape == (0, 16)
    np.testing.assert_array_equal(dv, 0.0)


@pytest.mark.parametrize("tm_max, tokens, dtype, want", [
    (512, 600, jnp.float32, 304),   # two even tiles, not 512 + 88 padded to 1024
    (512, 1024, jnp.bfloat16, 512),
    (512, 5, jnp.float32, 8),       # small problems shrink the tile
    (512, 5, jnp.bfloat16, 16),     # 16-bit activations: (16, 128) native tile
    (8, 20, jnp.bfloat16, 16),      # a tile below the dtype's sublane tile is rounded up
])
def test_token_tile_is_even_and_sublane_aligned(tm_max, tokens, dtype, want):
    assert tpu._token_tile(tm_max, tokens, dtype) == want


def test_bad_settings_raise_value_error(token_tiles):
    token_tiles(12)
    with pytest.raises(ValueError, match=r"bsm_tpu_token_tiles.forward=12"):
        tpu.bsm_tpu_token_tiles()
    x = jnp.zeros((16, 32), jnp.float32)
    values = jnp.zeros((2, 1, 16, 128), jnp.float32)
    indices = jnp.array([[0], [1]], jnp.int32)
    with pytest.raises(ValueError, match="block_in=16 must be a multiple of 128"):
        tpu.forward(x, values, indices, out_dtype=jnp.float32, interpret=False)
    layout = metadata.transpose_layout(indices[:1], 2)
    with pytest.raises(ValueError, match="layout has"):
        tpu.grad_input(jnp.zeros((16, 256)), values, indices, layout, 2, out_dtype=jnp.float32,
                       interpret=True)


@pytest.mark.parametrize("tokens, in_blocks, block_in, block_out, k, dtype", [
    (512, 8, 128, 128, 3, jnp.float32),
    (512, 8, 128, 128, 3, jnp.bfloat16),
    (300, 4, 256, 128, 2, jnp.bfloat16),  # padded token tile, non-square blocks
])
def test_kernels_lower_for_tpu(kernel_calls, tokens, in_blocks, block_in, block_out, k, dtype):
    """The forward, grad_input and grad_values kernels pass the real Mosaic lowering."""
    ob = 4
    x = jnp.zeros((tokens, in_blocks * block_in), dtype)
    values = jnp.zeros((ob, k, block_in, block_out), dtype)
    indices = jnp.asarray(np.stack([np.roll(np.arange(k), o) + o for o in range(ob)])
                          % in_blocks, jnp.int32)

    def fwd(x, values):
        return ops._bsm(x, values, indices, "tpu", False)

    def loss(x, values):
        return fwd(x, values).astype(jnp.float32).sum()

    assert kernel_calls("tpu", fwd, x, values) == 1
    assert kernel_calls("tpu", jax.value_and_grad(loss, (0, 1)), x, values) == 3
