"""Balancing losses against their formulas; aux-loss-free bias balances a skewed router."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def test_load_balance_normalizations_by_hand():
    """4 tokens, top-2, 3 experts: counts [3, 3, 2] of 8 assignments; P = column means of PROBS.
    'assignments': 3 * (3/8 P0 + 3/8 P1 + 2/8 P2); 'tokens' (HF Mixtral): 3 * (3/4 P0 + 3/4 P1 +
    2/4 P2), exactly top_k = 2 times as large; uniform routing gives 1 and top_k."""
    mask = jnp.ones(IDX.shape, bool)
    p0, p1, p2 = (0.7 + 0.1 + 0.5 + 0.2) / 4, (0.2 + 0.6 + 0.25 + 0.2) / 4, (0.1 + 0.3 + 0.25 + 0.6) / 4
    by_assignment = 3 * (3 / 8 * p0 + 3 / 8 * p1 + 2 / 8 * p2)
    by_token = 3 * (3 / 4 * p0 + 3 / 4 * p1 + 2 / 4 * p2)
    np.testing.assert_allclose(losses.load_balance_loss(PROBS, IDX, mask, "assignments"), by_assignment, rtol=1e-6)
    np.testing.assert_allclose(losses.load_balance_loss(PROBS, IDX, mask, "tokens"), by_token, rtol=1e-6)
    u, uniform_idx = jnp.full((6, 3), 1 / 3), jnp.stack([jnp.arange(6) % 3, (jnp.arange(6) + 1) % 3], 1)
    for norm, want in (("assignments", 1.0), ("tokens", 2.0)):
        np.testing.assert_allclose(losses.load_balance_loss(u, uniform_idx, jnp.ones((6, 2), bool), norm),
                                   want, rtol=1e-6)
    seq = losses.sequence_load_balance_loss(PROBS, IDX, mask, 2, "tokens")
    np.testing.assert_allclose(seq, 2 * losses.sequence_load_balance_loss(PROBS, IDX, mask, 2), rtol=1e-6)
    with pytest.raises(ValueError, match="load_balance_normalization='mixtral'.*assignments"):
        losses.load_balance_loss(PROBS, IDX, mask, "mixtral")


@pytest.mark.parametrize("norm", ["assignments", "tokens"])
def test_global_load_balance_over_microbatches_equals_the_unsplit_loss(norm):
    """Global-batch balancing: with the expert counts of all micro-batches, the mean over
    micro-batches of the loss (and of its gradient w.r.t. the logits) equals the un-split
    batch's loss; the per-micro-batch loss averaged does not (it balances each small batch)."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(32, 4)) * 2, jnp.float32)
    idx = jnp.asarray(np.stack([rng.permutation(4)[:2] for _ in range(32)]))
    mask = jnp.ones(idx.shape, bool)
    k = 4

    def whole(lg):
        return losses.load_balance_loss(jax.nn.softmax(lg), idx, mask, norm)

    def split(lg, per_micro):
        counts = losses.expert_counts(idx, mask, 4)
        out = []
        for m in range(k):  # micro-batch m: rows m::k, as train/accumulate.py splits
            p, i = jax.nn.softmax(lg[m::k]), idx[m::k]
            out.append(losses.load_balance_loss(p, i, mask[m::k], norm) if per_micro else
                       losses.load_balance_from_counts(p, counts, 32, norm))
        return sum(out) / k

    split = jax.jit(split, static_argnums=1)
    np.testing.assert_allclose(split(logits, False), whole(logits), rtol=1e-6)
    np.testing.assert_allclose(jax.jit(jax.grad(split.__wrapped__), static_argnums=1)(
        logits, False), jax.jit(jax.grad(whole))(logits),
                               rtol=1e-5, atol=1e-8)
    assert abs(float(split(logits, True)) - float(whole(logits))) > 1e-3


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
        r = router.softmax_topk(logits, k, bias=bias)
        bias = losses.aux_free_bias_update(bias, losses.expert_counts(r.expert_index, r.mask, e), 0.002)
    end, load = imbalance(bias)
    assert start > 3.0
    assert end < 1.3, (start, end, load)


@pytest.mark.parametrize("counts, want", [
    ([3, 3, 3, 3], [0, 0, 0, 0]),          # 12 tokens, top-1, E=4: exactly balanced, nothing moves
    ([2, 3, 3, 4], [1, 0, 0, -1]),         # the mean (3) is hit exactly by two experts
    ([5, 5, 5, 5, 5, 5, 5], [0] * 7),      # 35 assignments over 7 experts
    ([4, 5, 6, 5, 5, 5, 5], [1, 0, -1, 0, 0, 0, 0]),
    ([1, 2, 2, 2, 3], [1, 0, 0, 0, -1]),   # 10 over 5: mean 2
    ([3, 3, 4], [1, 1, -1]),               # 10 over 3: mean 3.33, no expert at the mean
    ([0, 0, 0, 7], [1, 1, 1, -1]),
])
def test_aux_free_bias_sign_from_exact_counts(counts, want):
    """Under jit, as in training: the sign is exact at balanced loads and at token counts that
    are not powers of two (float fractions gave -rate to every expert at [3, 3, 3, 3])."""
    rate = 0.001
    bias = jnp.full((len(counts),), 0.25, jnp.float32)
    got = jax.jit(losses.aux_free_bias_update, static_argnums=2)(bias, jnp.asarray(counts, jnp.int32), rate)
    np.testing.assert_array_equal(np.asarray(got), np.float32(0.25) + np.float32(rate) * np.asarray(want, np.float32))


def test_aux_free_bias_from_routing_counts_under_jit():
    """12 tokens routed top-1 over 4 experts with loads [2, 3, 3, 4] (the issue's example)."""
    idx = jnp.asarray([0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3])[:, None]
    mask = jnp.ones(idx.shape, bool)

    @jax.jit
    def step(bias):
        return losses.aux_free_bias_update(bias, losses.expert_counts(idx, mask, 4), 0.01)

    np.testing.assert_allclose(step(jnp.zeros(4)), [0.01, 0.0, 0.0, -0.01])
    balanced = jnp.asarray([0, 1, 2, 3] * 3)[:, None]
    np.testing.assert_array_equal(jax.jit(losses.expert_counts, static_argnums=2)(balanced, mask, 4), [3, 3, 3, 3])
    masked = mask.at[0, 0].set(False)  # inactive assignments (ReLU routing) are not counted
    np.testing.assert_array_equal(losses.expert_counts(idx, masked, 4), [1, 3, 3, 4])
    with pytest.raises(ValueError, match="integer assignment counts"):
        losses.aux_free_bias_update(jnp.zeros(4), jnp.full((4,), 0.25), 0.01)
