"""Wanda (Sun et al. 2023): |W_ij| · ‖X_j‖₂, the weight times the norm of its input feature
over the calibration tokens; compared within each output unit (structure 'per_output')."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsejax.sparsity.criteria.base import CRITERIA, CalibratedCriterion, need


def input_norms(calibration) -> jax.Array:
    """‖X_j‖₂ per input feature j: [..., in] (a leading expert axis for experts)."""
    return jnp.sqrt(calibration.stats.sq_norms)


@CRITERIA.register("wanda")
class Wanda(CalibratedCriterion):
    """|w| * ‖x_j‖₂ over calibration activations (Wanda; post-training only)."""

    def scores(self, weights, *, grads=None, rng=None, state=None):
        state = need(state, "calibration statistics", "wanda")
        return jax.tree.map(lambda w, c: jnp.abs(w).astype(jnp.float32)
                            * input_norms(c)[..., :, None], weights, state)
