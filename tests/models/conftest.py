"""A short training run through the real train step, shared by the tests that compare runs
(scanned vs unscanned layers, remat policies, micro-batches, dispatch strategies)."""
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np
import pytest

from sparsejax.models import layer_stack as ls
from sparsejax.parallel.mesh import make_mesh
from sparsejax.parallel.rules import LOGICAL_RULES, batch_sharding, replicated
from sparsejax.train.build import build_run
from sparsejax.train.step import make_train_step
from sparsejax.train.trainer import TrainConfig, global_batch


class Trained(NamedTuple):
    losses: np.ndarray  # the loss of each step
    init_params: Any  # the params the run started from (its layout), on the host
    state: Any  # the final TrainState, on the host
    run: Any


def train_losses(model_config, steps: int, params=None, microbatches: int = 1) -> Trained:
    """`steps` train steps on one device from the run's own init (or from `params`, per
    layer), with gin's current bindings; batch 4 x 16 of random tokens, the same each call."""
    mesh = make_mesh(num_devices=1)
    cfg = TrainConfig(num_steps=20, global_batch_size=4, seq_len=16, microbatches=microbatches)
    run = build_run(cfg, model_config=model_config, mesh=mesh)
    bsh = batch_sharding(mesh)
    rng = np.random.default_rng(1)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        p = None if params is None else jax.device_put(
            ls.to_layout(params, model_config),
            jax.tree.map(lambda a: a.sharding, run.abstract_model_params))
        state = run.init_state(p)
        init_params = jax.device_get(state.params)
        step = jax.jit(make_train_step(run.model, run.tx, run.sparsity_method,
                                       microbatches=microbatches),
                       in_shardings=(run.state_shardings, bsh),
                       out_shardings=(run.state_shardings, replicated(mesh)))
        update = run.sparsity_update_fn()
        losses = []
        for t in range(steps):
            tok = rng.integers(0, 259, (4, 17), dtype=np.int32)
            batch = global_batch({"inputs": tok[:, :-1], "targets": tok[:, 1:],
                                  "loss_mask": np.ones((4, 16), np.float32),
                                  "segment_ids": np.ones((4, 16), np.int32),
                                  "positions": np.tile(np.arange(16, dtype=np.int32), (4, 1))},
                                 bsh)
            if run.sparsity_method.is_update_step(t):
                state, _ = update(state, batch)
            state, m = step(state, batch)
            losses.append(float(m["loss"]))
    return Trained(np.array(losses), init_params, jax.device_get(state), run)


@pytest.fixture(name="train_losses")
def train_losses_fixture():
    return train_losses
