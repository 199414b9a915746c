"""Calibration gradients for gradient-informed scores (GBLM-Pruner): the sum over calibration
sequences of the squared per-sequence gradient of the training loss, per prunable kernel."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.sparsity import masks as masks_lib

PyTree = Any
LossFn = Callable[[PyTree, dict], jax.Array]  # (params, batch of rows) -> scalar loss


def grad_sq_sums(loss_fn: LossFn, params: PyTree, rows: dict[str, np.ndarray],
                 masks: PyTree) -> PyTree:
    """Σ_n (∂ loss(sequence n) / ∂W)² for the masked params (None elsewhere); `rows` holds
    the calibration batch ([N, seq] arrays: inputs, targets, loss_mask, positions,
    segment_ids), one sequence per gradient as in the paper."""

    @jax.jit
    def step(params, masks, acc, row):
        g = jax.grad(loss_fn)(params, jax.tree.map(lambda a: a[None], row))
        g = masks_lib.select_masked(g, masks)
        return jax.tree.map(lambda a, x: a + jnp.square(x.astype(jnp.float32)), acc, g)

    acc = jax.tree.map(lambda m: jnp.zeros(m.shape, jnp.float32), masks)
    for i in range(len(rows["inputs"])):
        acc = step(params, masks, acc, {k: jnp.asarray(v[i]) for k, v in rows.items()})
    return acc
