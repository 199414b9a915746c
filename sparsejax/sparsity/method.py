"""The method protocol the trainer drives, and the dense (no-op) method.

See the package docstring (``sparsejax/sparsity/__init__.py``) for the exact call
sequence. Every method keeps its state in a dict pytree (the trainer's
``sparsity`` field) with at least ``masks`` (or None), ``avg_density`` and
``num_steps``.
"""
from __future__ import annotations

from typing import Any

import gin
import jax
import jax.numpy as jnp
import optax

from sparsejax.sparsity import masks as masks_lib

PyTree = Any
Metrics = dict[str, jax.Array]


class SparsityMethod:
    """Base protocol. Subclasses override what they need; all jittable except
    ``init``, ``wrap_optimizer`` and ``is_update_step`` (host side)."""

    needs_dense_grads: bool = False

    def init(self, params: PyTree, rng: jax.Array) -> tuple[PyTree, PyTree]:
        """Returns ``(params, sparsity_state)``; params may be pruned or extended."""
        return params, new_stats_state(None)

    def wrap_optimizer(self, tx: optax.GradientTransformation, sparsity: PyTree) -> optax.GradientTransformation:
        """Optimizer to use; ``sparsity`` is the state returned by :meth:`init`."""
        return tx

    def forward_params(self, params: PyTree, sparsity: PyTree, *, step=0, rng: jax.Array | None = None) -> PyTree:
        """Params for the model's ``apply`` inside the loss (``rng=None``: deterministic/eval)."""
        return params

    def regularizer(self, params: PyTree, sparsity: PyTree, *, step=0) -> jax.Array:
        """Extra loss term (added to the loss by the trainer)."""
        return jnp.zeros((), jnp.float32)

    def on_grads(self, params: PyTree, sparsity: PyTree, grads: PyTree, *, step=0) -> tuple[PyTree, PyTree]:
        """Per-step hook between the gradient and the optimizer: ``(grads, sparsity)``."""
        return grads, track_density(sparsity)

    def is_update_step(self, step: int) -> bool:
        """Host-side: does a mask update run before the train step of ``step``?"""
        return False

    def update(self, params: PyTree, opt_state: PyTree, sparsity: PyTree, *, step, rng: jax.Array | None = None,
               grads: PyTree | None = None) -> tuple[PyTree, PyTree, PyTree, Metrics]:
        """Mask update: ``(params, opt_state, sparsity, metrics)``."""
        return params, opt_state, sparsity, density_metrics(sparsity.get("masks"))

    def metrics(self, params: PyTree, sparsity: PyTree) -> Metrics:
        """Cheap per-step metrics: overall density, running average density and param count."""
        out = density_metrics(sparsity.get("masks"), per_layer=False)
        out["sparsity/avg_density"] = sparsity["avg_density"]
        model_params = self.finalize_structure(params)
        m = sparsity.get("masks")
        if m is not None:
            out["sparsity/param_count"] = masks_lib.param_count(model_params, m)
            out["sparsity/avg_param_count"] = masks_lib.average_param_count(
                model_params, m, sparsity["avg_density"])
        return out

    def finalize_structure(self, params: PyTree) -> PyTree:
        """Model-structured params (drops any extra keys the method added)."""
        return params

    def finalize(self, params: PyTree, sparsity: PyTree) -> PyTree:
        """Model params with the final (hard) masks applied, for export/eval."""
        m = sparsity.get("masks")
        return params if m is None else masks_lib.apply_masks(params, m)


def new_stats_state(masks: PyTree | None, **extra: Any) -> dict[str, Any]:
    """State dict with masks and the running-average statistics."""
    return {"masks": masks, "density": current_density(masks),
            "avg_density": jnp.zeros((), jnp.float32), "num_steps": jnp.zeros((), jnp.int32),
            **extra}


def with_masks(sparsity: PyTree, masks: PyTree) -> PyTree:
    """New masks plus their overall density, computed once here rather than every step."""
    return {**sparsity, "masks": masks, "density": current_density(masks)}


def current_density(masks: PyTree | None) -> jax.Array:
    if masks is None or not jax.tree.leaves(masks):
        return jnp.ones((), jnp.float32)
    return masks_lib.overall_density(masks)


def track_density(sparsity: PyTree, masks: PyTree | None = None) -> PyTree:
    """Adds the current overall density to the running average over train steps."""
    if masks is None and "density" in sparsity:
        d = sparsity["density"]
    else:
        d = current_density(sparsity.get("masks") if masks is None else masks)
    n = sparsity["num_steps"]
    avg = sparsity["avg_density"] + (d - sparsity["avg_density"]) / (n + 1).astype(jnp.float32)
    return {**sparsity, "avg_density": avg, "num_steps": n + 1}


def density_metrics(masks: PyTree | None, per_layer: bool = True) -> Metrics:
    out = {"sparsity/density": current_density(masks)}
    if per_layer and masks is not None:
        for path, d in masks_lib.layer_densities(masks).items():
            out[f"sparsity/density/{path}"] = d
    return out


@gin.configurable
class DenseMethod(SparsityMethod):
    """Dense training through the same protocol (baseline)."""
