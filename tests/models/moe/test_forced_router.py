"""Forced-balance routing: round-robin gives exactly equal expert loads, random gives k
distinct uniform experts per token from the 'router' rng, both usable by name through MoeMlp."""
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.models.moe import losses
from sparsejax.models.moe.forced_router import ForcedBalanceRouter, forced_balance
from sparsejax.models.moe.layer import MoeMlp
from sparsejax.models.moe.router import ROUTERS


def counts(r, e):
    return np.asarray(losses.expert_counts(r.expert_index, r.mask, e))


def test_round_robin_is_exactly_balanced_and_distinct():
    logits = jax.random.normal(jax.random.key(0), (96, 8)) * 5  # scores are ignored
    r = forced_balance(logits, 3)
    idx = np.asarray(r.expert_index).reshape(96, 3)
    assert all(len(set(row)) == 3 for row in idx)
    np.testing.assert_array_equal(idx[1], [3, 4, 5])  # token t: (3t + j) mod 8
    np.testing.assert_array_equal(counts(r, 8), np.full(8, 96 * 3 // 8))
    np.testing.assert_allclose(np.asarray(r.weight), 1 / 3)


def test_random_is_uniform_distinct_and_follows_the_rng():
    logits = jnp.zeros((4096, 8))
    a = forced_balance(logits, 2, "random", jax.random.key(1))
    b = forced_balance(logits, 2, "random", jax.random.key(2))
    idx = np.asarray(a.expert_index).reshape(-1, 2)
    assert np.all(idx[:, 0] != idx[:, 1])
    c = counts(a, 8)
    expected = 4096 * 2 / 8
    assert np.all(np.abs(c - expected) < 5 * np.sqrt(expected)), c  # ~5 sigma
    assert not np.array_equal(a.expert_index, b.expert_index)
    np.testing.assert_array_equal(a.expert_index, forced_balance(
        logits, 2, "random", jax.random.key(1)).expert_index)


@pytest.mark.parametrize("mode", ["round_robin", "random"])
def test_moe_layer_with_forced_routing_by_name(mode):
    gin.parse_config([f"ForcedBalanceRouter.mode = '{mode}'"])
    assert "forced_balance" in ROUTERS
    layer = MoeMlp(embed_dim=16, mlp_dim=8, num_experts=4, top_k=2, router="forced_balance",
                   dispatch="pallas_gmm")
    x = jax.random.normal(jax.random.key(0), (2, 32, 16))
    params = layer.init({"params": jax.random.key(1), "router": jax.random.key(2)}, x)
    run = jax.jit(lambda p, k: layer.apply(p, x, deterministic=False, rngs={"router": k},
                                           mutable=["metrics"]))
    (y1, m1), (y2, _) = run(params, jax.random.key(3)), run(params, jax.random.key(4))
    load = np.asarray(m1["metrics"]["expert_load"][0])
    if mode == "round_robin":
        np.testing.assert_allclose(load, 0.25)
        np.testing.assert_array_equal(y1, y2)
    else:
        assert np.all(load > 0.1) and not np.allclose(y1, y2)  # a new draw per rng
    assert np.isfinite(np.asarray(y1)).all()


def test_bad_mode_and_bias_are_refused():
    with pytest.raises(ValueError, match=r"ForcedBalanceRouter.mode='zipf' is unknown; valid"):
        ForcedBalanceRouter(mode="zipf")
    with pytest.raises(ValueError, match="bias_update_rate"):
        ForcedBalanceRouter().route(jnp.zeros((4, 4)), top_k=2, capacity=4, bias=jnp.zeros(4))
