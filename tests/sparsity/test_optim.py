"""The masked optimizer: pruned weights stay exactly zero under Adam/momentum."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

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
