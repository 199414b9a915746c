"""The sparsity state (with None masks) and the optimizer state round-trip through orbax."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import sparsejax.sparsity as sp


def test_orbax_roundtrip_of_sparsity_and_masked_opt_state(tmp_path):
    params = {"D": {"bias": jnp.ones(8), "kernel": jax.random.normal(jax.random.PRNGKey(0), (8, 8))}}
    method = sp.MaskedPruningMethod(density=0.5, distribution="uniform", schedule="drop_grow")
    method.bind(sp.RunInfo(num_steps=100))
    params, sparsity = method.init(params, jax.random.PRNGKey(1))
    opt_state = method.wrap_optimizer(optax.adam(1e-3)).init(params)
    state = {"params": params, "opt_state": opt_state, "sparsity": sparsity}
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", state)
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(tmp_path / "ckpt", jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert restored["sparsity"]["masks"]["D"]["bias"] is None
    jax.tree.map(np.testing.assert_array_equal, restored, state)
    # The masks live in the sparsity state only: the optimizer state is the plain Adam state.
    assert jax.tree.structure(opt_state) == jax.tree.structure(optax.adam(1e-3).init(params))
