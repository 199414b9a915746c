"""Masks computed on params sharded over 8 simulated devices equal single-device masks."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from sparsejax.sparsity import schedules as S
from sparsejax.sparsity import NMStructure, RunInfo
from sparsejax.sparsity.pruning import MaskedPruningMethod


def _params():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    return {"l0": {"kernel": jax.random.normal(k1, (16, 64)), "bias": jnp.zeros(64)},
            "l1": {"kernel": jax.random.normal(k2, (64, 8)), "bias": jnp.zeros(8)}}


def _run(method, params, grads, shard):
    rng = jax.random.PRNGKey(1)
    if shard:
        mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
        spec = {"l0": {"kernel": P(None, "x"), "bias": P("x")}, "l1": {"kernel": P("x", None), "bias": P()}}
        shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), spec)
        params = jax.device_put(params, shardings)
        grads = jax.device_put(grads, shardings)
    params, state = jax.jit(method.init)(params, rng)
    tx = method.wrap_optimizer(optax.adam(1e-3))
    opt = tx.init(params)
    p2, _, state2, _ = jax.jit(method.update)(params, opt, state, step=10, rng=rng, grads=grads)
    if shard:
        assert len(state2["masks"]["l0"]["kernel"].sharding.device_set) == 8
    return jax.device_get((state["masks"], state2["masks"], p2))


def test_sharded_masks_equal_single_device():
    params = _params()
    grads = jax.tree.map(lambda p: jnp.cos(p * 3.0), params)
    methods = [
        MaskedPruningMethod(density=0.3, distribution="erk",
                            schedule=S.DropGrowSchedule(frequency=10, end=100), grow="gradient"),
        MaskedPruningMethod(density=0.2, distribution="uniform", structure="global",
                            schedule=S.OneShotSchedule(step=10)),
        MaskedPruningMethod(structure=NMStructure(2, 4), schedule=S.OneShotSchedule(step=10)),
    ]
    for method in methods:
        method.bind(RunInfo(num_steps=100))
        single = _run(method, params, grads, shard=False)
        sharded = _run(method, params, grads, shard=True)
        jax.tree.map(np.testing.assert_array_equal, single, sharded)
        assert int(sum(m.sum() for m in jax.tree.leaves(single[1]))) > 0
