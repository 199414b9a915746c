"""Top-k masks, criteria, structures and drop/grow (SET, RigL) against hand-computed masks,
and the MaskedPruningMethod's refusal of parts its schedule never uses."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from sparsejax.sparsity import CRITERIA, STRUCTURES, NMStructure, RunInfo
from sparsejax.sparsity import schedules as S
from sparsejax.sparsity import select as C
from sparsejax.sparsity.pruning import MaskedPruningMethod
from sparsejax.sparsity.structures import BlockStructure

_topk = jax.jit(C.topk_mask)


def scores(name, w, **kw):
    return CRITERIA.get(name)().scores(w, **kw)


@settings(max_examples=12, deadline=None)
@given(st.sampled_from([1, 7, 64, 200]), st.data())
def test_topk_mask_exact_count_and_keeps_largest(size, data):
    k = data.draw(st.integers(0, size))
    s = jax.random.normal(jax.random.PRNGKey(k), (size,))
    m = np.asarray(_topk(s, jnp.int32(k)))
    assert m.sum() == k
    if 0 < k < size:
        assert np.asarray(s)[m].min() >= np.asarray(s)[~m].max()


def test_topk_ties_broken_by_index():
    np.testing.assert_array_equal(C.topk_mask(jnp.zeros(5), 2), [True, True, False, False, False])


def test_layerwise_and_global_magnitude():
    params = {"a": jnp.array([[1.0, -5.0], [0.5, 2.0]]), "b": jnp.array([[0.1, 0.2], [3.0, 4.0]])}
    masks = jax.tree.map(lambda p: jnp.ones(p.shape, bool), params)
    s = scores("magnitude", params)
    lw = C.layerwise_topk(s, masks, {"a": jnp.int32(2), "b": jnp.int32(1)})
    np.testing.assert_array_equal(lw["a"], [[False, True], [False, True]])
    np.testing.assert_array_equal(lw["b"], [[False, False], [False, True]])
    g = STRUCTURES.get("global")().select(s, masks, {"a": 1, "b": 2}, scale=1.0, alive_only=True)
    np.testing.assert_array_equal(g["a"], [[False, True], [False, False]])
    np.testing.assert_array_equal(g["b"], [[False, False], [True, True]])
    # alive_only: a pruned entry never comes back while the count shrinks.
    pruned = {"a": jnp.array([[True, False], [True, True]]), "b": masks["b"]}
    again = C.layerwise_topk(s, pruned, {"a": jnp.int32(2), "b": jnp.int32(4)})
    np.testing.assert_array_equal(again["a"], [[True, False], [False, True]])


def test_criteria_scores_by_hand():
    w, g = {"k": jnp.array([[1.0, -2.0]])}, {"k": jnp.array([[3.0, 0.5]])}
    np.testing.assert_allclose(scores("snip", w, grads=g)["k"], [[3.0, 1.0]])
    np.testing.assert_allclose(scores("gradient", w, grads=g)["k"], [[3.0, 0.5]])
    np.testing.assert_allclose(scores("magnitude", w)["k"], [[1.0, 2.0]])
    r = scores("random", w, rng=jax.random.PRNGKey(0))["k"]
    assert r.shape == (1, 2) and np.all((np.asarray(r) >= 0) & (np.asarray(r) < 1))
    mv = CRITERIA.get("movement")()
    st_ = mv.accumulate(mv.init_state(w), w, g)
    np.testing.assert_allclose(mv.scores(w, state=st_)["k"], [[-3.0, 1.0]])
    with pytest.raises(ValueError, match="snip.*dense gradient"):
        scores("snip", w)
    with pytest.raises(ValueError, match="random.*rng"):
        scores("random", w)


def test_per_output_block_and_nm_structures():
    w = jnp.array([[1.0, 4.0], [3.0, 2.0], [0.5, 8.0], [6.0, 0.1]])  # [in=4, out=2]
    m = {"k": jnp.ones((4, 2), bool)}
    per_out = STRUCTURES.get("per_output")().select({"k": jnp.abs(w)}, m, {"k": 4}, scale=1.0,
                                                    alive_only=True)["k"]
    # column 0 = |1, 3, .5, 6| keeps rows 1, 3; column 1 = |4, 2, 8, .1| keeps rows 0, 2
    np.testing.assert_array_equal(per_out, [[False, True], [True, False], [False, True], [True, False]])
    skew = STRUCTURES.get("per_output")().select({"k": jnp.abs(w.at[0, 1].set(0.0))}, m, {"k": 4},
                                                 scale=1.0, alive_only=True)["k"]
    np.testing.assert_array_equal(skew.sum(axis=0), [2, 2])  # per column, not per layer
    nm = NMStructure(1, 2, axis=-2).select({"k": jnp.abs(w)}, m, {"k": 4}, scale=1.0,
                                          alive_only=True)["k"]
    np.testing.assert_array_equal(nm, [[False, True], [True, False], [False, True], [True, False]])
    blk = BlockStructure((2, 1)).select({"k": jnp.abs(w)}, m, {"k": 4}, scale=1.0,
                                        alive_only=True)["k"]
    # column blocks: rows 0-1 sums (4, 6), rows 2-3 sums (6.5, 8.1): keep the best two
    np.testing.assert_array_equal(blk, [[False, False], [False, False], [True, True], [True, True]])


def _rigl_case():
    w = jnp.array([[0.5, -0.1, 0.0, 0.0], [0.3, 0.9, 0.0, 0.0]])
    m = jnp.array([[True, True, False, False], [True, True, False, False]])
    g = jnp.array([[0.0, 0.1, 1.0, 6.0], [0.2, 0.0, 3.0, -4.0]])
    return w, m, g


def test_rigl_drop_grow_hand_worked():
    w, m, g = _rigl_case()
    new = C.drop_grow({"k": m}, scores("magnitude", {"k": w}), 0.5,
                      scores("gradient", {"k": w}, grads={"k": g}))
    # Drop the 2 smallest |w| alive (-0.1, 0.3); grow the 2 largest |g| among the rest (6, -4).
    np.testing.assert_array_equal(new["k"], [[True, False, False, True], [False, True, False, True]])


def test_rigl_update_zero_init_and_slot_reset():
    w, m, g = _rigl_case()
    method = MaskedPruningMethod(density=0.5, distribution="uniform", include=["k"],
                                 schedule=S.DropGrowSchedule(frequency=1, end=10, init_fraction=0.5,
                                                             decay="constant"), grow="gradient")
    method.bind(RunInfo(num_steps=10))
    params = {"k": w}
    state = {"masks": {"k": m}, "avg_density": jnp.float32(0), "num_steps": jnp.int32(0),
             "criterion_state": None}
    tx = method.wrap_optimizer(optax.adam(0.1))
    opt_state = tx.init(params)
    _, opt_state = tx.update({"k": jnp.ones_like(w)}, opt_state, params, sparsity=state)
    new_p, new_opt, new_state, metrics = jax.jit(method.update)(params, opt_state, state, step=1,
                                                                grads={"k": g})
    want_m = np.array([[True, False, False, True], [False, True, False, True]])
    np.testing.assert_array_equal(new_state["masks"]["k"], want_m)
    np.testing.assert_array_equal(new_p["k"], np.float32([[0.5, 0, 0, 0], [0, 0.9, 0, 0]]))  # grown start at zero
    mu = new_opt[0].mu["k"]
    changed = want_m != np.asarray(m)
    assert np.all(np.asarray(mu)[changed] == 0) and np.all(np.asarray(mu)[~changed & np.asarray(m)] != 0)
    assert int(jnp.sum(new_state["masks"]["k"])) == int(jnp.sum(m))
    assert float(metrics["sparsity/churn"]) == pytest.approx(4 / 8)


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 1000), st.floats(0.05, 1.0), st.floats(0.1, 0.9))
def test_set_keeps_nnz_and_grows_zeros(seed, fraction, density):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    m = jax.random.uniform(k1, (16, 8)) < density
    w = jnp.where(m, jax.random.normal(k2, (16, 8)), 0.0)
    new = C.drop_grow({"k": m}, scores("magnitude", {"k": w}), fraction,
                      scores("random", {"k": w}, rng=k3))["k"]
    assert int(new.sum()) == int(m.sum())
    p = C.update_params_for_masks({"k": w}, {"k": m}, {"k": new})["k"]
    grown = np.asarray(new & ~m)
    assert np.all(np.asarray(p)[grown] == 0) and np.all(np.asarray(p)[~np.asarray(new)] == 0)
    n_drop = int(round(fraction * int(m.sum())))
    assert int((m & ~new).sum()) <= n_drop


def test_valid_entries_are_never_kept_or_counted():
    # A [4, 8] kernel whose last 3 columns are padding: 50% of its 20 real entries are kept.
    method = MaskedPruningMethod(density=0.5, distribution="uniform", init_criterion="random")
    method.bind(RunInfo(num_steps=10, valid={"k": (1, 5)}))
    params, state = method.init({"k": jnp.ones((4, 8))}, jax.random.PRNGKey(0))
    m = np.asarray(state["masks"]["k"])
    assert not m[:, 5:].any() and m.sum() == 10
    assert float(state["density"]) == pytest.approx(0.5)
    assert float(method.metrics(params, {**state})["sparsity/param_count"]) == 10
    # an N:M structure keeps no padding either (its scores there are zeros that tie)
    nm = MaskedPruningMethod(structure=NMStructure(2, 4), schedule="one_shot")
    nm.bind(RunInfo(num_steps=10, valid={"k": (1, 5)}))
    params, state = nm.init({"k": jnp.ones((4, 8)).at[:, 5:].set(0.0)}, jax.random.PRNGKey(0))
    _, _, state, _ = nm.update(params, None, state, step=0)
    m = np.asarray(state["masks"]["k"])
    assert not m[:, 5:].any() and m.sum() == 10 and float(state["density"]) == 0.5


@pytest.mark.parametrize("kwargs, match", [
    (dict(criterion="hessian", schedule="one_shot"), r"MaskedPruningMethod.criterion='hessian' is not a registered criterion"),
    (dict(schedule="polynomal"), r"MaskedPruningMethod.schedule='polynomal' is not a registered schedule"),
    (dict(structure="nn"), r"MaskedPruningMethod.structure='nn'"),
    (dict(distribution="er"), r"MaskedPruningMethod.distribution='er' is not a registered distribution"),
    (dict(density=0.0), r"MaskedPruningMethod.density=0.0 is outside"),
    (dict(grow="random", schedule="polynomial"), r"grow='random' has no effect.*only drop/grow"),
    (dict(criterion="magnitude", schedule="constant"), r"criterion='magnitude' has no effect.*never prune"),
    (dict(init_criterion="random", schedule="one_shot"), r"init_criterion='random' has no effect.*starts dense"),
    (dict(init_criterion="snip"), r"init_criterion='snip' needs gradients"),
    (dict(structure=NMStructure(2, 4), density=0.3, schedule="one_shot"), r"density=0.3 conflicts"),
    (dict(structure=NMStructure(2, 4), distribution="erk", schedule="one_shot"), r"distribution / overrides have no effect"),
    (dict(structure=NMStructure(2, 4), schedule="drop_grow"), r"fixes the density"),
])
def test_parts_that_take_no_effect_or_conflict_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MaskedPruningMethod(**kwargs)


def test_average_density_schedule_conflicts_with_a_given_density():
    m = MaskedPruningMethod(density=0.3, schedule=S.AverageDensitySchedule(avg_density=0.5))
    with pytest.raises(ValueError, match=r"density=0.3 conflicts with AverageDensitySchedule"):
        m.bind(RunInfo(num_steps=100))
    ok = MaskedPruningMethod(schedule=S.AverageDensitySchedule(avg_density=0.5)).bind(RunInfo(100))
    assert 0 < ok.density < 0.5
