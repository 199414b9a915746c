"""Compiled (non-interpret) Mosaic GPU block-sparse matmul on a Hopper GPU vs the jnp
reference.

Run with: SPARSEJAX_TEST_GPU=1 python -m pytest tests/pallas_kernels/test_block_sparse_matmul_gpu.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse_matmul import ops, reference

pytestmark = pytest.mark.gpu

# Relative Frobenius error bounds: bf16 operands with f32 accumulation (mostly the output's
# bf16 rounding, ~2e-3 in interpret mode), and f32 operands, which the kernels multiply as
# three bf16 products (~5e-6 in interpret mode; TF32 would be ~3e-4).
RTOL = {jnp.bfloat16: 1e-2, jnp.float32: 5e-5}

CASES = [
    # tokens, in_blocks, out_blocks, k, block_in, block_out
    (4096, 32, 16, 8, 64, 64),
    (2000, 12, 24, 3, 128, 64),    # tokens off the tile, block_in > block_out
    (1000, 40, 8, 40, 32, 128),    # k = in_blocks
    (333, 16, 16, 1, 16, 256),     # k = 1, widest block_out
]


@pytest.fixture(autouse=True)
def _hopper():
    cc = getattr(jax.devices()[0], "compute_capability", "")
    if not str(cc).startswith("9."):
        pytest.skip(f"needs a Hopper GPU (compute capability 9.x), found {cc or 'none'}")


def _relerr(x, ref):
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30)


def _inputs(case, dtype, seed):
    t, ib, ob, k, bi, bo = case
    rng = np.random.default_rng(seed)
    # input block 0 stays unread unless k = in_blocks
    pool = np.arange(1 if k < ib else 0, ib)
    idx = jnp.asarray(np.stack([rng.choice(pool, k, replace=False) for _ in range(ob)]),
                      jnp.int32)
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(k1, (t, ib * bi), jnp.float32).astype(dtype)
    values = (jax.random.normal(k2, (ob, k, bi, bo), jnp.float32) / np.sqrt(k * bi)).astype(dtype)
    ct = jax.random.normal(k3, (t, ob * bo), jnp.float32)
    return x, values, idx, ct


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_compiled_forward_and_grads(case, dtype):
    x, values, idx, ct = _inputs(CASES[case], dtype, seed=case)
    bi = values.shape[2]

    out = jax.jit(lambda x, v, i: ops.block_sparse_matmul(x, v, i, backend="gpu"))(x, values, idx)
    ref = reference.block_sparse_matmul_reference(x, values, idx)
    assert out.shape == ref.shape and out.dtype == dtype
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
    assert _relerr(out, ref) < RTOL[dtype]

    def loss(fn):
        return lambda x, v: jnp.sum(fn(x, v).astype(jnp.float32) * ct)

    dx, dv = jax.jit(jax.grad(loss(lambda x, v: ops.block_sparse_matmul(x, v, idx, backend="gpu")),
                              (0, 1)))(x, values)
    rdx, rdv = jax.grad(loss(lambda x, v: reference.block_sparse_matmul_reference(x, v, idx)),
                        (0, 1))(x.astype(jnp.float32), values.astype(jnp.float32))
    assert dx.dtype == dtype and dv.dtype == dtype
    assert _relerr(dx, rdx) < RTOL[dtype]
    assert _relerr(dv, rdv) < RTOL[dtype]
    # input blocks no stored block reads get exactly zero gradient
    for i in set(range(x.shape[1] // bi)) - set(np.asarray(idx).ravel().tolist()):
        np.testing.assert_array_equal(np.asarray(dx[:, i * bi:(i + 1) * bi], np.float32), 0.0)


def test_compiled_matches_xla_backend_bf16():
    x, values, idx, _ = _inputs((8192, 16, 16, 4, 128, 128), jnp.bfloat16, seed=11)
    out = ops.block_sparse_matmul(x, values, idx, backend="gpu")
    xla = ops.block_sparse_matmul(x, values, idx, backend="xla")
    assert _relerr(out, xla) < 1e-2
