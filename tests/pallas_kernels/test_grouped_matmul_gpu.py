"""Compiled (non-interpret) Triton grouped matmul on a real GPU vs the jnp reference.

Run with: SPARSEJAX_TEST_GPU=1 python -m pytest tests/pallas_kernels/test_grouped_matmul_gpu.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_matmul import ops, reference

pytestmark = pytest.mark.gpu

# Relative Frobenius error bounds: bf16 operands with f32 accumulation (~1e-3 seen), and
# f32 operands, which Triton multiplies in TF32 by default like XLA's GPU matmuls (~3e-4 seen).
RTOL = {jnp.bfloat16: 1e-2, jnp.float32: 2e-3}

CASES = [
    # m, k, n, group sizes (may leave trailing rows, contain empty groups, straddle tiles)
    (4096, 1024, 2048, [512] * 8),
    (2000, 384, 1000, [0, 1500, 3, 0, 300, 77]),
    (1000, 200, 300, [1, 2, 3, 500, 0, 100]),
]


def _relerr(x, ref):
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30)


def _inputs(m, k, n, g, dtype, seed):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    lhs = jax.random.normal(k1, (m, k), jnp.float32).astype(dtype)
    rhs = (jax.random.normal(k2, (g, k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
    ct = jax.random.normal(k3, (m, n), jnp.float32)
    return lhs, rhs, ct


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_compiled_gmm_forward_and_grads(case, dtype):
    m, k, n, sizes = CASES[case]
    gs = jnp.asarray(sizes, jnp.int32)
    lhs, rhs, ct = _inputs(m, k, n, len(sizes), dtype, seed=case)

    out = jax.jit(lambda l, r, s: ops.gmm(l, r, s, backend="gpu"))(lhs, rhs, gs)
    ref = reference.gmm_reference(lhs, rhs, gs, preferred_element_type=jnp.float32)
    assert out.shape == (m, n) and out.dtype == dtype
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
    assert _relerr(out, ref) < RTOL[dtype]
    total = min(sum(sizes), m)
    np.testing.assert_array_equal(np.asarray(out[total:], np.float32), 0.0)

    def loss(fn):
        return lambda l, r: jnp.sum(fn(l, r).astype(jnp.float32) * ct)

    d_lhs, d_rhs = jax.jit(jax.grad(loss(lambda l, r: ops.gmm(l, r, gs, backend="gpu")), (0, 1)))(lhs, rhs)
    r_lhs, r_rhs = jax.grad(
        loss(lambda l, r: reference.gmm_reference(l, r, gs, jnp.float32)), (0, 1)
    )(lhs.astype(jnp.float32), rhs.astype(jnp.float32))
    assert d_lhs.dtype == dtype and d_rhs.dtype == dtype
    assert _relerr(d_lhs, r_lhs) < RTOL[dtype]
    assert _relerr(d_rhs, r_rhs) < RTOL[dtype]
    # empty groups get exactly zero weight gradient
    for i, s in enumerate(sizes):
        if s == 0:
            np.testing.assert_array_equal(np.asarray(d_rhs[i], np.float32), 0.0)


def test_compiled_gmm_matches_ragged_dot_bf16():
    m, k, n, g = 8192, 512, 1024, 16
    lhs, rhs, _ = _inputs(m, k, n, g, jnp.bfloat16, seed=7)
    sizes = np.random.default_rng(0).multinomial(m - 100, np.ones(g) / g).astype(np.int32)
    gs = jnp.asarray(sizes)
    out = ops.gmm(lhs, rhs, gs, backend="gpu", preferred_element_type=jnp.float32)
    rd = jax.lax.ragged_dot(lhs, rhs, gs, preferred_element_type=jnp.float32)
    assert _relerr(out, rd) < 1e-3
