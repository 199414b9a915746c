"""Movement pruning (Sanh et al. 2020): keep weights moving away from zero, S = -sum_t w * g."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsejax.sparsity.criteria.base import CRITERIA, Criterion


@CRITERIA.register("movement")
class Movement(Criterion):
    """-sum over steps of w * g: weights the optimizer pushes away from zero."""

    def init_state(self, masks):
        return jax.tree.map(lambda m: jnp.zeros(m.shape, jnp.float32), masks)

    def accumulate(self, state, weights, grads):
        return jax.tree.map(lambda s, w, g: s - (w * g).astype(jnp.float32), state, weights,
                            grads)

    def scores(self, weights, *, grads=None, rng=None, state=None):
        if state is None:
            raise ValueError("criterion 'movement' needs its accumulated scores, got None")
        return state
