"""Gathered matmul: the Triton kernels in interpret mode and the XLA backend against the
reference (stated tolerances), exactly equal to the masked dense product on exactly
representable data, padding slots ignored, bad input refused, and the kernels lowered for
CUDA on this CPU."""
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.gather_matmul import ops
from pallas_kernels.gather_matmul import xla as xla_path
from pallas_kernels.gather_matmul.reference import gather_matmul_reference

# Relative Frobenius error: float32 differs from the float64-exact reference only by
# summation order; bfloat16 by one rounding of the output (2^-8).
TOL = {"float32": 1e-5, "bfloat16": 1e-2}
BACKENDS = {"xla": dict(backend="xla"), "triton_interpret": dict(backend="gpu", interpret=True)}


def relerr(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30)


def case(rng, b, k, n, c, count, mode, dtype="float32"):
    x = jnp.asarray(rng.standard_normal((b, k)), dtype)
    w = jnp.asarray(rng.standard_normal((k, n)), dtype)
    pool = k if mode == "rows" else n
    active = rng.choice(pool, min(c, pool), replace=False)
    idx = np.concatenate([active, rng.integers(-5, pool + 5, c - active.size)]).astype(np.int32)
    idx[count:] = rng.integers(-5, pool + 5, c - count)  # padding: any value, even out of range
    return x, w, jnp.asarray(idx), jnp.int32(count)


@settings(max_examples=4, deadline=None)
@given(b=st.integers(1, 5), k=st.integers(1, 40), n=st.integers(1, 40), c=st.integers(1, 24),
       frac=st.floats(0, 1), mode=st.sampled_from(["rows", "cols", "cols_t"]),
       dtype=st.sampled_from(["float32", "bfloat16"]), seed=st.integers(0, 2**16))
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_matches_reference(backend, b, k, n, c, frac, mode, dtype, seed):
    rng = np.random.default_rng(seed)
    mode, t = ("cols", True) if mode == "cols_t" else (mode, False)
    c = min(c, k if mode == "rows" else n)
    count = int(round(frac * c))
    x, w, idx, cnt = case(rng, b, k, n, c, count, mode, dtype)
    if t:  # the same weight stored neuron-major
        y = ops.gather_matmul(x, w.T, idx, cnt, mode=mode, transpose_w=True, **BACKENDS[backend])
    else:
        y = ops.gather_matmul(x, w, idx, cnt, mode=mode, **BACKENDS[backend])
    ref = gather_matmul_reference(x, w, idx, cnt, mode)
    assert y.shape == ((b, n) if mode == "rows" else (b, c)) and y.dtype == jnp.dtype(dtype)
    assert relerr(y, ref) < TOL[dtype]
    if mode == "cols":  # slots past count are exactly zero
        np.testing.assert_array_equal(np.asarray(y, np.float32)[:, count:], 0.0)
    if count == 0:
        np.testing.assert_array_equal(np.asarray(y, np.float32), 0.0)


_R = xla_path.ROWS_PER_STEP


@pytest.mark.parametrize("count", [0, 1, _R - 1, _R, _R + 1, 2 * _R + 1, 63, 64, 65, 130, 150])
@pytest.mark.parametrize("mode", ["rows", "cols_t"])
def test_xla_loops_cover_every_active_slot(mode, count):
    """The XLA path loops over the active slots in blocks (ROWS_PER_STEP rows over
    ACCUMULATORS partial sums; COLS_PER_STEP neuron-major columns): counts at, below and
    past a block boundary, padding slots out of range."""
    rng = np.random.default_rng(count)
    x, w, idx, cnt = case(rng, 3, 200, 190, 150, count, "rows" if mode == "rows" else "cols")
    if mode == "rows":
        y = ops.gather_matmul(x, w, idx, cnt, backend="xla")
        ref = gather_matmul_reference(x, w, idx, cnt, "rows")
    else:
        y = ops.gather_matmul(x, w.T, idx, cnt, mode="cols", transpose_w=True, backend="xla")
        ref = gather_matmul_reference(x, w, idx, cnt, "cols")
        np.testing.assert_array_equal(np.asarray(y)[:, count:], 0.0)
    assert relerr(y, ref) < TOL["float32"] or count == 0
    if count == 0:
        np.testing.assert_array_equal(np.asarray(y), 0.0)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("mode", ["rows", "cols"])
def test_equals_the_masked_dense_product_exactly(backend, mode):
    """Small integers: every partial sum is exact in float32, so any summation order gives
    the same bits, and the gathered product must equal the masked dense one bit for bit."""
    rng = np.random.default_rng(0)
    b, k, n = 3, 96, 80
    x = jnp.asarray(rng.integers(-8, 9, (b, k)), jnp.float32)
    w = jnp.asarray(rng.integers(-8, 9, (k, n)), jnp.float32)
    pool = k if mode == "rows" else n
    active = np.sort(rng.choice(pool, 30, replace=False)).astype(np.int32)
    idx = jnp.asarray(np.concatenate([active, np.zeros(10, np.int32)]))
    y = np.asarray(ops.gather_matmul(x, w, idx, jnp.int32(30), mode=mode, **BACKENDS[backend]))
    mask = np.zeros(pool, np.float32)
    mask[active] = 1
    if mode == "rows":
        dense = np.asarray(jnp.dot(x * mask[None, :], w))
        np.testing.assert_array_equal(y, dense)
    else:
        dense = np.asarray(jnp.dot(x, w))
        np.testing.assert_array_equal(y[:, :30], dense[:, active])
        np.testing.assert_array_equal(y[:, 30:], 0.0)
        y_t = np.asarray(ops.gather_matmul(x, w.T, idx, jnp.int32(30), mode=mode, transpose_w=True,
                                           **BACKENDS[backend]))
        np.testing.assert_array_equal(y_t, y)


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="diag"), r"mode='diag' is not valid"),
    (dict(backend="tpu"), r"backend='tpu' is not valid"),
    (dict(backend="gpu"), r"backend='gpu' with interpret=False needs a GPU"),
])
def test_bad_arguments_are_refused(kwargs, match):
    x, w = jnp.ones((1, 4)), jnp.ones((4, 3))
    with pytest.raises(ValueError, match=match):
        ops.gather_matmul(x, w, jnp.zeros((2,), jnp.int32), 1, **kwargs)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"must be \[B, K\] and \[K, N\]"):
        ops.gather_matmul(jnp.ones((1, 4)), jnp.ones((5, 3)), jnp.zeros((2,), jnp.int32), 1)
    with pytest.raises(ValueError, match=r"idx must be a 1-D int32 array"):
        ops.gather_matmul(jnp.ones((1, 4)), jnp.ones((4, 3)), jnp.zeros((2,), jnp.float32), 1)


@pytest.mark.parametrize("mode", ["rows", "cols", "cols_t"])
def test_kernels_lower_for_cuda(kernel_calls, mode):
    x, w = jnp.ones((2, 256), jnp.bfloat16), jnp.ones((256, 384), jnp.bfloat16)
    idx = jnp.arange(64, dtype=jnp.int32)
    m, t = ("cols", True) if mode == "cols_t" else (mode, False)
    w = w.T if t else w
    fn = lambda x, w, idx, c: ops.gather_matmul(x, w, idx, c, mode=m, transpose_w=t,
                                                backend="gpu", interpret=False)
    import unittest.mock as mock
    with mock.patch.object(ops.jax, "default_backend", return_value="gpu"):
        assert kernel_calls("cuda", fn, x, w, idx, jnp.int32(40)) == 1
