"""N:M masks, SR-STE and learnable N:M masks."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sparsejax.sparsity import nm as N
from sparsejax.sparsity.nm_methods import LOGITS_KEY, LearnedNMMethod, SRSTEMethod
from sparsejax.sparsity import NMStructure, RunInfo
from sparsejax.sparsity.pruning import MaskedPruningMethod

_nm_mask = jax.jit(N.nm_mask, static_argnums=(1, 2, 3))


@settings(max_examples=15, deadline=None)
@given(st.sampled_from([(2, 4), (1, 4), (4, 8)]), st.sampled_from([-2, 0, 1, -1]), st.integers(0, 10_000))
def test_every_group_has_exactly_n_and_keeps_largest(nm, axis, seed):
    n, m = nm
    w = jax.random.normal(jax.random.PRNGKey(seed), (16, 8))
    mask = np.asarray(_nm_mask(w, n, m, axis))
    counts = np.asarray(N.nm_group_counts(mask, m, axis))
    assert np.all(counts == n)
    g_w = np.moveaxis(np.abs(np.asarray(w)), axis, -1).reshape(-1, m)
    g_m = np.moveaxis(mask, axis, -1).reshape(-1, m)
    for row_w, row_m in zip(g_w, g_m):
        if 0 < n < m:
            assert row_w[row_m].min() >= row_w[~row_m].max()


def test_nm_hand_worked_2of4_along_input_dim():
    w = jnp.array([[1.0, -8.0], [-3.0, 0.5], [2.0, 0.1], [0.2, 4.0]])  # [d_in=4, d_out=2]
    np.testing.assert_array_equal(N.nm_mask(w, 2, 4), [[False, True], [True, False], [True, False], [False, True]])


def test_nm_bad_inputs_raise():
    with pytest.raises(ValueError, match="not divisible by M=4"):
        N.nm_mask(jnp.ones((6, 4)), 2, 4)
    with pytest.raises(ValueError, match="n: 5"):
        N.nm_mask(jnp.ones((8, 4)), 5, 4)
    with pytest.raises(ValueError, match=r"params\['a/kernel'\].*divisible"):
        MaskedPruningMethod(structure=NMStructure(2, 4), schedule="one_shot").bind(
            RunInfo(num_steps=10)).init({"a": {"kernel": jnp.ones((6, 4))}}, None)
    with pytest.raises(ValueError, match="n: 3"):
        SRSTEMethod(n=3, m=2)


def test_srste_gradient_is_ste_plus_refinement():
    w = jnp.array([[1.0], [-3.0], [2.0], [0.5]])
    params = {"d": {"kernel": w}}
    method = SRSTEMethod(n=2, m=4, lam=0.1).bind(RunInfo(num_steps=10))
    _, state = method.init(params, None)

    def loss(p):
        eff = method.forward_params(p, state)["d"]["kernel"]
        return jnp.sum(eff * jnp.array([[1.0], [2.0], [3.0], [4.0]]))

    g = jax.grad(loss)(params)
    np.testing.assert_array_equal(method.forward_params(params, state)["d"]["kernel"], [[0.0], [-3.0], [2.0], [0.0]])
    np.testing.assert_allclose(g["d"]["kernel"], [[1.0], [2.0], [3.0], [4.0]])  # straight-through
    g2, state2 = method.on_grads(params, state, g)
    # + lam * (1 - mask) * w on the pruned entries (1.0 and 0.5).
    np.testing.assert_allclose(g2["d"]["kernel"], [[1.1], [2.0], [3.0], [4.05]], rtol=1e-6)
    np.testing.assert_array_equal(method.finalize(params, state2)["d"]["kernel"], [[0.0], [-3.0], [2.0], [0.0]])


def test_patterns_are_all_combinations():
    p = N.patterns(2, 4)
    assert p.shape == (6, 4) and np.all(p.sum(1) == 2) and len({tuple(r) for r in p}) == 6
    assert N.patterns(4, 8).shape == (len(list(itertools.combinations(range(8), 4))), 8)


def test_learned_nm_soft_mask_gradients_and_hard_mask():
    params = {"d": {"kernel": jax.random.normal(jax.random.PRNGKey(0), (8, 3)), "bias": jnp.zeros(3)}}
    method = LearnedNMMethod(n=2, m=4, anneal_steps=10, prior_strength=2.0).bind(RunInfo(num_steps=10))
    p, state = method.init(params, None)
    logits = p[LOGITS_KEY]["d"]["kernel"]
    assert logits.shape == N.logits_shape((8, 3), 2, 4) == (3, 2, 6)
    assert p[LOGITS_KEY]["d"].get("bias") is None
    # Initial hard mask is the magnitude 2:4 mask (prior).
    np.testing.assert_array_equal(state["masks"]["d"]["kernel"], N.nm_mask(params["d"]["kernel"], 2, 4))
    tau, kappa = method.temperature_and_scale(5)
    assert float(tau) == pytest.approx(4.0 + 0.5 * (0.05 - 4.0)) and float(kappa) == pytest.approx(3.0)

    def loss(p):
        eff = method.forward_params(p, state, step=0, rng=jax.random.PRNGKey(1))
        assert set(eff) == {"d"}
        return jnp.sum(eff["d"]["kernel"] ** 2)

    g = jax.grad(loss)(p)
    assert float(jnp.abs(g[LOGITS_KEY]["d"]["kernel"]).sum()) > 0
    # Make pattern 0 ([1,1,0,0]) dominant everywhere: the hard mask follows it.
    p2 = {**p, LOGITS_KEY: {"d": {"kernel": jnp.zeros_like(logits).at[..., 0].set(10.0), "bias": None}}}
    final = method.finalize(p2, state)["d"]["kernel"]
    np.testing.assert_array_equal(final != 0, np.tile(np.array([[1], [1], [0], [0]], bool), (2, 3)))
    soft = N.soft_mask(p2[LOGITS_KEY]["d"]["kernel"], (8, 3), 2, 4, tau=0.05, kappa=1.0, rng=None)
    np.testing.assert_allclose(soft, final != 0, atol=1e-6)
