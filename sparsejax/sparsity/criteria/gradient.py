"""Gradient magnitude: grow where the dense gradient is largest (RigL)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsejax.sparsity.criteria.base import CRITERIA, Criterion, need


@CRITERIA.register("gradient")
class Gradient(Criterion):
    """|g|: the dense gradient's magnitude (RigL's growth)."""

    needs_grads = True

    def scores(self, weights, *, grads=None, rng=None, state=None):
        return jax.tree.map(jnp.abs, need(grads, "the dense gradient", "gradient"))
