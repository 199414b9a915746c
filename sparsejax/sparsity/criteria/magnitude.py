"""Magnitude: keep the largest |w| (Han et al.; gradual pruning, the drop step of SET/RigL)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsejax.sparsity.criteria.base import CRITERIA, Criterion


@CRITERIA.register("magnitude")
class Magnitude(Criterion):
    """|w|: keep the largest weights."""

    def scores(self, weights, *, grads=None, rng=None, state=None):
        return jax.tree.map(jnp.abs, weights)
