"""SNIP connection sensitivity |w * g| (Lee et al. 2019)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsejax.sparsity.criteria.base import CRITERIA, Criterion, need


@CRITERIA.register("snip")
class Snip(Criterion):
    """|w * g|: SNIP saliency on the update step's batch."""

    needs_grads = True

    def scores(self, weights, *, grads=None, rng=None, state=None):
        grads = need(grads, "the dense gradient", "snip")
        return jax.tree.map(lambda w, g: jnp.abs(w * g), weights, grads)
