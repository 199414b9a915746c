"""Block-level drop/grow on compact weights: the fan-in stays constant, the weakest blocks go,
the best-scoring blocks not kept come in at zero with reset optimizer slots, and RigL's
grow scores are the blocks of the dense gradient."""
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse_matmul.reference import to_dense
from sparsejax.models.transformer import ModelConfig
from sparsejax.parallel.mesh import make_mesh
from sparsejax.parallel.rules import LOGICAL_RULES, batch_sharding
from sparsejax.sparsity.block_dst import BlockDSTMethod, block_norms, drop_grow, full_blocks
from sparsejax.sparsity.method import RunInfo
from sparsejax.train.build import build_run
from sparsejax.train.step import make_loss_fn, make_train_step
from sparsejax.train.trainer import TrainConfig, global_batch


def test_drop_grow_by_hand():
    # 2 output block columns, k = 2 of 4 input blocks, 1x1 blocks for readability
    idx = jnp.array([[0, 2], [1, 3]], jnp.int32)
    values = jnp.array([[0.1, 5.0], [3.0, 0.2]]).reshape(2, 2, 1, 1)
    scores = jnp.array([[9.0, 1.0, 8.0, 7.0],   # 0 and 2 are kept/dropped; best other: 3
                        [0.0, 6.0, 5.0, 4.0]])  # best not kept after the drop of 3: 2
    v, i, dropped = drop_grow(values, idx, jnp.float32(0.5), scores)
    np.testing.assert_array_equal(dropped, [[True, False], [False, True]])
    # column 0 dropped block 0 (norm 0.1): grows the best block not kept (0 is free again,
    # score 9: a dropped block may come back, at zero)
    np.testing.assert_array_equal(i, [[0, 2], [1, 2]])
    np.testing.assert_array_equal(v.reshape(2, 2), [[0.0, 5.0], [3.0, 0.0]])


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.1, 0.3, 1.0])
def test_drop_grow_keeps_a_constant_fan_in_of_distinct_blocks(fraction):
    rng = np.random.default_rng(0)
    ob, k, ib = 12, 3, 8
    idx = jnp.asarray(np.stack([rng.choice(ib, k, replace=False) for _ in range(ob)]), jnp.int32)
    values = jnp.asarray(rng.normal(size=(ob, k, 4, 4)).astype(np.float32))
    scores = jnp.asarray(rng.uniform(size=(ob, ib)))
    v, i, dropped = drop_grow(values, idx, jnp.float32(fraction), scores)
    assert int(dropped.sum()) == (max(1, round(fraction * ob * k)) if fraction else 0)
    assert all(len(set(r)) == k for r in np.asarray(i).tolist())
    norms = np.asarray(block_norms(values))
    if 0 < dropped.sum() < dropped.size:  # the dropped are the weakest of the layer
        assert norms[np.asarray(dropped)].max() <= norms[~np.asarray(dropped)].min()
    np.testing.assert_array_equal(np.asarray(v)[np.asarray(dropped)], 0.0)
    np.testing.assert_array_equal(np.asarray(v)[~np.asarray(dropped)],
                                  np.asarray(values)[~np.asarray(dropped)])


def test_schedule_and_grow_are_checked():
    with pytest.raises(ValueError, match="BlockDSTMethod.grow='norm'"):
        BlockDSTMethod(grow="norm")
    with pytest.raises(ValueError, match="not a drop/grow schedule"):
        BlockDSTMethod(schedule="constant")
    with pytest.raises(ValueError, match="weight_format='block_sparse'"):
        BlockDSTMethod().bind(RunInfo(num_steps=10)).init({}, jax.random.key(0))


MODEL = dict(num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=2, head_dim=16,
             mlp_dim=64, max_seq_len=16, weight_format="block_sparse")


def rigl_run():
    for k, v in dict(block_in=8, block_out=8, density=0.5).items():
        gin.bind_parameter(f"BlockSparse.{k}", v)
    gin.bind_parameter("make_method.name", "block_dst")
    gin.bind_parameter("BlockDSTMethod.grow", "gradient")
    cfg = TrainConfig(num_steps=40, global_batch_size=4, seq_len=8)
    return build_run(cfg, model_config=ModelConfig(**MODEL), mesh=make_mesh(num_devices=1))


def batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 259, size=(4, 9), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "loss_mask": np.ones((4, 8), np.float32), "segment_ids": np.ones((4, 8), np.int32),
            "positions": np.tile(np.arange(8, dtype=np.int32), (4, 1))}


def test_rigl_grow_scores_are_the_dense_gradient_blocks():
    """The full view's gradient equals the blocks of the dense twin's kernel gradient."""
    run = rigl_run()
    method = run.sparsity_method
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(LOGICAL_RULES):
        state = run.init_state()
        b = global_batch(batch(), batch_sharding(run.mesh))
        loss_fn = make_loss_fn(run.model, method)
        params, sparsity = method.grad_view(state.params, state.sparsity)
        g_full = jax.grad(lambda p: loss_fn(p, state.replace(sparsity=sparsity), b, jax.random.key(0))[0])(
            params)
        # the same function of dense kernels: the compact model with every block stored
        idx = state.sparsity["layout"]["layer_0"]["mlp"]["wo"]["indices"]
        values = state.params["layer_0"]["mlp"]["wo"]["values"]
        ib = 64 // 8
        assert params["layer_0"]["mlp"]["wo"]["values"].shape == (4, ib, 8, 8)
        np.testing.assert_array_equal(to_dense(params["layer_0"]["mlp"]["wo"]["values"],
                                               sparsity["layout"]["layer_0"]["mlp"]["wo"]["indices"], ib),
                                      to_dense(values, idx, ib))

        def loss_of_kernel(kernel):
            full = jnp.asarray(kernel).reshape(ib, 8, 4, 8).transpose(2, 0, 1, 3)
            p = jax.tree.map(lambda x: x, params)
            p["layer_0"]["mlp"]["wo"]["values"] = full
            return loss_fn(p, state.replace(sparsity=sparsity), b, jax.random.key(0))[0]

        g_kernel = jax.grad(loss_of_kernel)(to_dense(values, idx, ib))
    want = jnp.asarray(g_kernel).reshape(ib, 8, 4, 8).transpose(2, 0, 1, 3)
    np.testing.assert_allclose(g_full["layer_0"]["mlp"]["wo"]["values"], want, rtol=1e-5,
                               atol=1e-7)
    assert float(jnp.abs(want).max()) > 0


def test_update_moves_blocks_and_resets_their_adam_slots():
    run = rigl_run()
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(LOGICAL_RULES):
        state = run.init_state()
        step = jax.jit(make_train_step(run.model, run.tx, run.sparsity_method))
        b = global_batch(batch(), batch_sharding(run.mesh))
        state, _ = step(state, b)  # Adam moments become nonzero
        old_idx = np.asarray(state.sparsity["layout"]["layer_0"]["mlp"]["wi_up"]["indices"])
        update = run.sparsity_update_fn()  # (donates the state)
        new, metrics = update(state.replace(step=jnp.int32(2)), b)
    new_idx = np.asarray(new.sparsity["layout"]["layer_0"]["mlp"]["wi_up"]["indices"])
    moved = old_idx != new_idx
    assert 0 < float(metrics["sparsity/churn"]) <= 0.3
    assert metrics["sparsity/density"] == pytest.approx(0.5)
    assert moved.any() and all(len(set(r)) == len(r) for r in new_idx.tolist())
    mu = [s.mu for s in jax.tree.leaves(new.opt_state, is_leaf=lambda s: hasattr(s, "mu"))
          if hasattr(s, "mu")][0]
    mu_up = np.asarray(mu["layer_0"]["mlp"]["wi_up"]["values"])
    vals = np.asarray(new.params["layer_0"]["mlp"]["wi_up"]["values"])
    assert np.all(mu_up[moved] == 0) and np.all(vals[moved] == 0)
    assert np.any(mu_up[~moved] != 0)


def test_full_blocks_scatter():
    idx = jnp.array([[2, 0]], jnp.int32)
    v = jnp.ones((1, 2, 2, 2)) * jnp.array([1.0, 2.0])[None, :, None, None]
    f = full_blocks(v, idx, 3)
    np.testing.assert_array_equal(f[0, :, 0, 0], [2.0, 0.0, 1.0])
