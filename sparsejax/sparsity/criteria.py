"""Mask selection: exact top-k masks, pruning criteria and drop/grow (SET, RigL).

All functions are jittable; ``k`` may be traced (masks are built with one sort
and a scatter, so counts are exact and ties are broken by flat index).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from sparsejax.sparsity import masks as masks_lib
from sparsejax.sparsity import paths as paths_lib

PyTree = Any
CRITERIA = ("magnitude", "global_magnitude", "random", "snip", "movement")
GROW = ("random", "gradient")


def topk_mask(scores: jax.Array, k) -> jax.Array:
    """Bool mask of ``scores``' shape keeping exactly ``min(k, size)`` largest entries."""
    flat = scores.reshape(-1).astype(jnp.float32)
    order = jnp.argsort(-flat, stable=True)
    keep_sorted = jnp.arange(flat.size) < k
    return jnp.zeros(flat.size, bool).at[order].set(keep_sorted).reshape(scores.shape)


def density_counts(masks: PyTree, densities: Mapping[str, float], scale) -> dict[str, jax.Array]:
    """{path: kept count} at sparsity ``scale`` in [0, 1] of each layer's final sparsity."""
    out = {}
    for path, m in paths_lib.named_leaves(masks):
        d = 1.0 - jnp.asarray(scale, jnp.float32) * (1.0 - densities[path])
        out[path] = jnp.round(d * m.size).astype(jnp.int32)
    return out


def _unflatten_like(masks: PyTree, values: list) -> PyTree:
    treedef = jax.tree.structure(masks)
    return jax.tree.unflatten(treedef, values)


def layerwise_topk(scores: PyTree, masks: PyTree, counts: Mapping[str, jax.Array],
                   alive_only: bool = True) -> PyTree:
    """New masks keeping the ``counts[path]`` best scores of each layer.

    With ``alive_only`` pruned entries rank last (pruning is monotone; when a count
    exceeds the alive entries, pruned ones are revived in index order).
    """
    out = []
    for (path, m), s in zip(paths_lib.named_leaves(masks), jax.tree.leaves(scores)):
        s = s.astype(jnp.float32)
        if alive_only:
            s = jnp.where(m, s, -jnp.inf)
        out.append(topk_mask(s, counts[path]))
    return _unflatten_like(masks, out)


def global_topk(scores: PyTree, masks: PyTree, total_k, alive_only: bool = True) -> PyTree:
    """New masks keeping the ``total_k`` best scores over all masked params together."""
    flat_m = jax.tree.leaves(masks)
    flat_s = [s.astype(jnp.float32) for s in jax.tree.leaves(scores)]
    if alive_only:
        flat_s = [jnp.where(m, s, -jnp.inf) for m, s in zip(flat_m, flat_s)]
    joint = topk_mask(jnp.concatenate([s.reshape(-1) for s in flat_s]), total_k)
    out, offset = [], 0
    for m in flat_m:
        out.append(joint[offset:offset + m.size].reshape(m.shape))
        offset += m.size
    return _unflatten_like(masks, out)


masked_subtree = masks_lib.select_masked


def scores_for(criterion: str, params: PyTree, masks: PyTree, rng: jax.Array | None = None,
               grads: PyTree | None = None, movement: PyTree | None = None) -> PyTree:
    """Importance scores (higher = keep) over the masked params, in the masks' structure."""
    p = masked_subtree(params, masks)
    if criterion in ("magnitude", "global_magnitude"):
        return jax.tree.map(jnp.abs, p)
    if criterion == "random":
        if rng is None:
            raise ValueError("rng: the 'random' criterion needs an rng key, got None")
        return uniform_scores(masks, rng)
    if criterion == "snip":
        if grads is None:
            raise ValueError("grads: SNIP needs the dense gradient at the update step, got None")
        return jax.tree.map(lambda w, g: jnp.abs(w * g), p, masked_subtree(grads, masks))
    if criterion == "movement":
        if movement is None:
            raise ValueError("movement: movement pruning needs accumulated scores, got None")
        return movement
    raise ValueError(f"criterion: {criterion!r} is not one of {CRITERIA}")


def uniform_scores(masks: PyTree, rng: jax.Array) -> PyTree:
    """Independent U(0, 1) scores shaped like every mask (random pruning and SET growth)."""
    leaves = jax.tree.leaves(masks)
    keys = jax.random.split(rng, len(leaves))
    return _unflatten_like(masks, [jax.random.uniform(k, m.shape) for k, m in zip(keys, leaves)])


def drop_grow(masks: PyTree, params: PyTree, fraction, grow_scores: PyTree) -> PyTree:
    """Drops ``round(fraction * alive)`` smallest-magnitude kept weights per layer and grows
    as many with the largest ``grow_scores`` among the entries not kept after the drop.

    The number of kept entries of every layer is unchanged.
    """
    out = []
    flat_p = jax.tree.leaves(masked_subtree(params, masks))
    for m, w, g in zip(jax.tree.leaves(masks), flat_p, jax.tree.leaves(grow_scores)):
        alive = jnp.sum(m, dtype=jnp.int32)
        k = jnp.round(jnp.asarray(fraction, jnp.float32) * alive).astype(jnp.int32)
        survivors = topk_mask(jnp.where(m, jnp.abs(w).astype(jnp.float32), -jnp.inf), alive - k)
        grown = topk_mask(jnp.where(survivors, -jnp.inf, g.astype(jnp.float32)), k)
        out.append(survivors | grown)
    return _unflatten_like(masks, out)


def grow_scores_for(grow: str, masks: PyTree, rng: jax.Array | None, grads: PyTree | None) -> PyTree:
    """Random scores (SET) or dense-gradient magnitudes (RigL) over the masked params."""
    if grow == "random":
        if rng is None:
            raise ValueError("rng: random growth (SET) needs an rng key, got None")
        return uniform_scores(masks, rng)
    if grow == "gradient":
        if grads is None:
            raise ValueError("grads: gradient growth (RigL) needs dense gradients, got None")
        return jax.tree.map(jnp.abs, masked_subtree(grads, masks))
    raise ValueError(f"grow: {grow!r} is not one of {GROW}")


def update_params_for_masks(params: PyTree, old: PyTree, new: PyTree) -> PyTree:
    """Zeroes pruned weights and newly grown ones (grown weights start at zero)."""
    return jax.tree.map(
        lambda o, n, p: p if n is None else jnp.where(n & o, p, jnp.zeros_like(p)),
        old, new, params, is_leaf=masks_lib.is_none,
    )
