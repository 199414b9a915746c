"""Mask pytrees: creation, application and statistics.

A mask pytree mirrors the params: a bool array shaped like the param where it is
prunable (True = kept) and ``None`` where it is never pruned. Bool arrays shaped
like the params can use the params' shardings and are checkpointed with them.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from sparsejax.sparsity import paths as paths_lib

PyTree = Any


def is_none(x: Any) -> bool:
    return x is None


def map_masked(fn: Callable[..., Any], masks: PyTree, tree: PyTree, *rest: PyTree) -> PyTree:
    """``fn(leaf, mask, *rest_leaves)`` where the mask is not None; ``leaf`` elsewhere."""
    return jax.tree.map(
        lambda m, x, *r: x if m is None else fn(x, m, *r), masks, tree, *rest, is_leaf=is_none
    )


def map_on_masks(fn: Callable[..., Any], masks: PyTree, tree: PyTree, *rest: PyTree) -> PyTree:
    """``fn(leaf, mask, *rest_leaves)`` where the mask is not None; ``None`` elsewhere
    (for functions that produce masks or other mask-structured trees)."""
    return jax.tree.map(
        lambda m, x, *r: None if m is None else fn(x, m, *r), masks, tree, *rest, is_leaf=is_none
    )


def select_masked(tree: PyTree, masks: PyTree) -> PyTree:
    """Leaves of ``tree`` at the masked params, ``None`` elsewhere (the masks' structure)."""
    return jax.tree.map(lambda m, x: None if m is None else x, masks, tree, is_leaf=is_none)


def ones_masks(params: PyTree, prunable: PyTree) -> PyTree:
    """All-True masks for prunable params, ``None`` for the others."""
    return jax.tree.map(lambda p, ok: jnp.ones(p.shape, bool) if ok else None, params, prunable)


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
    """Zeroes pruned entries (same dtype)."""
    return map_masked(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), masks, params)


def ste_masks(params: PyTree, masks: PyTree) -> PyTree:
    """Masked value with a straight-through (dense) gradient: ``d out / d params = 1``.

    Pruned weights are already zero in the params, so the value equals ``params``
    and the gradient w.r.t. pruned entries is the dense gradient that RigL/SNIP use.
    """

    def f(p, m):
        return p + jax.lax.stop_gradient(jnp.where(m, p, jnp.zeros_like(p)) - p)

    return map_masked(f, masks, params)


def mask_leaves(masks: PyTree) -> list[tuple[str, jax.Array]]:
    return paths_lib.named_leaves(masks)


def nnz(masks: PyTree) -> jax.Array:
    """Number of kept entries over all masked params (int32)."""
    return sum((jnp.sum(m, dtype=jnp.int32) for m in jax.tree.leaves(masks)), jnp.int32(0))


def num_masked(masks: PyTree) -> int:
    """Number of entries over all masked params (host int)."""
    return int(sum(m.size for m in jax.tree.leaves(masks)))


def layer_densities(masks: PyTree) -> dict[str, jax.Array]:
    """{param path: fraction of kept entries} for every masked param."""
    return {p: jnp.mean(m.astype(jnp.float32)) for p, m in mask_leaves(masks)}


def overall_density(masks: PyTree) -> jax.Array:
    """Kept fraction over all masked params (unmasked params not counted)."""
    total = num_masked(masks)
    return nnz(masks).astype(jnp.float32) / max(total, 1)


def mask_churn(old: PyTree, new: PyTree) -> jax.Array:
    """Fraction of masked entries whose kept/pruned state changed."""
    flips = sum(
        (jnp.sum(a != b, dtype=jnp.int32) for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new))),
        jnp.int32(0),
    )
    return flips.astype(jnp.float32) / max(num_masked(new), 1)


def param_count(params: PyTree, masks: PyTree) -> jax.Array:
    """Nonzero-capable param count: unmasked params in full plus kept masked entries."""
    flat_m = jax.tree.leaves(masks)
    masked_size = sum(m.size for m in flat_m)
    total = sum(p.size for p in jax.tree.leaves(params))
    return nnz(masks).astype(jnp.float32) + float(total - masked_size)


def average_param_count(params: PyTree, masks: PyTree, avg_density: jax.Array) -> jax.Array:
    """Average param count over a run from the running average density of masked params."""
    masked_size = num_masked(masks)
    total = sum(p.size for p in jax.tree.leaves(params))
    return avg_density * masked_size + float(total - masked_size)


# Embedding lookups cost no matmul FLOPs.
DEFAULT_FLOP_MULTIPLIERS: Mapping[str, float] = {r"embed": 0.0}


def flops_per_token(
    params: PyTree,
    masks: PyTree | None = None,
    multipliers: Mapping[str, float] | None = None,
) -> jax.Array:
    """Forward matmul FLOPs per token of the masked model: sum of ``2 * nnz * multiplier``.

    Every param of rank >= 2 counts as a kernel used once per token (multiplier 1)
    unless a regex in ``multipliers`` matches its path (first match wins), e.g.
    ``{"experts": top_k / num_experts}`` for stacked experts, or 0 for embeddings
    (the default). Unmasked kernels count all their entries.
    """
    table = dict(DEFAULT_FLOP_MULTIPLIERS if multipliers is None else multipliers)
    if masks is None:
        masks = jax.tree.map(lambda p: None, params)
    named_p = paths_lib.named_leaves(params)
    flat_m = jax.tree.leaves(masks, is_leaf=is_none)
    if len(flat_m) != len(named_p):
        raise ValueError(f"masks: structure does not mirror params ({len(flat_m)} vs {len(named_p)} leaves)")
    total = jnp.float32(0.0)
    for (path, p), m in zip(named_p, flat_m):
        if p.ndim < 2:
            continue
        mult = float(paths_lib.regex_lookup(table, path, 1.0))
        count = jnp.float32(p.size) if m is None else jnp.sum(m, dtype=jnp.int32).astype(jnp.float32)
        total = total + 2.0 * mult * count
    return total
