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
    plan = ex.FrequencyPruning().plan(np.array([5.0, 9.0, 1.0, 9.0]), np.eye(4), 2)
    assert plan.groups == ((1,), (3,)) and plan.kept == [1, 3]


def test_merge_groups_by_router_logit_similarity_and_weights_by_frequency():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((50, 4))
    logits[:, 2] = 3.0 * logits[:, 0]   # expert 2 routes like expert 0
    logits[:, 3] = 0.5 * logits[:, 1] + 0.01 * rng.standard_normal(50)
    counts = np.array([10.0, 8.0, 2.0, 6.0])
    plan = ex.FrequencyWeightedMerge().plan(counts, logits.T @ logits, 2)
    assert plan.groups == ((0, 2), (1, 3))
    np.testing.assert_allclose(plan.weights[0], [10 / 12, 2 / 12])
    np.testing.assert_allclose(plan.weights[1], [8 / 14, 6 / 14])


def test_reconstruction_drops_the_experts_whose_removal_costs_least():
    costs = {0: 5.0, 1: 0.1, 2: 3.0, 3: 0.2}
    error = lambda kept: sum(costs[e] for e in range(4) if e not in kept)
    plan = ex.ReconstructionPruning().plan(np.ones(4), np.eye(4), 2, error)
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
