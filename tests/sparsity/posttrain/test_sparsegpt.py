"""SparseGPT against exact solutions computed independently with numpy: with a fixed mask
whose pruned inputs precede the kept ones in every output unit (and a full-width block) it is
the damped least-squares re-fit of each unit's kept weights (numpy lstsq on the calibration
inputs); with any mask and any block size it is the sequential OBS re-fit that defines it;
its own masks are exact per block and exactly N:M; a row-sharded solve on 8 devices equals
the single-device one; dead inputs (never active in calibration) are pruned at no cost and
count toward the pruned fraction, so the layer solves as if they were not there; with
SPARSEGPT_REFERENCE naming a checkout of the reference code (and torch installed) masks and
weights equal the reference's."""
import os
import pathlib

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


def solve(w, x, dampening=DAMP, **kw):
    h = x.T @ x
    out, keep = sg.solve_kernel(jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32),
                                dampening=dampening, **kw)
    return np.asarray(out, np.float64), np.asarray(keep)


def error(w, v, x):
    d = (x @ (w - v))
    return float(np.sum(d * d))


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


def dead_layer(seed, dead, dout):
    """A layer whose `dead` inputs are zero in calibration. Its activations are small (H_jj
    below 1, the value the dead inputs' H_jj is set to), so a solve that scored the dead
    weights with their own values would keep many of them."""
    x, w = layer(seed, din=16, dout=dout)
    x = x * 0.01
    x[:, dead] = 0.0
    return x, w


def without(w, x, dead):
    """The layer with its dead inputs removed, and the dampening giving the same λ (the
    full layer's mean diagonal counts each dead input as H_jj = 1)."""
    alive = np.setdiff1d(np.arange(w.shape[0]), dead)
    diag = np.diag(x.T @ x)
    lam = DAMP * (diag.sum() + len(dead)) / len(diag)
    return w[alive], x[:, alive], lam / diag[alive].mean(), alive


@pytest.mark.parametrize("dead,block", [([3, 9, 10], 16),      # one block, anywhere
                                        ([6, 7, 14, 15], 8)])  # the same place in each block
def test_dead_inputs_unstructured_solve_as_the_layer_without_them(dead, block):
    x, w = dead_layer(8, dead, 8)
    got, keep = solve(w, x, block_size=block, sparsity=0.5)
    assert np.all(got[dead] == 0.0) and not keep[dead].any()
    # the reference's accounting: the dead weights are part of each block's 50%
    per_block = len(dead) // (16 // block)
    sparsity = (block / 2 - per_block) / (block - per_block)
    w2, x2, damp2, alive = without(w, x, dead)
    ref, ref_keep = solve(w2, x2, damp2, block_size=block - per_block, sparsity=sparsity)
    np.testing.assert_array_equal(keep[alive], ref_keep)
    assert keep.sum() == w.size // 2
    np.testing.assert_allclose(got[alive], ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(error(w, got, x), error(w2, ref, x2), rtol=1e-4)


def test_dead_inputs_nm_solve_as_the_layer_without_them():
    dead = [4, 5, 6, 7]  # a whole group of 4: its 2:4 prunes two zeros, keeps two zeros
    x, w = dead_layer(9, dead, 6)
    got, keep = solve(w, x, block_size=8, n=2, m=4)
    assert np.all(keep.reshape(4, 4, -1).sum(1) == 2) and np.all(got[dead] == 0.0)
    w2, x2, damp2, alive = without(w, x, dead)
    ref, ref_keep = solve(w2, x2, damp2, block_size=12, n=2, m=4)
    np.testing.assert_array_equal(keep[alive], ref_keep)
    np.testing.assert_allclose(got[alive], ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(error(w, got, x), error(w2, ref, x2), rtol=1e-4)


def test_dead_inputs_nm_are_pruned_first_in_their_group():
    dead = [1, 9, 10]  # one in group 0, two in group 2: the group's two pruned
    x, w = dead_layer(10, dead, 6)
    got, keep = solve(w, x, block_size=8, n=2, m=4)
    assert np.all(keep.reshape(4, 4, -1).sum(1) == 2)
    assert not keep[dead].any() and np.all(got[dead] == 0.0)
    # the other inputs are re-fitted as in the layer without the dead ones, same mask
    w2, x2, damp2, alive = without(w, x, dead)
    ref, _ = solve(w2, x2, damp2, block_size=13, keep=jnp.asarray(keep[alive]))
    np.testing.assert_allclose(got[alive], ref, rtol=1e-4, atol=1e-5)


REFERENCE = os.environ.get("SPARSEGPT_REFERENCE")


@pytest.mark.hf  # and a checkout of the reference code: CI has none, so it skips there
@pytest.mark.skipif(not REFERENCE, reason="SPARSEGPT_REFERENCE is not set (the directory of "
                                          "a checkout of github.com/IST-DASLab/sparsegpt)")
@pytest.mark.parametrize("n,m", [(0, 0), (2, 4)])
def test_masks_and_weights_equal_the_reference_code(n, m, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[3] / "benchmarks"))
    import prune as bench  # benchmarks/prune.py: load_reference, reference_phases
    ref_cls = bench.load_reference(REFERENCE)
    x, w = layer(11, tokens=600, din=256, dout=32)
    x = x * 0.01  # small activations: see dead_layer
    dead = [5, 130, 200]  # in different groups of 4
    x[:, dead] = 0.0
    got, keep = solve(w, x, block_size=128, sparsity=0.5, n=n, m=m)
    lin = torch.nn.Linear(256, 32, bias=False)
    lin.weight.data = torch.tensor(w.T, dtype=torch.float32)
    g = ref_cls(lin)
    g.add_batch(torch.tensor(x, dtype=torch.float32)[None], None)
    # the reference prunes the scores <= its threshold, the sorted block's entry at
    # int(numel * sparsity): one more than that index; ask it for exactly half of each block
    numel = 32 * 128
    sparsity = (numel // 2 - 0.5) / numel
    with bench.reference_phases({}):
        g.fasterprune(sparsity, prunen=n, prunem=m, blocksize=128, percdamp=DAMP)
    ref = lin.weight.data.numpy().T.astype(np.float64)
    np.testing.assert_array_equal(keep, ref != 0)
    # float32 factorizations done differently (here one Cholesky and a triangular inverse)
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(error(w, got, x), error(w, ref, x), rtol=1e-4)
