"""Random: i.i.d. uniform scores (static random masks, SET's growth)."""
from __future__ import annotations

import jax

from sparsejax.sparsity.criteria.base import CRITERIA, Criterion, need


def uniform_scores(tree, rng: jax.Array):
    """Independent U(0, 1) scores shaped like every leaf of `tree`."""
    leaves = jax.tree.leaves(tree)
    keys = jax.random.split(rng, max(len(leaves), 1))
    return jax.tree.unflatten(jax.tree.structure(tree),
                              [jax.random.uniform(k, x.shape) for k, x in zip(keys, leaves)])


@CRITERIA.register("random")
class Random(Criterion):
    """U(0, 1): a uniformly random choice."""

    def scores(self, weights, *, grads=None, rng=None, state=None):
        return uniform_scores(weights, need(rng, "an rng key", "random"))
