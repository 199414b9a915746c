"""The Mosaic GPU block-sparse matmul (pallas_kernels/block_sparse_matmul/gpu.py) on CPU.

Interpret mode (pallas_kernels/mosaic_gpu_interpret.py) runs the kernels' own bodies: TMA
copies, barriers and WGMMAs simulated on the host. Forward, dx and dvalues (the op's VJP) are
compared with the jnp reference and its VJP, in relative Frobenius error:

* float32: below 5e-5. The kernels multiply float32 as three bfloat16 products (hi·hi +
  hi·lo + lo·hi, see gpu.py), which leaves an error near 5e-6 here.
* bfloat16: below 1e-2. Inputs are exact bfloat16 values and products accumulate in float32,
  so the error is mostly the output's rounding to bfloat16 (near 2e-3 here).

Cross-lowering: the same kernels lowered for CUDA on this CPU machine go through the real
Mosaic GPU lowering (as for Hopper, see conftest), which refuses what the interpreter lets
pass (e.g. a TMA copy with too many strided dimensions).
"""
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import mosaic_gpu_interpret
from pallas_kernels.block_sparse_matmul import gpu, ops, reference

RTOL = {jnp.float32: 5e-5, jnp.bfloat16: 1e-2}

# tokens, in_blocks, out_blocks, k, block_in, block_out. Every case leaves tokens off the
# 64-row token tile; indices (see _indices) leave input block 0 unread when k < in_blocks.
CASES = [
    (50, 3, 2, 1, 16, 16),    # square blocks, k = 1, one partial token tile
    (70, 4, 3, 2, 32, 16),    # block_in > block_out, two token tiles
    (130, 3, 2, 3, 16, 64),   # k = in_blocks (dense), block_in < block_out, three tiles
    (20, 5, 4, 2, 64, 32),    # input blocks read by none and by several, one tile
    (90, 2, 3, 2, 64, 64),    # k = in_blocks, square 64 blocks
]
BF16_CASES = [1, 3]


@pytest.fixture(autouse=True)
def _fresh_interpreter():
    """An interpreted kernel that raised leaves the interpreter's global state behind."""
    mosaic_gpu_interpret.reset_state()
    yield
    mosaic_gpu_interpret.reset_state()


def _indices(in_blocks, out_blocks, k, seed):
    """[out_blocks, k] distinct per row; input block 0 is read only when k = in_blocks."""
    rng = np.random.default_rng(seed)
    pool = np.arange(1 if k < in_blocks else 0, in_blocks)
    return jnp.asarray(np.stack([rng.choice(pool, k, replace=False) for _ in range(out_blocks)]),
                       jnp.int32)


def _inputs(case, dtype, seed):
    t, ib, ob, k, bi, bo = case
    kx, kv, kd = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(kx, (t, ib * bi), jnp.float32).astype(dtype)
    values = (jax.random.normal(kv, (ob, k, bi, bo), jnp.float32) / np.sqrt(k * bi)).astype(dtype)
    dy = jax.random.normal(kd, (t, ob * bo), jnp.float32).astype(dtype)
    return x, values, _indices(ib, ob, k, seed), dy


def _relerr(a, ref):
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-30)


def test_cases_cover_unread_and_shared_input_blocks():
    reads = [np.bincount(np.asarray(_indices(ib, ob, k, s)).ravel(), minlength=ib)
             for s, (_, ib, ob, k, _, _) in enumerate(CASES)]
    assert any((r == 0).any() for r in reads)
    assert any((r >= 2).any() for r in reads)
    assert any(k == 1 for _, _, _, k, _, _ in CASES)
    assert any(k == ib for _, ib, _, k, _, _ in CASES)
    assert all(t % 64 for t, *_ in CASES)


@pytest.mark.parametrize("dtype,case", [(jnp.float32, c) for c in range(len(CASES))]
                         + [(jnp.bfloat16, c) for c in BF16_CASES],
                         ids=lambda p: getattr(p, "__name__", str(p)))
