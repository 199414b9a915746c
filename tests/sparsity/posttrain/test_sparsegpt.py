"""SparseGPT against exact solutions computed independently with numpy: with a fixed mask
whose pruned inputs precede the kept ones in every output unit (and a full-width block) it is
the damped least-squares re-fit of each unit's kept weights (numpy lstsq on the calibration
inputs); with any mask and any block size it is the sequential OBS re-fit that defines it;
its own masks are exact per block and exactly N:M; a row-sharded solve on 8 devices equals
the single-device one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from sparsejax.sparsity.posttrain import sparsegpt as sg

DAMP = 0.01


def layer(seed=0, tokens=300, din=16, dout=6):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((tokens, din)) @ rng.standard_normal((din, din)) * 0.5
         + rng.standard_normal(din)).astype(np.float32)
    w = rng.standard_normal((din, dout)).astype(np.float32)
    return x.astype(np.float64), w.astype(np.float64)


def solve(w, x, **kw):
    h = x.T @ x
    out, keep = sg.solve_kernel(jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32),
                                dampening=DAMP, **kw)
    return np.asarray(out, np.float64), np.asarray(keep)


def test_full_block_fixed_mask_is_the_least_squares_refit():
    x, w = layer()
    din, dout = w.shape
    lam = DAMP * np.mean(np.diag(x.T @ x))
    keep = np.ones((din, dout), bool)
    for r in range(dout):
        keep[: 2 + 2 * r, r] = False  # unit r prunes its first 2 + 2r inputs
    got, kept = solve(w, x, block_size=din, keep=jnp.asarray(keep))
    np.testing.assert_array_equal(kept, keep)
    for r in range(dout):
        k = keep[:, r]
        # min ‖X w - X_K v‖² + λ‖w_K - v‖² (+ λ‖w_P‖², constant): lstsq on the stacked system
        a = np.concatenate([x[:, k], np.sqrt(lam) * np.eye(k.sum())])
        b = np.concatenate([x @ w[:, r], np.sqrt(lam) * w[k, r]])
        ref = np.linalg.lstsq(a, b, rcond=None)[0]
        np.testing.assert_allclose(got[k, r], ref, rtol=2e-4, atol=2e-4)
        assert np.all(got[~k, r] == 0.0)


def sequential_obs(w, h, keep):
    """The definition: visiting inputs in order, each pruned weight is zeroed and its error
    re-fitted onto the inputs after it (least squares in the damped Hessian's metric)."""
    w = w.copy()
    n = len(w)
    for i in range(n):
        if not keep[i]:
            rest = np.arange(i + 1, n)
            if rest.size:
                w[rest] += w[i] * np.linalg.solve(h[np.ix_(rest, rest)], h[rest, i])
            w[i] = 0.0
    return w


@pytest.mark.parametrize("block_size", [16, 4, 5])
def test_any_mask_any_block_is_the_sequential_obs_refit(block_size):
    x, w = layer(1)
    h = x.T @ x
    hd = h + DAMP * np.mean(np.diag(h)) * np.eye(len(h))
    keep = np.random.default_rng(2).random(w.shape) > 0.5
    got, _ = solve(w, x, block_size=block_size, keep=jnp.asarray(keep))
    ref = np.stack([sequential_obs(w[:, r], hd, keep[:, r]) for r in range(w.shape[1])], 1)
    np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-4)


def test_unstructured_prunes_exactly_per_block_and_beats_magnitude():
    x, w = layer(3, din=16, dout=8)
    got, keep = solve(w, x, block_size=4, sparsity=0.5)
    assert keep.reshape(4, 4, 8).sum(axis=(1, 2)).tolist() == [16] * 4  # half of each block
    assert np.all(got[~keep] == 0.0) and np.all(got[keep] != 0.0)
    h = x.T @ x
    err = lambda v: np.trace((w - v).T @ h @ (w - v))
    mag = np.where(np.abs(w) >= np.median(np.abs(w), axis=0, keepdims=True), w, 0.0)
    assert err(got) < err(mag)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_is_exact(n, m):
    x, w = layer(4, din=16, dout=5)
    got, keep = solve(w, x, block_size=8, n=n, m=m)
    counts = keep.reshape(16 // m, m, 5).sum(axis=1)
    assert np.all(counts == n)
    assert np.all(got[~keep] == 0.0)


def test_nm_must_divide_the_block():
    x, w = layer(5, din=12)
    with pytest.raises(ValueError, match="M=4 must divide"):
        solve(w, x, block_size=6, n=2, m=4)


def test_row_sharded_solve_equals_single_device():
    assert jax.device_count() == 8
    x, w = layer(6, din=16, dout=16)
    h = jnp.asarray(x.T @ x, jnp.float32)
    fn = jax.jit(lambda k, h: sg.solve_kernel(k, h, dampening=DAMP, block_size=8, sparsity=0.5))
    one = jax.device_put(jnp.asarray(w, jnp.float32), jax.devices()[0])
    ref_w, ref_k = fn(one, jax.device_put(h, jax.devices()[0]))
    mesh = jax.make_mesh((8,), ("rows",), axis_types=(AxisType.Auto,))  # as make_mesh
    sharded = jax.device_put(jnp.asarray(w, jnp.float32), NamedSharding(mesh, P(None, "rows")))
    got_w, got_k = fn(sharded, jax.device_put(h, NamedSharding(mesh, P())))
    assert len(got_w.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(got_k), np.asarray(ref_k))
    np.testing.assert_allclose(np.asarray(got_w), np.asarray(ref_w), rtol=1e-5, atol=1e-5)


def test_inputs_never_seen_keep_a_solvable_hessian():
    x, w = layer(7)
    x[:, 3] = 0.0  # an input feature that calibration never activates
    got, keep = solve(w, x, block_size=16, sparsity=0.5)
    assert np.all(np.isfinite(got))
