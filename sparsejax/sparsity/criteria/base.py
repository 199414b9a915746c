"""The criterion protocol and its registry.

A criterion scores the entries of the prunable params; higher means "keep" when it drops
or prunes and "grow first" when it grows. Methods look criteria up by name
(`MaskedPruningMethod.criterion = 'magnitude'`, `.grow = 'gradient'`), so a new one is one
file that subclasses `Criterion` and registers it::

    @CRITERIA.register("my_score")
    class MyScore(Criterion):
        '''One line for `sparsejax list`.'''
        def scores(self, weights, *, grads=None, rng=None, state=None):
            return jax.tree.map(jnp.abs, weights)

Every tree argument and result has the masks' structure: arrays at the prunable params,
``None`` elsewhere.
"""
from __future__ import annotations

from typing import Any

import jax

from sparsejax.registry import Registry

PyTree = Any


class Criterion:
    """Base: importance scores over the prunable params."""

    needs_grads: bool = False  # scores need the dense gradient of the update step's batch

    def init_state(self, masks: PyTree) -> PyTree | None:
        """State the criterion accumulates over training (e.g. movement), or None."""
        return None

    def accumulate(self, state: PyTree, weights: PyTree, grads: PyTree) -> PyTree:
        """Called on every train step with that step's gradient (when `init_state` is not None)."""
        return state

    def scores(self, weights: PyTree, *, grads: PyTree | None = None,
               rng: jax.Array | None = None, state: PyTree | None = None) -> PyTree:
        raise NotImplementedError


class CalibratedCriterion(Criterion):
    """Base of scores computed from calibration activations (Wanda, GBLM-Pruner). They score
    a trained model's weights in `sparsejax prune` (sparsity/posttrain/), where ``state`` is
    a tree of per-layer calibration statistics (`posttrain.stats.LayerCalibration`: input
    statistics, and squared gradient sums for criteria that need them)."""

    needs_calibration = True
    needs_calibration_grads = False

    def init_state(self, masks: PyTree) -> PyTree | None:
        name = CRITERIA.name_of(type(self)) or type(self).__name__
        raise ValueError(f"criterion {name!r} scores weights with calibration activations of "
                         f"a trained model; use it with `sparsejax prune --method {name}` "
                         f"(post-training), not as a criterion of a training run")


CRITERIA: Registry[type[Criterion]] = Registry("criterion")


def need(value: Any, what: str, name: str) -> Any:
    """`value`, or a ValueError saying that criterion `name` needs `what`."""
    if value is None:
        raise ValueError(f"criterion {name!r} needs {what} at the update step, got None")
    return value