def test_interpret_matches_reference(dtype, case):
    x, values, indices, dy = _inputs(CASES[case], dtype, seed=case)
    in_blocks = CASES[case][1]

    y, vjp = jax.vjp(lambda x, v: ops.block_sparse_matmul(x, v, indices, backend="gpu",
                                                          interpret=True), x, values)
    dx, dv = vjp(dy)
    ref, ref_vjp = jax.vjp(lambda x, v: reference.block_sparse_matmul_reference(x, v, indices),
                           x.astype(jnp.float32), values.astype(jnp.float32))
    rdx, rdv = ref_vjp(dy.astype(jnp.float32))

    assert y.shape == ref.shape and y.dtype == dtype
    assert dx.shape == x.shape and dx.dtype == dtype
    assert dv.shape == values.shape and dv.dtype == dtype
    for name, got, want in (("y", y, ref), ("dx", dx, rdx), ("dvalues", dv, rdv)):
        assert _relerr(got, want) < RTOL[dtype], name
    # input blocks no stored block reads get exactly zero gradient
    bi = values.shape[2]
    for i in set(range(in_blocks)) - set(np.asarray(indices).ravel().tolist()):
        np.testing.assert_array_equal(np.asarray(dx[:, i * bi:(i + 1) * bi], np.float32), 0.0)


def test_interpret_under_jit_with_traced_indices():
    """Indices are data: one compiled program serves two sparsity patterns."""
    x, values, _, _ = _inputs(CASES[1], jnp.float32, seed=7)
    fn = jax.jit(lambda x, v, idx: ops.block_sparse_matmul(x, v, idx, backend="gpu",
                                                           interpret=True))
    for seed in (7, 8):
        idx = _indices(4, 3, 2, seed)
        ref = reference.block_sparse_matmul_reference(x, values, idx)
        assert _relerr(fn(x, values, idx), ref) < RTOL[jnp.float32]


def test_gin_tiles():
    """Other tiles through gin: a 128-row token tile, 32 tokens per grad_values step."""
    gin.bind_parameter("block_sparse_matmul_gpu_tiles.token_tile", 128)
    gin.bind_parameter("block_sparse_matmul_gpu_tiles.grad_values_token_tile", 32)
    assert gpu.block_sparse_matmul_gpu_tiles() == (128, 32)
    x, values, indices, dy = _inputs(CASES[1], jnp.float32, seed=3)
    y, vjp = jax.vjp(lambda x, v: ops.block_sparse_matmul(x, v, indices, backend="gpu",
                                                          interpret=True), x, values)
    ref, ref_vjp = jax.vjp(lambda x, v: reference.block_sparse_matmul_reference(x, v, indices),
                           x, values)
    for got, want in zip((y, *vjp(dy)), (ref, *ref_vjp(dy))):
        assert _relerr(got, want) < RTOL[jnp.float32]
    gin.bind_parameter("block_sparse_matmul_gpu_tiles.token_tile", 96)
    with pytest.raises(ValueError, match="multiple of 64"):
        ops.block_sparse_matmul(x, values, indices, backend="gpu", interpret=True)


def test_unsupported_block_sizes_are_refused():
    x = jnp.zeros((8, 32), jnp.float32)
    with pytest.raises(ValueError, match="multiple of 16"):
        gpu.forward(x, jnp.zeros((2, 1, 8, 16)), jnp.zeros((2, 1), jnp.int32),
                    out_dtype=jnp.float32, interpret=True)
    with pytest.raises(ValueError, match="multiple of 16"):
        gpu.forward(x, jnp.zeros((2, 1, 16, 512)), jnp.zeros((2, 1), jnp.int32),
                    out_dtype=jnp.float32, interpret=True)


def test_missing_interpret_api_is_named(monkeypatch):
    monkeypatch.setattr(mosaic_gpu_interpret, "_MISSING", ["jax._src.somewhere.Gone"])
    assert not mosaic_gpu_interpret.available()
    with pytest.raises(RuntimeError, match=r"jax\._src\.somewhere\.Gone"):
        mosaic_gpu_interpret.params()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: d.__name__)
@pytest.mark.parametrize("blocks", [(16, 64), (64, 32), (128, 256)], ids=str)
def test_kernels_lower_for_cuda(kernel_calls, dtype, blocks):
    """forward, dx and dvalues each lower to one Mosaic GPU kernel for CUDA (Hopper)."""
    bi, bo = blocks
    x = jnp.zeros((200, 3 * bi), dtype)
    values = jnp.zeros((2, 2, bi, bo), dtype)
    indices = jnp.array([[0, 2], [2, 1]], jnp.int32)

    def loss(x, v):
        # the VJP wiring with backend "gpu" compiled (ops' public entry refuses it on CPU)
        return ops._bsm(x, v, indices, "gpu", False).astype(jnp.float32).sum()

    assert kernel_calls("mosaic_gpu", jax.value_and_grad(loss, (0, 1)), x, values) == 3
