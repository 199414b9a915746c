"""Optax integration: a wrapper under which masked-out weights never change.

``masked_optimizer(tx)`` zeroes the masked gradient entries before the inner update (so
moments of pruned weights stay zero) and zeroes the masked entries of the final updates, so
pruned weights (already zero) stay *exactly* zero under any inner optimizer, and frozen
weights (sparse fine-tuning) keep their value. It reads the masks from the method state
passed as an extra argument, ``tx.update(grads, opt_state, params, sparsity=state)``: the
masks live only in the TrainState's ``sparsity`` field, never in the optimizer state.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from sparsejax.sparsity import masks as masks_lib

PyTree = Any


def masked_optimizer(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Wraps ``tx`` so that entries where ``sparsity["masks"]`` is False get zero gradient and
    zero update (``sparsity`` is an extra argument of ``update``)."""
    inner = optax.with_extra_args_support(tx)

    def update_fn(updates, state, params=None, *, sparsity=None, **extra_args):
        if sparsity is None:
            raise ValueError("sparsity: a masked optimizer's update needs the method state "
                             "(tx.update(grads, opt_state, params, sparsity=state))")
        masks = sparsity["masks"]
        u, new_state = inner.update(masks_lib.apply_masks(updates, masks), state, params,
                                    **extra_args)
        return masks_lib.apply_masks(u, masks), new_state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def reset_slots(opt_state: PyTree, params: PyTree, changed: PyTree) -> PyTree:
    """Zeroes, in every params-shaped subtree of ``opt_state`` (e.g. Adam's mu and nu),
    the entries where ``changed`` (bool tree mirroring the masks) is True."""
    pdef = jax.tree.structure(params)
    pshapes = [jnp.shape(p) for p in jax.tree.leaves(params)]

    def params_like(x: Any) -> bool:
        if x is None:
            return False
        leaves, tdef = jax.tree.flatten(x)
        return tdef == pdef and [jnp.shape(v) for v in leaves] == pshapes

    def fix(x: Any) -> Any:
        if not params_like(x):
            return x
        return jax.tree.map(
            lambda c, s: s if c is None else jnp.where(c, jnp.zeros_like(s), s),
            changed, x, is_leaf=masks_lib.is_none,
        )

    return jax.tree.map(fix, opt_state, is_leaf=params_like)
