"""Data-parallel, fsdp and tensor-parallel meshes give the same losses as one device."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from sparsejax.models.transformer import ModelConfig
from sparsejax.parallel.mesh import make_mesh
from sparsejax.parallel.rules import LOGICAL_RULES, batch_sharding, replicated
from sparsejax.train.build import build_run
from sparsejax.train.step import make_train_step
from sparsejax.train.trainer import TrainConfig, global_batch

MODEL = ModelConfig(num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8,
                    mlp_dim=64, max_seq_len=32)
CFG = TrainConfig(num_steps=20, global_batch_size=8, seq_len=16, dataset="stdlib")
STEPS = 4
# Float32 reductions are reordered across shards; differences stay at rounding level.
RTOL = 2e-5


def synthetic_batches(n):
    """The same random batch n times, so that the loss must fall as the model fits it."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 259, size=(CFG.global_batch_size, CFG.seq_len + 1), dtype=np.int32)
    for _ in range(n):
        yield {
            "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "loss_mask": np.ones((CFG.global_batch_size, CFG.seq_len), np.float32),
            "segment_ids": np.ones((CFG.global_batch_size, CFG.seq_len), np.int32),
            "positions": np.tile(np.arange(CFG.seq_len, dtype=np.int32), (CFG.global_batch_size, 1)),
        }


def run_losses(mesh):
    run = build_run(CFG, model_config=MODEL, mesh=mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        state = run.init_state()
        step = jax.jit(make_train_step(run.model, run.tx, run.sparsity_method),
                       in_shardings=(run.state_shardings, batch_sharding(mesh)),
                       out_shardings=(run.state_shardings, replicated(mesh)))
        losses = []
        for batch in synthetic_batches(STEPS):
            state, metrics = step(state, global_batch(batch, batch_sharding(mesh)))
            losses.append(float(metrics["loss"]))
        leaf = jax.tree.leaves(state.params)[0]
    return np.array(losses), leaf.sharding


@pytest.fixture(scope="module")
def single_device_losses():
    losses, _ = run_losses(make_mesh(devices=jax.devices()[:1]))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    return losses


@pytest.mark.parametrize("shape", [
    dict(data=8), dict(data=1, fsdp=8), dict(data=2, fsdp=2, tensor=2), dict(data=4, tensor=2),
], ids=["data8", "fsdp8", "d2f2t2", "d4t2"])
def test_mesh_matches_single_device(shape, single_device_losses):
    losses, sharding = run_losses(make_mesh(**shape))
    assert len(sharding.mesh.devices.flatten()) == 8
    np.testing.assert_allclose(losses, single_device_losses, rtol=RTOL)
