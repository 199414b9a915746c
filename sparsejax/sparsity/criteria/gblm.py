"""GBLM-Pruner (Das et al. 2023, "Beyond Size"): |W| · (‖X_j‖₂ / sqrt(N) + scale · ‖G‖₂), the
Wanda term plus the weight times the l2 norm over the N calibration sequences of the
per-sequence gradients of the training loss (scale 100, as in the paper's code)."""
from __future__ import annotations

import gin
import jax
import jax.numpy as jnp

from sparsejax.sparsity.criteria.base import CRITERIA, CalibratedCriterion, need


@gin.configurable
@CRITERIA.register("gblm")
class GBLM(CalibratedCriterion):
    """|w| * (‖x_j‖₂/sqrt(N) + scale * ‖g‖₂ over N sequences) (GBLM-Pruner; post-training)."""

    needs_calibration_grads = True

    def __init__(self, scale: float = 100.0):
        if not float(scale) >= 0:
            raise ValueError(f"GBLM.scale={scale!r} must be >= 0")
        self.scale = float(scale)

    def scores(self, weights, *, grads=None, rng=None, state=None):
        state = need(state, "calibration statistics with gradients", "gblm")

        def score(w, c):
            if c.grad_sq is None:
                raise ValueError("criterion 'gblm' needs the calibration gradients "
                                 "(LayerCalibration.grad_sq), got None")
            act = jnp.sqrt(c.stats.sq_norms / c.num_samples)[..., :, None]
            return jnp.abs(w).astype(jnp.float32) * (act + self.scale * jnp.sqrt(c.grad_sq))

        return jax.tree.map(score, weights, state)
