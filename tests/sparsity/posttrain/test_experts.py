"""MoE expert pruning and merging: plans against their definitions, the reduced layer's
router and checkpoint consistent with the plan, and the merged layer's output equal to the
output of weights merged by hand (numpy)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import config as config_lib
from sparsejax.sparsity.posttrain import experts as ex


@pytest.fixture()
def moe():
    config_lib.parse_gin([], ["MoeMlp.num_experts=4", "MoeMlp.top_k=2", "MoeMlp.mlp_dim=16",
                              "MoeMlp.num_shared_experts=1"])
    from sparsejax.models.moe.layer import MoeMlp
    layer = MoeMlp(embed_dim=8)
    x = jax.random.normal(jax.random.key(1), (2, 12, 8))
    params = nn.meta.unbox(layer.init(jax.random.key(0), x))["params"]
    return layer, params, x


def test_frequency_keeps_the_most_used_experts():
    plan = ex.FrequencyPruning().plan(ex.ExpertStats(np.array([5.0, 9.0, 1.0, 9.0]), np.eye(4)), 2)
    assert plan.groups == ((1,), (3,)) and plan.kept == [1, 3]


def test_merge_groups_by_router_logit_similarity_and_weights_by_frequency():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((50, 4))
    logits[:, 2] = 3.0 * logits[:, 0]   # expert 2 routes like expert 0
    logits[:, 3] = 0.5 * logits[:, 1] + 0.01 * rng.standard_normal(50)
    counts = np.array([10.0, 8.0, 2.0, 6.0])
    plan = ex.FrequencyWeightedMerge().plan(ex.ExpertStats(counts, logits.T @ logits), 2)
    assert plan.groups == ((0, 2), (1, 3))
    np.testing.assert_allclose(plan.weights[0], [10 / 12, 2 / 12])
    np.testing.assert_allclose(plan.weights[1], [8 / 14, 6 / 14])


def test_reconstruction_drops_the_experts_whose_removal_costs_least():
    costs = {0: 5.0, 1: 0.1, 2: 3.0, 3: 0.2}
    error = lambda kept: sum(costs[e] for e in range(4) if e not in kept)
    plan = ex.ReconstructionPruning().plan(ex.ExpertStats(np.ones(4), np.eye(4)), 2, error)
    assert plan.kept == [0, 2]


def test_merged_layer_equals_the_hand_merged_layer(moe):
    layer, params, x = moe
    plan = ex.ReductionPlan(groups=((2, 0), (1, 3)), weights=((0.75, 0.25), (0.5, 0.5)))
    new, _ = ex.apply_plan(params, None, plan)
    # the checkpoint: K experts, the representatives' router columns, shared experts as they were
    assert new["router_kernel"].shape == (8, 2)
    np.testing.assert_array_equal(new["router_kernel"], params["router_kernel"][:, [2, 1]])
    for name in ("wi_gate", "wi_up", "wo"):
        assert new["experts"][name].shape[0] == 2
    np.testing.assert_array_equal(new["shared_experts"]["wi_gate"],
                                  params["shared_experts"]["wi_gate"])
    hand = jax.tree.map(np.asarray, params)
    e = hand["experts"]
    for name in ("wi_gate", "wi_up", "wo"):
        e[name] = np.stack([0.75 * e[name][2] + 0.25 * e[name][0],
                            0.5 * e[name][1] + 0.5 * e[name][3]])
    hand["router_kernel"] = hand["router_kernel"][:, [2, 1]]
    small = layer.clone(num_experts=2)
    got = small.apply({"params": new}, x)
    want = small.apply({"params": jax.tree.map(jnp.asarray, hand)}, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_pruned_layer_routes_over_the_kept_experts_renormalized(moe):
    layer, params, x = moe
    new, _ = ex.apply_plan(params, None, ex.keep_plan([0, 3]))
    logits = x.reshape(-1, 8) @ params["router_kernel"][:, [0, 3]]
    probs = jax.nn.softmax(logits, axis=-1)  # softmax over the kept experts only
    from sparsejax.models.moe.experts import ExpertWeights, batched_ffn
    w = ExpertWeights(*(params["experts"][k][jnp.array([0, 3])] for k in ("wi_gate", "wi_up", "wo")))
    xt = x.reshape(-1, 8)
    per_expert = batched_ffn(jnp.broadcast_to(xt, (2,) + xt.shape), w)  # [2, T, d]
    sh = params["shared_experts"]
    shared = (nn.silu(xt @ sh["wi_gate"]) * (xt @ sh["wi_up"])) @ sh["wo"]
    want = jnp.einsum("te,etd->td", probs, per_expert) + shared  # top-2 of 2 = all, weights sum 1
    got = layer.clone(num_experts=2).apply({"params": new}, x).reshape(-1, 8)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_bias_follows_the_representatives():
    state = {"bias": jnp.array([0.1, 0.2, 0.3, 0.4])}
    params = {"router_kernel": jnp.ones((2, 4)), "experts": {"wo": jnp.ones((4, 2, 2))}}
    _, new_state = ex.apply_plan(params, state, ex.ReductionPlan(((3, 0), (1,)),
                                                                 ((0.5, 0.5), (1.0,))))
    np.testing.assert_allclose(new_state["bias"], [0.4, 0.2])


def _numpy_layer(layer, params, x):
    """The layer's routing and expert outputs in numpy (softmax top-k, renormalized):
    (gates [T, E], expert outputs [E, T, d], shared output [T, d])."""
    xt = np.asarray(x, np.float64).reshape(-1, 8)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    logits = xt @ p["router_kernel"]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    top = np.argsort(-probs, axis=1)[:, :layer.top_k]
    gates = np.zeros_like(probs)
    for t, row in enumerate(top):
        gates[t, row] = probs[t, row] / probs[t, row].sum()
    silu = lambda v: v / (1 + np.exp(-v))
    e = p["experts"]
    y = np.stack([(silu(xt @ e["wi_gate"][j]) * (xt @ e["wi_up"][j])) @ e["wo"][j]
                  for j in range(layer.num_experts)])
    sh = p["shared_experts"]
    shared = (silu(xt @ sh["wi_gate"]) * (xt @ sh["wi_up"])) @ sh["wo"]
    return gates, y, shared


def test_reap_saliency_is_the_mean_routed_gate_times_output_norm(moe):
    from sparsejax.sparsity.posttrain import stats as st
    layer, params, x = moe
    gates, y, shared = _numpy_layer(layer, params, x)
    # the gates the statistics use are the layer's own combine weights
    np.testing.assert_allclose(np.einsum("te,etd->td", gates, y) + shared,
                               np.asarray(layer.apply({"params": params}, x)).reshape(-1, 8),
                               rtol=1e-4, atol=1e-5)
    w = jnp.ones(x.shape[0] * x.shape[1]).at[3].set(0.0)  # token 3 is padding
    s = st.moe_stats(layer, params, None, x, w, "moe", set(), outputs=True)
    stats = ex.ExpertStats.from_stats(s)
    routed = (gates > 0) & (np.asarray(w) > 0)[:, None]
    norms = np.linalg.norm(y, axis=-1).T  # [T, E]
    want = np.array([np.mean((gates * norms)[routed[:, j], j]) for j in range(4)])
    np.testing.assert_allclose(ex.reap_saliency(stats), want, rtol=1e-4)
    peak = np.array([np.abs(y[j][routed[:, j]]).max() for j in range(4)])
    np.testing.assert_allclose(stats.output_max, peak, rtol=1e-4)
    assert ex.REAP().plan(stats, 2).kept == sorted(np.argsort(-want)[:2].tolist())


def test_reap_prunes_the_least_salient_and_never_reached_experts():
    # saliency = gate_norm_sum / counts: [2, 0.5, 0 (no tokens), 3]
    stats = ex.ExpertStats(np.array([10.0, 40.0, 0.0, 1.0]), np.eye(4),
                           gate_norm_sum=np.array([20.0, 20.0, 0.0, 3.0]))
    np.testing.assert_allclose(ex.reap_saliency(stats), [2.0, 0.5, 0.0, 3.0])
    assert ex.REAP().plan(stats, 2).kept == [0, 3]   # frequency would keep [0, 1]
    assert ex.FrequencyPruning().plan(stats, 2).kept == [0, 1]


@pytest.mark.parametrize("name", ["frequency", "reconstruction", "merge", "reap"])
def test_every_reducer_keeps_protected_experts_alone_and_drops_the_dropped(name):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((40, 6))
    stats = ex.ExpertStats(np.array([9.0, 1.0, 8.0, 7.0, 6.0, 5.0]), logits.T @ logits,
                           gate_norm_sum=np.array([9.0, 0.1, 8.0, 7.0, 6.0, 5.0]))
    seen = []

    def error(kept):  # removing a heavily used expert costs more
        seen.append(tuple(kept))
        return float(sum(stats.counts[e] for e in range(6) if e not in kept))

    reducer = ex.EXPERT_REDUCERS.get(name)()
    plan = ex.constrained_plan(reducer, stats, 3, protected=[1], dropped=[0], error=error)
    assert len(plan.groups) == 3 and (1,) in plan.groups           # the least used, kept alone
    assert all(0 not in g for g in plan.groups)                     # dropped
    assert all(1 in kept for kept in seen)                          # errors see it kept
    free = [g for g in plan.groups if g != (1,)]
    unconstrained = reducer.plan(stats.subset([2, 3, 4, 5]), 2, None if name != "reconstruction"
                                 else lambda kept: error(sorted([[2, 3, 4, 5][i] for i in kept]
                                                                + [1])))
    assert free == [tuple([2, 3, 4, 5][i] for i in g) for g in unconstrained.groups]


def test_protecting_more_experts_than_kept_is_refused():
    stats = ex.ExpertStats(np.ones(4), np.eye(4))
    with pytest.raises(ValueError, match="protect_super_experts=False"):
        ex.constrained_plan(ex.FrequencyPruning(), stats, 2, protected=[0, 1, 2])


def test_super_experts_are_outliers_of_their_layer():
    from sparsejax.sparsity.posttrain.super_experts import SuperExperts
    peak = np.array([1.0, 1.2, 0.9, 30.0, 1.1, 12.0])  # median 1.15
    assert SuperExperts(multiple=10.0).find(peak) == [3, 5]
    assert SuperExperts(multiple=20.0).find(peak) == [3]
    # experts calibration never reaches are left out of the median
    assert SuperExperts(multiple=10.0).find(np.array([0.0, 0.0, 0.0, 1.0, 2.0, 30.0]),
                                            np.array([0, 0, 0, 5, 5, 5])) == [5]
    with pytest.raises(ValueError, match=r"SuperExperts.multiple=1.0 must be > 1"):
        SuperExperts(multiple=1.0)


@pytest.mark.parametrize("kw,match", [
    (dict(drop_experts=("1:shared",)), r"names '1:shared', a shared expert.*never dropped"),
    (dict(drop_experts=("x",)), r"holds 'x'; valid: 'LAYER:EXPERT'"),
])
def test_bad_expert_settings(kw, match):
    from sparsejax.sparsity.posttrain.config import PruneConfig
    with pytest.raises(ValueError, match=match):
        PruneConfig(method=None, experts="reap", num_experts=2, **kw)
    with pytest.raises(ValueError, match="has no effect without PruneConfig.experts"):
        PruneConfig(protect_super_experts=False)


def test_batches_combine_by_sum_and_output_peaks_by_max():
    from sparsejax.sparsity.posttrain import stats as st
    a = {"moe": {"counts": jnp.array([1.0, 2.0]), "output_max": jnp.array([5.0, 1.0]),
                 "gate_norm_sum": jnp.array([1.0, 1.0])}}
    b = {"moe": {"counts": jnp.array([3.0, 0.0]), "output_max": jnp.array([2.0, 4.0]),
                 "gate_norm_sum": jnp.array([0.5, 0.0])}}
    c = st.add_stats(a, b)["moe"]
    np.testing.assert_array_equal(c["counts"], [4.0, 2.0])
    np.testing.assert_array_equal(c["output_max"], [5.0, 4.0])
    np.testing.assert_array_equal(c["gate_norm_sum"], [1.5, 1.0])
