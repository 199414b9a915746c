"""The XLA (CPU) grouped matmul: ragged_dot semantics, gradients, clipping, padded layout."""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.grouped_matmul import ops, reference, xla

# Relative Frobenius error bounds. float32: exact f32 up to summation order (the reference
# runs at HIGHEST precision). bfloat16: one bf16 rounding of the output (2^-8) and, for the
# gradients, of the cotangent too.
TOL = {"float32": (1e-5, 1e-5), "bfloat16": (1e-2, 2e-2)}  # (forward, gradients)


def _relerr(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30)


@functools.partial(jax.jit, static_argnums=(4,))
def _outputs(lhs, rhs, sizes, ct, tiling):
    """gmm, its gradients and tgmm on the XLA backend, and the same from the reference and
    ragged_dot (on the clipped sizes: it has no clipping rule of its own); sizes traced."""

    def loss(fn):
        return lambda l, r: jnp.sum(fn(l, r).astype(jnp.float32) * ct)

    def ours(l, r):
        return ops.gmm(l, r, sizes, backend="xla", tiling=tiling)

    def ref(l, r):
        return reference.gmm_reference(l, r, sizes, jnp.float32)

    f32 = (lhs.astype(jnp.float32), rhs.astype(jnp.float32))
    eff = reference.effective_group_sizes(sizes, lhs.shape[0])
    grad = ct.astype(lhs.dtype)
    return {
        "out": ours(lhs, rhs),
        "grads": jax.grad(loss(ours), argnums=(0, 1))(lhs, rhs),
        "tgmm": ops.tgmm(lhs, grad, sizes, backend="xla", tiling=tiling,
                         preferred_element_type=jnp.float32),
        "ref_out": ref(lhs, rhs),
        "ragged_dot": jax.lax.ragged_dot(lhs, rhs, eff, preferred_element_type=jnp.float32),
        "ref_grads": jax.grad(loss(ref), argnums=(0, 1))(*f32),
        "ref_tgmm": reference.tgmm_reference(lhs, grad, sizes, jnp.float32),
        "eff": eff,
    }


def _check_all(lhs, rhs, sizes, tiling=None):
    """gmm forward, both gradients and tgmm against the reference and ragged_dot."""
    fwd_tol, grad_tol = TOL[jnp.dtype(lhs.dtype).name]
    m, n = lhs.shape[0], rhs.shape[2]
    ct = jnp.asarray(np.random.default_rng(0).standard_normal((m, n)), jnp.float32)
    r = _outputs(lhs, rhs, sizes, ct, tiling)
    out, (d_lhs, d_rhs) = r["out"], r["grads"]
    assert out.shape == (m, n) and out.dtype == lhs.dtype
    assert d_lhs.dtype == lhs.dtype and d_rhs.dtype == rhs.dtype
    assert _relerr(out, r["ref_out"]) <= fwd_tol
    assert _relerr(out, r["ragged_dot"]) <= fwd_tol
    used = int(r["eff"].sum())
    np.testing.assert_array_equal(np.asarray(out[used:], np.float32), 0.0)
    assert _relerr(d_lhs, r["ref_grads"][0]) <= grad_tol
    assert _relerr(d_rhs, r["ref_grads"][1]) <= grad_tol
    np.testing.assert_array_equal(np.asarray(d_lhs[used:], np.float32), 0.0)
    t = r["tgmm"]
    assert t.shape == (sizes.shape[0], lhs.shape[1], n)
    assert _relerr(t, r["ref_tgmm"]) <= fwd_tol
    empty = np.asarray(r["eff"]) == 0
    np.testing.assert_array_equal(np.asarray(t)[empty], 0.0)
    np.testing.assert_array_equal(np.asarray(d_rhs, np.float32)[empty], 0.0)


