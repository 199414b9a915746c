"""Mask selection: exact top-k masks per layer or over all layers, and drop/grow.

All functions are jittable; ``k`` may be traced (masks are built with one sort and a
scatter, so counts are exact and ties are broken by flat index). Scores are trees in the
masks' structure (``None`` where a param is never pruned); higher means keep.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from sparsejax.sparsity import masks as masks_lib
from sparsejax.sparsity import paths as paths_lib

PyTree = Any
# Ranks below every real score: entries outside a param's valid region (padding) rank last
# of all, pruned entries (when only live ones may be kept) just above them.
_INVALID = -jnp.inf
_DEAD = jnp.finfo(jnp.float32).min


def topk_mask(scores: jax.Array, k) -> jax.Array:
    """Bool mask of ``scores``' shape keeping exactly ``min(k, size)`` largest entries."""
    flat = scores.reshape(-1).astype(jnp.float32)
    order = jnp.argsort(-flat, stable=True)
    keep_sorted = jnp.arange(flat.size) < k
    return jnp.zeros(flat.size, bool).at[order].set(keep_sorted).reshape(scores.shape)


def density_counts(masks: PyTree, densities: Mapping[str, float], scale,
                   sizes: Mapping[str, int] | None = None) -> dict[str, jax.Array]:
    """{path: kept count} at sparsity ``scale`` in [0, 1] of each layer's final sparsity.
    ``sizes`` are the prunable entries of each layer (default: the mask's size)."""
    out = {}
    for path, m in paths_lib.named_leaves(masks):
        d = 1.0 - jnp.asarray(scale, jnp.float32) * (1.0 - densities[path])
        size = m.size if sizes is None else sizes[path]
        out[path] = jnp.round(d * size).astype(jnp.int32)
    return out


def unflatten_like(masks: PyTree, values: list) -> PyTree:
    return jax.tree.unflatten(jax.tree.structure(masks), values)


def ranked(scores: jax.Array, mask: jax.Array, alive_only: bool,
           valid: jax.Array | None = None) -> jax.Array:
    """Float32 scores where pruned entries (``alive_only``) and invalid entries rank last."""
    s = scores.astype(jnp.float32)
    if alive_only:
        s = jnp.where(mask, s, _DEAD)
    if valid is not None:
        s = jnp.where(valid, s, _INVALID)
    return s


def layerwise_topk(scores: PyTree, masks: PyTree, counts: Mapping[str, jax.Array],
                   alive_only: bool = True, valid: PyTree | None = None) -> PyTree:
    """New masks keeping the ``counts[path]`` best scores of each layer.

    With ``alive_only`` pruned entries rank last (pruning is monotone; when a count
    exceeds the alive entries, pruned ones are revived in index order).
    """
    valid_leaves = _valid_leaves(masks, valid)
    out = []
    for (path, m), s, v in zip(paths_lib.named_leaves(masks), jax.tree.leaves(scores),
                               valid_leaves):
        out.append(topk_mask(ranked(s, m, alive_only, v), counts[path]))
    return unflatten_like(masks, out)


def global_topk(scores: PyTree, masks: PyTree, total_k, alive_only: bool = True,
                valid: PyTree | None = None) -> PyTree:
    """New masks keeping the ``total_k`` best scores over all masked params together."""
    flat_m = jax.tree.leaves(masks)
    flat_s = [ranked(s, m, alive_only, v) for s, m, v in
              zip(jax.tree.leaves(scores), flat_m, _valid_leaves(masks, valid))]
    joint = topk_mask(jnp.concatenate([s.reshape(-1) for s in flat_s]), total_k)
    out, offset = [], 0
    for m in flat_m:
        out.append(joint[offset:offset + m.size].reshape(m.shape))
        offset += m.size
    return unflatten_like(masks, out)


def _valid_leaves(masks: PyTree, valid: PyTree | None) -> list:
    n = len(jax.tree.leaves(masks))
    return [None] * n if valid is None else jax.tree.leaves(valid)


def drop_grow(masks: PyTree, drop_scores: PyTree, fraction, grow_scores: PyTree,
              valid: PyTree | None = None) -> PyTree:
    """Drops ``round(fraction * alive)`` kept entries with the lowest ``drop_scores`` per layer
    and grows as many with the highest ``grow_scores`` among the entries not kept after the
    drop. The number of kept entries of every layer is unchanged."""
    out = []
    for m, d, g, v in zip(jax.tree.leaves(masks), jax.tree.leaves(drop_scores),
                          jax.tree.leaves(grow_scores), _valid_leaves(masks, valid)):
        alive = jnp.sum(m, dtype=jnp.int32)
        k = jnp.round(jnp.asarray(fraction, jnp.float32) * alive).astype(jnp.int32)
        survivors = topk_mask(jnp.where(m, d.astype(jnp.float32), _INVALID), alive - k)
        grow = jnp.where(survivors, _INVALID, g.astype(jnp.float32))
        if v is not None:
            grow = jnp.where(v, grow, _INVALID)
        out.append(survivors | topk_mask(grow, k))
    return unflatten_like(masks, out)


def update_params_for_masks(params: PyTree, old: PyTree, new: PyTree) -> PyTree:
    """Zeroes pruned weights and newly grown ones (grown weights start at zero)."""
    return jax.tree.map(
        lambda o, n, p: p if n is None else jnp.where(n & o, p, jnp.zeros_like(p)),
        old, new, params, is_leaf=masks_lib.is_none,
    )
