"""Mask pytrees: creation, application and statistics.

A mask pytree mirrors the params: a bool array shaped like the param where it is
prunable (True = kept) and ``None`` where it is never pruned. Bool arrays shaped
like the params can use the params' shardings and are checkpointed with them.

Statistics take an optional ``valid`` table ``{param path: (axis, length)}`` for params
padded past ``length`` along ``axis`` (the LM head's vocab padding): padded entries are
never kept and are left out of every count and density.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.sparsity import paths as paths_lib

PyTree = Any
Valid = Mapping[str, tuple[int, int]]  # {param path: (axis, real length)}


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


def ones_masks(params: PyTree, prunable: PyTree, valid: Valid | None = None) -> PyTree:
    """Masks keeping every real entry of the prunable params (padding is False), ``None`` for
    the others."""
    masks = jax.tree.map(lambda p, ok: jnp.ones(p.shape, bool) if ok else None, params, prunable)
    v = valid_tree(masks, valid)
    return masks if v is None else jax.tree.map(lambda m, ok: m & ok, masks, v)



def valid_entries(shape: tuple[int, ...], axis: int, length: int) -> jax.Array:
    """Bool array of `shape`: True where the index along `axis` is below `length`."""
    return jax.lax.broadcasted_iota(jnp.int32, shape, axis % len(shape)) < length


def padded_count(shape: tuple[int, ...], axis: int, length: int) -> int:
    """Entries of a param of `shape` past `length` along `axis`."""
    size = int(np.prod(shape))
    return size - size // shape[axis] * min(length, shape[axis])


def valid_tree(masks: PyTree, valid: Valid | None) -> PyTree | None:
    """Bool trees of the real entries of each masked param (None when nothing is padded)."""
    if not valid or masks is None:
        return None
    return paths_lib.map_with_path(
        lambda path, m: valid_entries(m.shape, *valid[path]) if path in valid
        else jnp.ones(m.shape, bool), masks)


def real_sizes(masks: PyTree, valid: Valid | None = None) -> dict[str, int]:
    """{path: number of real (unpadded) entries} of every masked param."""
    valid = valid or {}
    return {p: m.size - (padded_count(m.shape, *valid[p]) if p in valid else 0)
            for p, m in mask_leaves(masks)}


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


def num_masked(masks: PyTree, valid: Valid | None = None) -> int:
    """Number of real entries over all masked params (host int)."""
    return int(sum(real_sizes(masks, valid).values()))


def layer_densities(masks: PyTree, valid: Valid | None = None) -> dict[str, jax.Array]:
    """{param path: fraction of kept entries} for every masked param."""
    sizes = real_sizes(masks, valid)
    return {p: jnp.sum(m, dtype=jnp.int32).astype(jnp.float32) / max(sizes[p], 1)
            for p, m in mask_leaves(masks)}


def overall_density(masks: PyTree, valid: Valid | None = None) -> jax.Array:
    """Kept fraction over all masked params (unmasked params not counted)."""
    return nnz(masks).astype(jnp.float32) / max(num_masked(masks, valid), 1)


def mask_churn(old: PyTree, new: PyTree, valid: Valid | None = None) -> jax.Array:
    """Fraction of masked entries whose kept/pruned state changed."""
    flips = sum(
        (jnp.sum(a != b, dtype=jnp.int32) for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new))),
        jnp.int32(0),
    )
    return flips.astype(jnp.float32) / max(num_masked(new, valid), 1)


def _unmasked_real_size(params: PyTree, masks: PyTree | None, valid: Valid | None) -> int:
    """Real entries of the params no mask covers (padding left out)."""
    valid = valid or {}
    masked = set() if masks is None else {p for p, _ in mask_leaves(masks)}
    return int(sum(x.size - (padded_count(x.shape, *valid[p]) if p in valid else 0)
                   for p, x in paths_lib.named_leaves(params) if p not in masked))


def param_count(params: PyTree, masks: PyTree | None, valid: Valid | None = None) -> jax.Array:
    """Nonzero-capable param count: unmasked params in full plus kept masked entries
    (padding never counts)."""
    kept = jnp.float32(0) if masks is None else nnz(masks).astype(jnp.float32)
    return kept + float(_unmasked_real_size(params, masks, valid))


def average_param_count(params: PyTree, masks: PyTree | None, avg_density: jax.Array,
                        valid: Valid | None = None) -> jax.Array:
    """Average param count over a run from the running average density of masked params."""
    masked = 0 if masks is None else num_masked(masks, valid)
    return avg_density * masked + float(_unmasked_real_size(params, masks, valid))


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
