"""Dispatch strategies: with no dropped tokens, all give the same outputs and gradients."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sparsejax.models.moe import dispatch as D
from sparsejax.models.moe import router as R
from sparsejax.models.moe.experts import ExpertWeights

TOL = dict(rtol=2e-4, atol=2e-5)


def _weights(key, e, d, f):
    k1, k2, k3 = jax.random.split(key, 3)
    return ExpertWeights(jax.random.normal(k1, (e, d, f)) / np.sqrt(d),
                         jax.random.normal(k2, (e, d, f)) / np.sqrt(d),
                         jax.random.normal(k3, (e, f, d)) / np.sqrt(f))


def _run(strategy, x, logits, w, router_name, k, capacity):
    def f(x, logits, w):
        r = R.route(router_name, logits, top_k=k, capacity=capacity)
        y, dropped = strategy(x, r, w, capacity)
        return jnp.sum(jnp.sin(y)), (y, dropped)
    (_, (y, dropped)), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(
        x, logits, w)
    return y, dropped, grads


@settings(max_examples=6, deadline=None)
@given(t=st.integers(1, 12), e=st.sampled_from([2, 4, 8]), k=st.integers(1, 3),
       router_name=st.sampled_from(["softmax_topk", "sigmoid_topk", "relu", "expert_choice"]),
       seed=st.integers(0, 1000))
def test_strategies_agree_without_drops(t, e, k, router_name, seed):
    k = min(k, e)
    d, f = 8, 16
    keys = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(keys[0], (t, d))
    logits = jax.random.normal(keys[1], (t, e))
    w = _weights(keys[2], e, d, f)
    capacity = t * k if router_name != "expert_choice" else max(1, min(t, t * k // e))
    ref = _run(D.onehot_dispatch, x, logits, w, router_name, k, capacity)
    assert float(ref[1]) == 0
    for name in ("ragged_dot", "pallas_gmm"):
        got = _run(D.get_dispatch(name), x, logits, w, router_name, k, capacity)
        np.testing.assert_allclose(got[0], ref[0], **TOL)
        for g, gr in zip(jax.tree.leaves(got[2]), jax.tree.leaves(ref[2])):
            np.testing.assert_allclose(g, gr, **TOL)


def test_pallas_gmm_kernel_interpret_matches_ragged_dot():
    """The strategy with the Pallas (Triton) kernel itself, run in interpret mode on CPU."""
    from pallas_kernels.grouped_matmul.ops import gmm
    t, e, k, d, f = 8, 4, 2, 16, 16
    keys = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(keys[0], (t, d))
    r = R.softmax_topk(jax.random.normal(keys[1], (t, e)), k)
    w = _weights(keys[2], e, d, f)
    kern = functools.partial(gmm, backend="gpu", interpret=True)
    y, _ = D.grouped_dispatch(x, r, w, kern)
    y_ref, _ = D.grouped_dispatch(x, r, w)
    np.testing.assert_allclose(y, y_ref, **TOL)


def test_onehot_drops_over_capacity_in_priority_order():
    # 4 tokens all choose expert 0 first; capacity 2 keeps tokens 0, 1 only
    logits = jnp.array([[5.0, 0.0, -5.0]] * 4)
    r = R.softmax_topk(logits, 1, renormalize=True)
    x = jnp.arange(4 * 2, dtype=jnp.float32).reshape(4, 2)
    w = ExpertWeights(jnp.ones((3, 2, 2)), jnp.ones((3, 2, 2)), jnp.ones((3, 2, 2)))
    y, dropped = D.onehot_dispatch(x, r, w, 2)
    full, _ = D.grouped_dispatch(x, r, w)
    assert float(dropped) == 2
    np.testing.assert_allclose(y[:2], full[:2], rtol=1e-6)
    np.testing.assert_array_equal(y[2:], 0)


def test_capacity_positions_priority():
    idx = jnp.array([[0, 1], [0, 1], [1, 0]])
    pos = D.capacity_positions(idx, jnp.ones((3, 2), bool), 2)
    # first choices: t0->e0 (0), t1->e0 (1), t2->e1 (0); then second: t0->e1 (1), t1->e1 (2), t2->e0 (2)
    np.testing.assert_array_equal(pos, [[0, 1], [1, 2], [0, 2]])


def test_unknown_dispatch():
    with pytest.raises(ValueError, match="dispatch='fast'"):
        D.get_dispatch("fast")
