"""Balancing losses against their formulas; aux-loss-free bias balances a skewed router."""
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.models.moe import losses, router

PROBS = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6]],
                 np.float32)
IDX = np.array([[0, 1], [1, 2], [0, 1], [2, 0]])


def test_load_balance_formula():
    mask = np.ones_like(IDX, bool)
    f = np.bincount(IDX.ravel(), minlength=3) / IDX.size      # [3/8, 3/8, 2/8]
    p = PROBS.mean(0)
    expected = 3 * np.sum(f * p)
    got = losses.load_balance_loss(jnp.asarray(PROBS), jnp.asarray(IDX), jnp.asarray(mask))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # uniform routing gives exactly 1
    u = jnp.full((6, 3), 1 / 3)
    np.testing.assert_allclose(losses.load_balance_loss(u, jnp.arange(6)[:, None] % 3,
                                                        jnp.ones((6, 1), bool)), 1.0, rtol=1e-6)


def test_sequence_load_balance_is_mean_of_per_sequence():
    mask = jnp.ones(IDX.shape, bool)
    per = [losses.load_balance_loss(jnp.asarray(PROBS[i:i + 2]), jnp.asarray(IDX[i:i + 2]),
                                    mask[i:i + 2]) for i in (0, 2)]
    got = losses.sequence_load_balance_loss(jnp.asarray(PROBS), jnp.asarray(IDX), mask, 2)
    np.testing.assert_allclose(got, np.mean(per), rtol=1e-6)
    assert abs(float(got) - float(losses.load_balance_loss(PROBS, IDX, mask))) > 1e-3


def test_z_loss_formula():
    logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], np.float32)
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(losses.router_z_loss(jnp.asarray(logits)), np.mean(lse ** 2),
                               rtol=1e-6)


def test_concentration_loss_is_minus_mutual_information():
    def h(p):
        return -np.sum(p * np.log(p), -1)
    expected = -(h(PROBS.mean(0)) - h(PROBS).mean())
    np.testing.assert_allclose(losses.concentration_loss(jnp.asarray(PROBS)), expected, rtol=1e-5)
    # one-hot routing spread evenly over experts reaches the minimum -log(E)
    eye = jnp.eye(3)
    np.testing.assert_allclose(losses.concentration_loss(eye), -np.log(3), rtol=1e-6)


def test_relu_l1():
    g = jnp.array([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]])
    np.testing.assert_allclose(losses.relu_sparsity_loss(g), 3.0)


def test_aux_free_bias_moves_load_toward_uniform():
    # a skewed synthetic router: expert 0 gets a large logit offset
    e, k, t = 8, 2, 512
    logits = jax.random.normal(jax.random.key(0), (t, e)) + jnp.array([3.0, 2.0] + [0.0] * 6)
    bias = jnp.zeros((e,))

    def imbalance(b):
        load = router.softmax_topk(logits, k, bias=b).expert_load()
        return float(jnp.max(load) / jnp.mean(load)), load

    start, _ = imbalance(bias)
    for _ in range(300):
        load = router.softmax_topk(logits, k, bias=bias).expert_load()
        bias = losses.aux_free_bias_update(bias, load, 0.002)
    end, load = imbalance(bias)
    assert start > 3.0
    assert end < 1.3, (start, end, load)
