"""Top-k masks, pruning criteria and drop/grow (SET, RigL) against hand-computed masks."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from sparsejax.sparsity import criteria as C
from sparsejax.sparsity import optim
from sparsejax.sparsity import schedules as S
from sparsejax.sparsity.pruning import MaskedPruningMethod


_topk = jax.jit(C.topk_mask)


@settings(max_examples=12, deadline=None)
@given(st.sampled_from([1, 7, 64, 200]), st.data())
def test_topk_mask_exact_count_and_keeps_largest(size, data):
    k = data.draw(st.integers(0, size))
    scores = jax.random.normal(jax.random.PRNGKey(k), (size,))
    m = np.asarray(_topk(scores, jnp.int32(k)))
    assert m.sum() == k
    if 0 < k < size:
        assert np.asarray(scores)[m].min() >= np.asarray(scores)[~m].max()


def test_topk_ties_broken_by_index():
    np.testing.assert_array_equal(C.topk_mask(jnp.zeros(5), 2), [True, True, False, False, False])


def test_layerwise_and_global_magnitude():
    params = {"a": jnp.array([[1.0, -5.0], [0.5, 2.0]]), "b": jnp.array([[0.1, 0.2], [3.0, 4.0]])}
    masks = jax.tree.map(lambda p: jnp.ones(p.shape, bool), params)
    scores = C.scores_for("magnitude", params, masks)
    lw = C.layerwise_topk(scores, masks, {"a": jnp.int32(2), "b": jnp.int32(1)})
    np.testing.assert_array_equal(lw["a"], [[False, True], [False, True]])
    np.testing.assert_array_equal(lw["b"], [[False, False], [False, True]])
    g = C.global_topk(scores, masks, 3)
    np.testing.assert_array_equal(g["a"], [[False, True], [False, False]])
    np.testing.assert_array_equal(g["b"], [[False, False], [True, True]])
    # alive_only: a pruned entry never comes back while the count shrinks.
    pruned = {"a": jnp.array([[True, False], [True, True]]), "b": masks["b"]}
    again = C.layerwise_topk(scores, pruned, {"a": jnp.int32(2), "b": jnp.int32(4)})
    np.testing.assert_array_equal(again["a"], [[True, False], [False, True]])


def test_snip_scores_are_abs_w_times_g():
    w, g = jnp.array([[1.0, -2.0]]), jnp.array([[3.0, 0.5]])
    s = C.scores_for("snip", {"k": w}, {"k": jnp.ones((1, 2), bool)}, grads={"k": g})
    np.testing.assert_allclose(s["k"], [[3.0, 1.0]])


def _rigl_case():
    w = jnp.array([[0.5, -0.1, 0.0, 0.0], [0.3, 0.9, 0.0, 0.0]])
    m = jnp.array([[True, True, False, False], [True, True, False, False]])
    g = jnp.array([[0.0, 0.1, 1.0, 6.0], [0.2, 0.0, 3.0, -4.0]])
    return w, m, g


def test_rigl_drop_grow_hand_worked():
    w, m, g = _rigl_case()
    new = C.drop_grow({"k": m}, {"k": w}, 0.5, C.grow_scores_for("gradient", {"k": m}, None, {"k": g}))
    # Drop the 2 smallest |w| alive (-0.1, 0.3); grow the 2 largest |g| among the rest (6, -4).
    np.testing.assert_array_equal(new["k"], [[True, False, False, True], [False, True, False, True]])


def test_rigl_update_zero_init_and_slot_reset():
    w, m, g = _rigl_case()
    method = MaskedPruningMethod(density=0.5, distribution="uniform", include=["k"],
                                 schedule=S.DropGrowSchedule(frequency=1, end=10, init_fraction=0.5, decay="constant"))
    params = {"k": w}
    state = {"masks": {"k": m}, "avg_density": jnp.float32(0), "num_steps": jnp.int32(0), "movement": None}
    tx = method.wrap_optimizer(optax.adam(0.1), state)
    opt_state = tx.init(params)
    _, opt_state = tx.update({"k": jnp.ones_like(w)}, opt_state, params)  # nonzero moments where kept
    new_p, new_opt, new_state, metrics = jax.jit(method.update)(params, opt_state, state, step=1, grads={"k": g})
    want_m = np.array([[True, False, False, True], [False, True, False, True]])
    np.testing.assert_array_equal(new_state["masks"]["k"], want_m)
    np.testing.assert_array_equal(new_p["k"], np.float32([[0.5, 0, 0, 0], [0, 0.9, 0, 0]]))  # grown start at zero
    mu = new_opt.inner[0].mu["k"]
    changed = want_m != np.asarray(m)
    assert np.all(np.asarray(mu)[changed] == 0) and np.all(np.asarray(mu)[~changed & np.asarray(m)] != 0)
    assert optim.get_masks(new_opt)["k"] is not None
    np.testing.assert_array_equal(optim.get_masks(new_opt)["k"], want_m)
    assert int(jnp.sum(new_state["masks"]["k"])) == int(jnp.sum(m))
    assert float(metrics["sparsity/churn"]) == pytest.approx(4 / 8)


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 1000), st.floats(0.05, 1.0), st.floats(0.1, 0.9))
def test_set_keeps_nnz_and_grows_zeros(seed, fraction, density):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    m = jax.random.uniform(k1, (16, 8)) < density
    w = jnp.where(m, jax.random.normal(k2, (16, 8)), 0.0)
    new = C.drop_grow({"k": m}, {"k": w}, fraction, C.grow_scores_for("random", {"k": m}, k3, None))["k"]
    assert int(new.sum()) == int(m.sum())
    p = C.update_params_for_masks({"k": w}, {"k": m}, {"k": new})["k"]
    grown = np.asarray(new & ~m)
    assert np.all(np.asarray(p)[grown] == 0) and np.all(np.asarray(p)[~np.asarray(new)] == 0)
    n_drop = int(round(fraction * int(m.sum())))
    assert int((m & ~new).sum()) <= n_drop


def test_bad_criterion_inputs_raise():
    with pytest.raises(ValueError, match="criterion"):
        MaskedPruningMethod(criterion="hessian")
    with pytest.raises(ValueError, match="grads"):
        C.scores_for("snip", {"k": jnp.ones((2, 2))}, {"k": jnp.ones((2, 2), bool)})
    with pytest.raises(ValueError, match="density"):
        MaskedPruningMethod(density=0.0)