CASES = {
    "empty_groups_and_trailing_rows": (20, [0, 5, 0, 9, 0]),
    "all_rows_in_first_group": (20, [20, 0, 0]),
    "all_rows_in_last_group": (20, [0, 0, 20]),
    "sum_less_than_m": (20, [3, 4]),
    "all_groups_empty": (20, [0, 0, 0]),
    "negative_sizes_count_as_zero": (20, [5, -7, 9, 30]),  # -> [5, 0, 9, 6]
    "running_sum_clamped_to_m": (20, [15, 15, 15]),  # -> [15, 5, 0]
    "one_group": (20, [20]),
    "one_row_per_group": (12, [1] * 12),  # most partly filled tiles: the static bound
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_edge_cases_match_reference_and_ragged_dot(case, dtype):
    m, sizes = CASES[case]
    rng = np.random.default_rng(len(sizes))
    lhs = jnp.asarray(rng.standard_normal((m, 12)), dtype)
    rhs = jnp.asarray(rng.standard_normal((len(sizes), 12, 10)), dtype)
    _check_all(lhs, rhs, jnp.asarray(sizes, jnp.int32), tiling=(8, 8, 8))


@settings(max_examples=12, deadline=None)
@given(
    sizes=st.lists(st.integers(-8, 40), min_size=6, max_size=6),
    tm=st.sampled_from([None, 8, 24]),
    dtype=st.sampled_from(["float32", "bfloat16"]),
    seed=st.integers(0, 2**16),
)
def test_random_group_sizes_match_reference(sizes, tm, dtype, seed):
    """Any sizes (negative, summing past m or short of it) and row tiles that do or do not
    divide m (None: the default). Shapes are fixed so examples share compilations; the ops
    test draws random shapes."""
    rng = np.random.default_rng(seed)
    lhs = jnp.asarray(rng.standard_normal((61, 20)), dtype)
    rhs = jnp.asarray(rng.standard_normal((6, 20, 12)), dtype)
    _check_all(lhs, rhs, jnp.asarray(sizes, jnp.int32), None if tm is None else (tm, 1, 1))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _layout(sizes, m, tm):
    return xla.padded_layout(sizes, m, tm), reference.row_group_ids(sizes, m)


@settings(max_examples=15, deadline=None)
@given(
    m=st.sampled_from([1, 37, 200]),
    sizes=st.one_of(st.lists(st.integers(-5, 60), min_size=n, max_size=n) for n in (1, 7, 40)),
    tm=st.sampled_from([8, 32]),
)
def test_padded_layout_places_every_row_in_a_tile_of_its_group(m, sizes, tm):
    layout, row_group = _layout(jnp.asarray(sizes, jnp.int32), m, tm)
    dest, src, groups = (np.asarray(a) for a in layout)
    tiles = xla.num_tiles(m, len(sizes), tm)
    assert src.shape == (tiles * tm,) and groups.shape == (tiles,)
    assert tiles <= -(-m // tm) + len(sizes) - 1 or tiles == 1
    row_group = np.asarray(row_group)
    placed = row_group < len(sizes)
    assert np.all(dest[~placed] == tiles * tm)  # rows in no group are never read
    assert np.all(dest[placed] < tiles * tm)  # the static bound holds
    np.testing.assert_array_equal(src[dest[placed]], np.flatnonzero(placed))
    assert np.sum(src < m) == np.sum(placed)  # every other slot is padding
    slot_tile = np.arange(tiles * tm) // tm
    filled = src < m
    np.testing.assert_array_equal(groups[slot_tile[filled]], row_group[src[filled]])
    assert np.all(np.diff(groups) >= 0)  # tiles sorted by group (tgmm's sorted segment sum)


def test_rows_outside_groups_do_not_leak_non_finite_values():
    """Rows past the last group hold inf/NaN: gmm still writes zeros there and tgmm and the
    gradients ignore them (a masked multiply would turn them into NaN)."""
    rng = np.random.default_rng(3)
    m, k, n = 24, 8, 6
    lhs = np.asarray(rng.standard_normal((m, k)), np.float32)
    grad = np.asarray(rng.standard_normal((m, n)), np.float32)
    lhs[20:], grad[20:] = np.inf, np.nan
    rhs = jnp.asarray(rng.standard_normal((3, k, n)), jnp.float32)
    sizes = jnp.array([7, 0, 13], jnp.int32)  # 4 trailing rows

    @jax.jit
    def run(lhs, rhs, grad):
        out, vjp = jax.vjp(lambda l, r: ops.gmm(l, r, sizes, backend="xla"), lhs, rhs)
        return out, vjp(grad), ops.tgmm(lhs, grad, sizes, backend="xla")

    out, (d_lhs, d_rhs), t = run(jnp.asarray(lhs), rhs, jnp.asarray(grad))
    np.testing.assert_array_equal(out[20:], 0.0)
    clean_l, clean_g = lhs.copy(), grad.copy()
    clean_l[20:], clean_g[20:] = 0.0, 0.0
    np.testing.assert_allclose(out, reference.gmm_reference(clean_l, rhs, sizes), rtol=1e-5,
                               atol=1e-5)
    assert np.all(np.isfinite(d_lhs)) and np.all(np.isfinite(d_rhs))
    np.testing.assert_allclose(t, reference.tgmm_reference(clean_l, clean_g, sizes), rtol=1e-5,
                               atol=1e-5)


def test_work_is_proportional_to_rows_not_groups_times_rows():
    """At MoE-like shapes (64 groups) no intermediate of gmm forward + backward is near the
    [g, m, n] that a dense formulation needs; the tile matmuls are [tiles, tm, .]."""
    m, g, k, n = 4096, 64, 64, 64
    lhs, rhs = jnp.zeros((m, k)), jnp.zeros((g, k, n))
    sizes = jnp.full((g,), m // g, jnp.int32)

    def f(l, r):
        return jnp.sum(ops.gmm(l, r, sizes, backend="xla") ** 2)

    jaxpr = jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(lhs, rhs)
    tm = xla.default_tile_rows(m, g, k, n)
    tiles = xla.num_tiles(m, g, tm)
    assert tiles <= m // tm + g - 1

    def eqns(jx):
        for e in jx.eqns:
            yield e
            for sub in jax.extend.core.jaxprs_in_params(e.params):
                yield from eqns(sub)

    all_eqns = list(eqns(jaxpr.jaxpr))
    biggest = max(int(np.prod(v.aval.shape)) for e in all_eqns for v in e.outvars
                  if hasattr(v.aval, "shape"))
    assert biggest <= tiles * max(tm * max(k, n), k * n)  # a tiled operand, not g * m * n
    dots = [e for e in all_eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 3  # forward, d lhs, d rhs (tgmm)
    assert all(e.outvars[0].aval.shape[0] == tiles for e in dots)


def test_default_tile_rows_is_a_power_of_two_sized_for_the_problem():
    for args in [(1, 1, 1, 1), (5, 3, 4, 4), (100, 256, 64, 64), (1024, 8, 64, 256),
                 (4096, 64, 64, 64), (8192, 8, 512, 512), (10**6, 2, 4096, 4096)]:
        tm = xla.default_tile_rows(*args)
        assert 8 <= tm <= 256 and tm & (tm - 1) == 0, (args, tm)
    assert xla.default_tile_rows(1024, 8, 64, 256) == 32  # MoE benchmark, coarse experts
    assert xla.default_tile_rows(4096, 64, 64, 64) == 32  # MoE benchmark, fine experts
    assert xla.default_tile_rows(8192, 8, 512, 512) == 256
    assert xla.default_tile_rows(5, 3, 4, 4) == 8
