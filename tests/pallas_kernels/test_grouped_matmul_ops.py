"""Public gmm/tgmm: each kernel backend in interpret mode, and the XLA backend, vs the
reference and ragged_dot."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.grouped_matmul import ops, reference

# Relative Frobenius error bounds. float32: CPU interpret mode is exact f32 up to
# summation order. bfloat16: one bf16 rounding of the output (2^-8) and, for the
# gradients, of the cotangent too.
TOL = {"float32": (1e-5, 1e-5), "bfloat16": (1e-2, 2e-2)}  # (forward, gradients)
KERNELS = ["gpu", "tpu"]
# Test ids must not contain "gpu": conftest skips every test with that keyword on CPU.
IDS = {"gpu": "triton_interpret", "tpu": "mosaic_interpret", "xla": "xla"}
_id = IDS.get


def _relerr(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30)


def _sizes(draw_kind: str, m: int, g: int, rng: np.random.Generator) -> np.ndarray:
    if draw_kind == "one_group_all":
        s = np.zeros(g, np.int32)
        s[rng.integers(g)] = m
    elif draw_kind == "empty_and_trailing":
        s = rng.integers(0, max(1, m // g) + 1, g).astype(np.int32)
        s[rng.integers(g)] = 0
    else:  # "full": random split of exactly m rows, boundaries land inside tiles
        cuts = np.sort(rng.integers(0, m + 1, g - 1))
        s = np.diff(np.concatenate([[0], cuts, [m]])).astype(np.int32)
    return s


@settings(max_examples=5, deadline=None)
@given(
    m=st.integers(1, 64),
    k=st.integers(1, 48),
    n=st.integers(1, 48),
    g=st.integers(1, 6),
    tiles=st.tuples(st.sampled_from([8, 16]), st.sampled_from([8, 16]), st.sampled_from([8, 16])),
    kind=st.sampled_from(["full", "one_group_all", "empty_and_trailing"]),
    dtype=st.sampled_from(["float32", "bfloat16"]),
    seed=st.integers(0, 2**16),
)
@pytest.mark.parametrize("backend", KERNELS + ["xla"], ids=_id)
def test_kernel_forward_and_grads_match_reference(backend, m, k, n, g, tiles, kind, dtype, seed):
    rng = np.random.default_rng(seed)
    gs = jnp.asarray(_sizes(kind, m, g, rng))
    lhs = jnp.asarray(rng.standard_normal((m, k)), dtype)
    rhs = jnp.asarray(rng.standard_normal((g, k, n)), dtype)
    ct = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
    fwd_tol, grad_tol = TOL[dtype]

    def run(l, r):
        return ops.gmm(l, r, gs, backend=backend, interpret=True, tiling=tiles)

    out = run(lhs, rhs)
    assert out.shape == (m, n) and out.dtype == lhs.dtype
    ref = reference.gmm_reference(lhs, rhs, gs, jnp.float32)
    assert _relerr(out, ref) <= fwd_tol
    rd = jax.lax.ragged_dot(lhs, rhs, gs, preferred_element_type=jnp.float32)
    assert _relerr(out, rd) <= fwd_tol
    np.testing.assert_array_equal(np.asarray(out[int(gs.sum()):], np.float32), 0.0)

    def loss(fn):
        return lambda l, r: jnp.sum(fn(l, r).astype(jnp.float32) * ct)

    d_lhs, d_rhs = jax.grad(loss(run), argnums=(0, 1))(lhs, rhs)
    r_lhs, r_rhs = jax.grad(
        loss(lambda l, r: reference.gmm_reference(l, r, gs, jnp.float32)), argnums=(0, 1)
    )(lhs.astype(jnp.float32), rhs.astype(jnp.float32))
    assert d_lhs.dtype == lhs.dtype and d_rhs.dtype == rhs.dtype
    assert _relerr(d_lhs, r_lhs) <= grad_tol
    assert _relerr(d_rhs, r_rhs) <= grad_tol
    for i in np.flatnonzero(np.asarray(gs) == 0):
        np.testing.assert_array_equal(np.asarray(d_rhs[i], np.float32), 0.0)


@pytest.mark.parametrize("backend", KERNELS + ["xla"], ids=_id)
def test_bad_group_sizes_are_clipped_as_documented(backend):
    """Negative sizes count as 0; the running sum is clamped to m (here 20)."""
    rng = np.random.default_rng(0)
    lhs = jnp.asarray(rng.standard_normal((20, 12)), jnp.float32)
    rhs = jnp.asarray(rng.standard_normal((4, 12, 10)), jnp.float32)
    bad = jnp.array([5, -7, 9, 30], jnp.int32)
    clipped = jnp.array([5, 0, 9, 6], jnp.int32)
    out = jax.jit(lambda l, r, s: ops.gmm(l, r, s, backend=backend, interpret=True, tiling=(8, 8, 8)))(
        lhs, rhs, bad
    )
    np.testing.assert_allclose(out, reference.gmm_reference(lhs, rhs, clipped), rtol=1e-5, atol=1e-5)
    t = ops.tgmm(lhs, out, bad, backend=backend, interpret=True, tiling=(8, 8, 8))
    want = reference.tgmm_reference(lhs, out, clipped)
    np.testing.assert_allclose(t, want, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(t[1], 0.0)


@pytest.mark.parametrize("backend", KERNELS + ["xla"], ids=_id)
def test_tgmm_matches_reference_with_empty_groups_and_trailing_rows(backend):
    rng = np.random.default_rng(1)
    lhs = jnp.asarray(rng.standard_normal((30, 20)), jnp.bfloat16)
    grad = jnp.asarray(rng.standard_normal((30, 17)), jnp.bfloat16)
    gs = jnp.array([0, 11, 0, 7, 9], jnp.int32)  # 3 trailing rows in no group
    out = ops.tgmm(lhs, grad, gs, backend=backend, interpret=True, tiling=(8, 16, 8),
                   preferred_element_type=jnp.float32)
    assert out.shape == (5, 20, 17) and out.dtype == jnp.float32
    want = reference.tgmm_reference(lhs, grad, gs, jnp.float32)
    assert _relerr(out, want) < 1e-5
    np.testing.assert_array_equal(out[0], 0.0)
    np.testing.assert_array_equal(out[2], 0.0)


def test_cpu_default_is_the_xla_backend_and_differentiable():
    rng = np.random.default_rng(2)
    lhs = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
    rhs = jnp.asarray(rng.standard_normal((3, 8, 4)), jnp.float32)
    gs = jnp.array([4, 4, 6], jnp.int32)
    assert ops._resolve_backend(None, False) == "xla"
    out = ops.gmm(lhs, rhs, gs)
    np.testing.assert_allclose(out, jax.lax.ragged_dot(lhs, rhs, gs), rtol=1e-6)
    g_ops = jax.grad(lambda r: jnp.sum(ops.gmm(lhs, r, gs) ** 2))(rhs)
    g_ref = jax.grad(lambda r: jnp.sum(reference.gmm_reference(lhs, r, gs) ** 2))(rhs)
    np.testing.assert_allclose(g_ops, g_ref, rtol=1e-4, atol=1e-4)


def _args():
    return (jnp.zeros((8, 4), jnp.float32), jnp.zeros((2, 4, 3), jnp.float32), jnp.array([4, 4], jnp.int32))


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda l, r, s: (l[None], r, s), "lhs must be 2-D"),
        (lambda l, r, s: (l, r[0], s), "rhs must be 3-D"),
        (lambda l, r, s: (l.astype(jnp.bfloat16), r, s), "must match"),
        (lambda l, r, s: (l.astype(jnp.int32), r.astype(jnp.int32), s), "valid dtypes"),
        (lambda l, r, s: (l, r, s.astype(jnp.int64) if jax.config.jax_enable_x64 else s.astype(jnp.int16)),
         "int32"),
        (lambda l, r, s: (l, r, jnp.array([8], jnp.int32)), "length 1"),
        (lambda l, r, s: (l, r, s[None]), "1-D"),
        (lambda l, r, s: (l[:, :3], r, s), "k=3"),
    ],
)
def test_gmm_bad_input_raises_value_error(change, match):
    with pytest.raises(ValueError, match=match):
        ops.gmm(*change(*_args()))


def test_bad_options_raise_value_error():
    lhs, rhs, gs = _args()
    with pytest.raises(ValueError, match="backend='cuda'"):
        ops.gmm(lhs, rhs, gs, backend="cuda")
    with pytest.raises(ValueError, match="interpret=True"):
        ops.gmm(lhs, rhs, gs, backend="gpu")  # no GPU here and not interpreted
    with pytest.raises(ValueError, match="powers of two"):
        ops.gmm(lhs, rhs, gs, backend="gpu", interpret=True, tiling=(12, 16, 16))
    with pytest.raises(ValueError, match="three positive ints"):
        ops.gmm(lhs, rhs, gs, backend="tpu", interpret=True, tiling=(8, 8))
    with pytest.raises(ValueError, match="preferred_element_type"):
        ops.gmm(lhs, rhs, gs, preferred_element_type=jnp.int32)
    with pytest.raises(ValueError, match="grad has 7"):
        ops.tgmm(lhs, jnp.zeros((7, 3), jnp.float32), gs)


@pytest.mark.parametrize("backend", KERNELS, ids=_id)
def test_kernels_lower_for_their_platform(kernel_calls, backend):
    """gmm forward, gmm for d(lhs) and tgmm for d(rhs) pass the real Triton / Mosaic
    lowering (see conftest)."""
    lhs = jnp.zeros((512, 256), jnp.bfloat16)
    rhs = jnp.zeros((4, 256, 128), jnp.bfloat16)
    sizes = jnp.array([100, 200, 12, 200], jnp.int32)

    def loss(lhs, rhs):
        out = ops._gmm_vjp(lhs, rhs, sizes, jnp.bfloat16, None, backend, False)
        return out.astype(jnp.float32).sum()

    platform = "cuda" if backend == "gpu" else "tpu"
    assert kernel_calls(platform, jax.value_and_grad(loss, (0, 1)), lhs, rhs) == 3
