"""The mask-update step, jitted on its own and run only at the method's update steps (so
RigL's dense gradient costs nothing on ordinary steps)."""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax

from sparsejax.train.state import TrainState
from sparsejax.train.step import make_loss_fn, step_rng


def make_sparsity_update(model: nn.Module, method: Any) -> Callable:
    """update(state, batch) -> (state, metrics): new masks (and pruned/grown params, reset
    optimizer slots) for the method's schedule at `state.step`."""
    loss_fn = make_loss_fn(model, method)

    def update(state: TrainState, batch):
        rng = jax.random.fold_in(step_rng(state), 1)
        grads = None
        if method.needs_dense_grads:
            grads, _ = jax.grad(loss_fn, has_aux=True)(state.params, state, batch, rng)
        params, opt_state, sparsity, metrics = method.update(
            state.params, state.opt_state, state.sparsity, step=state.step, rng=rng, grads=grads)
        return state.replace(params=params, opt_state=opt_state, sparsity=sparsity), metrics

    return update
