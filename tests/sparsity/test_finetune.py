"""Sparse fine-tuning: selection, sparse diffs and their composition."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax.sparsity import RunInfo
from sparsejax.sparsity import finetune as F


def test_most_changed_masks_global_hand_worked():
    base = {"a": jnp.zeros(4), "b": jnp.zeros((2, 2))}
    tuned = {"a": jnp.array([1.0, -5.0, 0.1, 0.0]), "b": jnp.array([[2.0, 0.0], [0.0, 3.0]])}
    masks = jax.tree.map(lambda x: jnp.ones(x.shape, bool), base)
    m = F.most_changed_masks(base, tuned, masks, 3 / 8)
    np.testing.assert_array_equal(m["a"], [False, True, False, False])
    np.testing.assert_array_equal(m["b"], [[True, False], [False, True]])


def test_sparse_diff_roundtrip_and_disjoint_composition():
    key = jax.random.PRNGKey(0)
    base = {"x": {"kernel": jax.random.normal(key, (6, 5))}, "y": {"bias": jnp.zeros(5)}}
    m1 = jnp.arange(30).reshape(6, 5) % 3 == 0
    m2 = jnp.arange(30).reshape(6, 5) % 3 == 1
    t1 = {"x": {"kernel": base["x"]["kernel"] + jnp.where(m1, 1.5, 0.0)}, "y": {"bias": jnp.zeros(5)}}
    t2 = {"x": {"kernel": base["x"]["kernel"] + jnp.where(m2, -2.0, 0.0)}, "y": {"bias": jnp.arange(5.0)}}
    d1 = F.sparse_diff(base, t1, {"x": {"kernel": m1}, "y": {"bias": None}})
    d2 = F.sparse_diff(base, t2)
    assert set(d1) == {"x/kernel"} and d1["x/kernel"]["indices"].size == int(m1.sum())
    assert set(d2) == {"x/kernel", "y/bias"} and d2["y/bias"]["indices"].tolist() == [1, 2, 3, 4]
    for t, d in [(t1, d1), (t2, d2)]:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), F.apply_diffs(base, [d]), t)
    both = F.apply_diffs(base, [d1, d2])
    sequential = F.apply_diffs(F.apply_diffs(base, [d1]), [d2])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), both, sequential)
    want = jax.tree.map(lambda a, b, c: a + b - c, t1, t2, base)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), both, want)
    half = F.apply_diffs(base, [d1], scales=[0.5])
    np.testing.assert_allclose(half["x"]["kernel"], base["x"]["kernel"] + jnp.where(m1, 0.75, 0.0), rtol=1e-6)


def test_apply_diffs_bad_input_raises():
    base = {"k": jnp.zeros((2, 2))}
    with pytest.raises(ValueError, match="path 'nope'"):
        F.apply_diffs(base, [{"nope": {"indices": np.array([0]), "values": np.array([1.0])}}])
    with pytest.raises(ValueError, match="indices outside"):
        F.apply_diffs(base, [{"k": {"indices": np.array([4]), "values": np.array([1.0])}}])
    with pytest.raises(ValueError, match="mode"):
        F.SparseFinetuneMethod(mode="lora")


def test_lt_sft_update_rewinds_and_keeps_budget():
    base = {"d": {"kernel": jnp.ones((4, 5)), "bias": jnp.zeros(5)}}
    method = F.SparseFinetuneMethod(mode="lt_sft", density=0.25, select_step=3)
    method.bind(RunInfo(num_steps=10))
    params, state = method.init(base, jax.random.PRNGKey(0))
    tx = method.wrap_optimizer(optax.adam(0.1))
    opt = tx.init(params)
    tuned = {"d": {"kernel": base["d"]["kernel"] + jnp.arange(20.0).reshape(4, 5) / 10, "bias": jnp.zeros(5)}}
    new_p, new_opt, new_state, _ = method.update(tuned, opt, state, step=3)
    m = np.asarray(new_state["masks"]["d"]["kernel"])
    assert m.sum() == 5 and np.all(m.reshape(-1)[-5:])  # the 5 largest changes
    np.testing.assert_array_equal(new_p["d"]["kernel"], base["d"]["kernel"])  # rewound
    # Frozen entries and frozen (non-candidate) params do not move under the optimizer.
    g = jax.tree.map(jnp.ones_like, new_p)
    u, _ = tx.update(g, new_opt, new_p, sparsity=new_state)
    assert np.all(np.asarray(u["d"]["kernel"])[~m] == 0) and np.all(np.asarray(u["d"]["kernel"])[m] != 0)
    assert np.all(np.asarray(u["d"]["bias"]) == 0)
