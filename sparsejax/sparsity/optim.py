"""Optax integration: a wrapper under which masked-out weights never change.

``masked_optimizer(tx)`` zeroes the masked gradient entries before the inner update (so
moments of pruned weights stay zero) and zeroes the masked entries of the final updates, so
pruned weights (already zero) stay *exactly* zero under any inner optimizer, and frozen
weights (sparse fine-tuning) keep their value. It reads the masks from the method state
passed as an extra argument, ``tx.update(grads, opt_state, params, sparsity=state)``: the
masks live only in the TrainState's ``sparsity`` field, never in the optimizer state.

``reset_slots`` zeroes the optimizer slots of entries whose mask changed (pruned or grown);
``take_slots`` keeps the slots of the entries a compact layout keeps.
``scale_by_adam_per_entry`` is Adam with one step count per entry, which ``reset_slots``
zeroes with the moments, so a grown weight's bias correction restarts as at step 1.
"""
from __future__ import annotations

from typing import Any, NamedTuple

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


def map_slots(opt_state: PyTree, params: PyTree, fn) -> PyTree:
    """``opt_state`` with ``fn(subtree)`` in place of every subtree shaped like ``params``
    (e.g. Adam's mu and nu, a per-entry count)."""
    pdef = jax.tree.structure(params)
    pshapes = [jnp.shape(p) for p in jax.tree.leaves(params)]

    def params_like(x: Any) -> bool:
        if x is None:
            return False
        leaves, tdef = jax.tree.flatten(x)
        return tdef == pdef and [jnp.shape(v) for v in leaves] == pshapes

    return jax.tree.map(lambda x: fn(x) if params_like(x) else x, opt_state,
                        is_leaf=params_like)


def reset_slots(opt_state: PyTree, params: PyTree, changed: PyTree) -> PyTree:
    """Zeroes, in every params-shaped subtree of ``opt_state`` (e.g. Adam's mu and nu),
    the entries where ``changed`` (bool tree mirroring the masks) is True."""
    return map_slots(opt_state, params, lambda x: jax.tree.map(
        lambda c, s: s if c is None else jnp.where(c, jnp.zeros_like(s), s),
        changed, x, is_leaf=masks_lib.is_none))


def take_slots(opt_state: PyTree, params: PyTree, index: PyTree, take) -> PyTree:
    """In every params-shaped subtree of ``opt_state``, ``take(slot, i)`` for each entry
    whose ``index`` (a tree mirroring params, None where unchanged) is not None: the optimizer
    state of a layout that keeps some of its entries (compact GMP)."""
    return map_slots(opt_state, params, lambda x: jax.tree.map(
        lambda i, s: s if i is None else take(s, i), index, x, is_leaf=masks_lib.is_none))


class PerEntryAdamState(NamedTuple):
    """Adam's moments with a params-shaped int32 step count in place of the scalar one."""
    count: PyTree
    mu: PyTree
    nu: PyTree


def scale_by_adam_per_entry(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
                            ) -> optax.GradientTransformation:
    """``optax.scale_by_adam`` whose bias correction uses each entry's own step count.

    Without mask changes it is Adam. When ``reset_slots`` zeroes an entry (a weight pruned or
    grown by dynamic sparse training), its count restarts with its moments, so the entry's
    next updates are those of Adam's first steps (``m/(1-b1^k)``, ``v/(1-b2^k)`` with k the
    steps since the reset) instead of raw moments under a global count whose correction has
    long reached 1. Costs one int32 per parameter of optimizer state."""

    def init_fn(params):
        return PerEntryAdamState(
            count=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.int32), params),
            mu=optax.tree.zeros_like(params), nu=optax.tree.zeros_like(params))

    def update_fn(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count = jax.tree.map(optax.safe_increment, state.count)
        out = jax.tree.map(
            lambda m, v, c: optax.tree.bias_correction(m, b1, c)
            / (jnp.sqrt(optax.tree.bias_correction(v, b2, c)) + eps), mu, nu, count)
        return out, PerEntryAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)
