"""Routers against hand-computed cases."""
import numpy as np
import jax.numpy as jnp
import pytest

from sparsejax.models.moe import router as R

LOGITS = np.array([[2.0, 1.0, 0.0, -1.0],
                   [0.0, 0.0, 3.0, 1.0],
                   [-1.0, 4.0, 0.5, 0.0]], np.float32)


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_softmax_top1_switch():
    r = R.softmax_topk(jnp.asarray(LOGITS), 1, renormalize=False)
    p = _softmax(LOGITS)
    np.testing.assert_array_equal(r.expert_index, [0, 2, 1])
    np.testing.assert_allclose(r.weight, [p[0, 0], p[1, 2], p[2, 1]], rtol=1e-6)
    np.testing.assert_array_equal(r.token_index, [0, 1, 2])
    assert r.k == 1 and bool(r.mask.all())


def test_softmax_top2_renormalized():
    r = R.softmax_topk(jnp.asarray(LOGITS), 2, renormalize=True)
    p = _softmax(LOGITS)
    np.testing.assert_array_equal(np.asarray(r.expert_index).reshape(3, 2), [[0, 1], [2, 3], [1, 2]])
    # token 0: renormalized over experts 0, 1 -> softmax of logits (2, 1)
    np.testing.assert_allclose(np.asarray(r.weight).reshape(3, 2)[0],
                               [p[0, 0] / (p[0, 0] + p[0, 1]), p[0, 1] / (p[0, 0] + p[0, 1])],
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(r.weight).reshape(3, 2).sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(r.token_index, [0, 0, 1, 1, 2, 2])


def test_bias_steers_selection_not_weights():
    bias = jnp.array([0.0, 0.0, 0.0, 10.0])
    r = R.softmax_topk(jnp.asarray(LOGITS), 1, renormalize=False, bias=bias)
    np.testing.assert_array_equal(r.expert_index, [3, 3, 3])
    np.testing.assert_allclose(r.weight, _softmax(LOGITS)[:, 3], rtol=1e-6)


def test_sigmoid_topk_deepseek():
    r = R.sigmoid_topk(jnp.asarray(LOGITS), 2, routed_scaling=2.5)
    s = 1 / (1 + np.exp(-LOGITS))
    w = np.asarray(r.weight).reshape(3, 2)
    np.testing.assert_allclose(w[1], 2.5 * np.array([s[1, 2], s[1, 3]]) / (s[1, 2] + s[1, 3]),
                               rtol=1e-6)
    np.testing.assert_allclose(r.probs, s / s.sum(-1, keepdims=True), rtol=1e-6)


def test_softmax_deepseek_v2_group_limited_greedy():
    """Groups scored by their best expert (V2's group_limited_greedy), not by the sum of the
    two best (V3), and the weights scaled, not renormalized."""
    logits = np.array([[3.0, -5.0, 2.6, 2.6]], np.float32)  # groups {0, 1}, {2, 3}
    p = _softmax(logits)[0]
    best = R.softmax_topk(jnp.asarray(logits), 1, renormalize=False, num_groups=2,
                          top_groups=1, routed_scaling=1.5, group_score="max")
    assert int(best.expert_index[0]) == 0  # group 0 holds the best expert
    np.testing.assert_allclose(best.weight, [1.5 * p[0]], rtol=1e-6)
    top2 = R.softmax_topk(jnp.asarray(logits), 1, renormalize=False, num_groups=2,
                          top_groups=1)
    assert int(top2.expert_index[0]) == 2  # p2 + p3 > p0 + p1
    with pytest.raises(ValueError, match="SoftmaxTopKRouter.group_score='sum'"):
        R.SoftmaxTopKRouter(group_score="sum")


def test_relu_router_masks_inactive():
    r = R.relu_topk(jnp.asarray(LOGITS), 4)
    m = np.asarray(r.mask).reshape(3, 4)
    np.testing.assert_array_equal(m.sum(-1), [2, 2, 2])  # positive logits per token
    w = np.asarray(r.weight).reshape(3, 4)
    np.testing.assert_allclose(w[2, :2], [4.0, 0.5])
    assert np.all(w[~m] == 0)


def test_expert_choice():
    r = R.expert_choice(jnp.asarray(LOGITS), 2)
    p = _softmax(LOGITS)
    tok = np.asarray(r.token_index).reshape(4, 2)
    for e in range(4):
        np.testing.assert_array_equal(tok[e], np.argsort(-p[:, e], kind="stable")[:2])
    np.testing.assert_array_equal(r.expert_index, [0, 0, 1, 1, 2, 2, 3, 3])
    np.testing.assert_allclose(np.asarray(r.weight).reshape(4, 2),
                               np.take_along_axis(p.T, tok, 1), rtol=1e-6)
    assert r.k == 0
    np.testing.assert_allclose(r.expert_load(), 0.25)


def test_unknown_router_and_bad_capacity():
    with pytest.raises(ValueError, match="router='nope'"):
        R.route("nope", jnp.asarray(LOGITS), top_k=1, capacity=1)
    with pytest.raises(ValueError, match="capacity=9"):
        R.expert_choice(jnp.asarray(LOGITS), 9)
