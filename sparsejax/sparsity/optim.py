"""Optax integration: a wrapper under which masked-out weights never change.

``masked_optimizer(tx, masks)`` zeroes the masked gradient entries before the
inner update (so moments of pruned weights stay zero) and zeroes the masked
entries of the final updates, so pruned weights (already zero) stay *exactly*
zero under any inner optimizer, and frozen weights (sparse fine-tuning) keep
their value. The masks live in the optimizer state (``MaskedState.masks``) and
are replaced at mask updates with :func:`set_masks`.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparsejax.sparsity import masks as masks_lib

PyTree = Any


class MaskedState(NamedTuple):
    inner: optax.OptState
    masks: PyTree  # bool arrays like the params, None where never masked


def masked_optimizer(tx: optax.GradientTransformation, masks: PyTree) -> optax.GradientTransformationExtraArgs:
    """Wraps ``tx`` so that entries where ``masks`` is False get zero gradient and zero update.

    ``masks`` (the initial masks) mirrors the params with ``None`` for unmasked params.
    """
    inner = optax.with_extra_args_support(tx)

    def init_fn(params):
        return MaskedState(inner.init(params), masks)

    def update_fn(updates, state, params=None, **extra_args):
        g = masks_lib.apply_masks(updates, state.masks)
        u, new_inner = inner.update(g, state.inner, params, **extra_args)
        u = masks_lib.apply_masks(u, state.masks)
        return u, MaskedState(new_inner, state.masks)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _is_masked_state(x: Any) -> bool:
    return isinstance(x, MaskedState)


def set_masks(opt_state: PyTree, masks: PyTree) -> PyTree:
    """Replaces the masks of every ``MaskedState`` inside ``opt_state``."""
    return jax.tree.map(
        lambda s: s._replace(masks=masks) if _is_masked_state(s) else s,
        opt_state, is_leaf=_is_masked_state,
    )


def get_masks(opt_state: PyTree) -> PyTree | None:
    """Masks of the first ``MaskedState`` in ``opt_state`` (None if there is none)."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=_is_masked_state) if _is_masked_state(s)]
    return found[0].masks if found else None


def reset_slots(opt_state: PyTree, params: PyTree, changed: PyTree) -> PyTree:
    """Zeroes, in every params-shaped subtree of ``opt_state`` (e.g. Adam's mu and nu),
    the entries where ``changed`` (bool tree mirroring the masks) is True."""
    pdef = jax.tree.structure(params)
    pshapes = [jnp.shape(p) for p in jax.tree.leaves(params)]

    def params_like(x: Any) -> bool:
        if _is_masked_state(x) or x is None:
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

    def rec(tree: Any) -> Any:
        def node(x: Any) -> Any:
            if _is_masked_state(x):
                return x._replace(inner=rec(x.inner))
            return fix(x)

        return jax.tree.map(node, tree, is_leaf=lambda x: _is_masked_state(x) or params_like(x))

    return rec(opt_state)
