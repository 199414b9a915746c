"""The masked optimizer: pruned weights stay exactly zero under Adam/momentum."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax.sparsity import masks as M
from sparsejax.sparsity import optim


def test_pruned_stay_zero_under_adam_after_mid_training_prune():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    params = {"w": jax.random.normal(k1, (8, 8)), "b": jnp.zeros(8)}
    target = jax.random.normal(k2, (8, 8))
    masks = {"w": jnp.ones((8, 8), bool), "b": None}
    tx = optim.masked_optimizer(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.05, weight_decay=0.1)))
    opt_state = tx.init(params)
    loss = lambda p: jnp.sum((p["w"] - target) ** 2) + jnp.sum((p["b"] - 1.0) ** 2)

    @jax.jit
    def step(params, opt_state, masks):
        u, opt_state = tx.update(jax.grad(loss)(params), opt_state, params, sparsity={"masks": masks})
        return optax.apply_updates(params, u), opt_state

    for _ in range(5):  # build up momentum everywhere
        params, opt_state = step(params, opt_state, masks)
    new = {"w": jnp.arange(64).reshape(8, 8) % 3 == 0, "b": None}
    params = M.apply_masks(params, new)
    changed = jax.tree.map(lambda a, b: a != b, masks, new)
    opt_state = optim.reset_slots(opt_state, params, changed)
    inner_adam = opt_state[1][0]
    assert np.all(np.asarray(inner_adam.mu["w"])[~np.asarray(new["w"])] == 0)
    for _ in range(50):
        params, opt_state = step(params, opt_state, new)
    w = np.asarray(params["w"])
    assert np.all(w[~np.asarray(new["w"])] == 0.0)
    assert np.all(w[np.asarray(new["w"])] != 0.0)
    np.testing.assert_allclose(params["b"], 1.0, atol=0.1)  # unmasked params train normally


def test_without_slot_reset_masked_updates_are_still_zero():
    # Even with stale momentum, the final updates are masked.
    params = {"w": jnp.ones((4, 4))}
    tx = optim.masked_optimizer(optax.sgd(0.1, momentum=0.9))
    s = tx.init(params)
    _, s = tx.update({"w": jnp.ones((4, 4))}, s, params, sparsity={"masks": {"w": jnp.ones((4, 4), bool)}})
    params = M.apply_masks(params, {"w": jnp.eye(4, dtype=bool)})
    u, s = tx.update({"w": jnp.ones((4, 4))}, s, params, sparsity={"masks": {"w": jnp.eye(4, dtype=bool)}})
    np.testing.assert_array_equal(np.asarray(u["w"]) != 0, np.eye(4, dtype=bool))


def _adam_steps(tx, params, grads_seq, reset_at=None, changed=None):
    state, out = tx.init(params), []
    for i, g in enumerate(grads_seq):
        if i == reset_at:
            state = optim.reset_slots(state, params, changed)
        u, state = tx.update(g, state, params)
        out.append(u)
    return out, state


def _grads(n, shape=(4, 6)):
    return [{"w": jax.random.normal(k, shape)} for k in jax.random.split(jax.random.PRNGKey(3), n)]


def test_per_entry_bias_correction_is_adam_without_mask_changes():
    from sparsejax.train.optim import make_optimizer
    params, gs = {"w": jnp.ones((4, 6))}, _grads(30)
    ref, _ = _adam_steps(make_optimizer(40), params, gs)
    got, _ = _adam_steps(make_optimizer(40, bias_correction="per_entry"), params, gs)
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g["w"], r["w"], rtol=2e-6, atol=1e-9)


def test_per_entry_bias_correction_restarts_a_reset_entry_as_a_fresh_adam():
    """After reset_slots, the reset entries' updates are those of Adam started at that step on
    the same gradients; under the global count t the first one is sign(g) (1-b1)/(1-b1^t) /
    sqrt((1-b2)/(1-b2^t)): 0.41 at t=26, 0.447 once the correction reaches 1 (b2=0.95)."""
    b1, b2, n, at = 0.9, 0.95, 40, 25
    params, gs = {"w": jnp.ones((4, 6))}, _grads(n)
    changed = {"w": jnp.arange(24).reshape(4, 6) % 5 == 0}
    c = np.asarray(changed["w"])
    fresh, _ = _adam_steps(optax.scale_by_adam(b1, b2), params, gs[at:])
    per, state = _adam_steps(optim.scale_by_adam_per_entry(b1, b2), params, gs, at, changed)
    for f, p in zip(fresh, per[at:]):
        np.testing.assert_allclose(np.asarray(p["w"])[c], np.asarray(f["w"])[c], rtol=1e-5)
    counts = np.asarray(state.count["w"])
    assert (counts[c] == n - at).all() and (counts[~c] == n).all()
    glob, _ = _adam_steps(optax.scale_by_adam(b1, b2), params, gs, at, changed)
    t = at + 1
    np.testing.assert_allclose(np.asarray(glob[at]["w"])[c],
                               np.sign(np.asarray(gs[at]["w"])[c]) * (1 - b1) / (1 - b1 ** t)
                               / np.sqrt((1 - b2) / (1 - b2 ** t)), rtol=1e-5)
    np.testing.assert_allclose(np.abs(np.asarray(per[at]["w"])[c]), 1.0, rtol=1e-5)


def test_bias_correction_setting_is_checked():
    from sparsejax.train.optim import make_optimizer
    with pytest.raises(ValueError, match=r"bias_correction='entry'.*valid: \['global', 'per_entry'\]"):
        make_optimizer(10, bias_correction="entry")
    with pytest.raises(ValueError, match=r"applies to name='adamw' only.*name='sgd'"):
        make_optimizer(10, name="sgd", bias_correction="per_entry")

