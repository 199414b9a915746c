"""Plain jax.numpy definition of the grouped matmul (`gmm`) and its transpose (`tgmm`).

These functions *define* the ops: every kernel is tested against them. They
materialize a `[g, m, n]` intermediate, so they are for small shapes only.

Group-size semantics (shared by every backend): negative sizes count as 0 and
the running sum of sizes is clamped to `m`, so group `i` owns rows
`[min(S_{i-1}, m), min(S_i, m))` where `S_i = sum(max(group_sizes[:i+1], 0))`.
Rows past the last group belong to no group: `gmm` writes zeros there and
`tgmm` ignores them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def effective_group_sizes(group_sizes: jax.Array, m: int) -> jax.Array:
    """Clips `group_sizes [g]` so sizes are >= 0 and their running sum is <= m."""
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    ends = jnp.minimum(jnp.cumsum(sizes), m)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    return (ends - starts).astype(jnp.int32)


def row_group_ids(group_sizes: jax.Array, m: int) -> jax.Array:
    """Group id of every row, `[m]` int32; rows past the last group get `g`."""
    ends = jnp.cumsum(effective_group_sizes(group_sizes, m))
    return jnp.searchsorted(ends, jnp.arange(m, dtype=jnp.int32), side="right").astype(
        jnp.int32
    )


def _one_hot_rows(group_sizes: jax.Array, m: int) -> jax.Array:
    """`[g, m]` float32 mask: 1 where row r belongs to group i."""
    g = group_sizes.shape[0]
    ids = row_group_ids(group_sizes, m)
    return (ids[None, :] == jnp.arange(g, dtype=jnp.int32)[:, None]).astype(jnp.float32)


def gmm_reference(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    preferred_element_type: jnp.dtype | None = None,
) -> jax.Array:
    """out[r] = lhs[r] @ rhs[group(r)] in float32, zeros for rows in no group.

    lhs: [m, k] rows sorted by group; rhs: [g, k, n]; group_sizes: [g] -> [m, n].
    """
    out_dtype = preferred_element_type or lhs.dtype
    m = lhs.shape[0]
    onehot = _one_hot_rows(group_sizes, m)  # [g, m]
    per_group = jnp.einsum(
        "mk,gkn->gmn",
        lhs.astype(jnp.float32),
        rhs.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )  # [g, m, n]
    out = jnp.einsum("gm,gmn->mn", onehot, per_group, precision=jax.lax.Precision.HIGHEST)
    return out.astype(out_dtype)


def tgmm_reference(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    preferred_element_type: jnp.dtype | None = None,
) -> jax.Array:
    """out[i] = lhs[rows_i].T @ grad[rows_i] in float32 (zeros for empty groups).

    lhs: [m, k]; grad: [m, n]; group_sizes: [g] -> [g, k, n].
    """
    out_dtype = preferred_element_type or lhs.dtype
    m = lhs.shape[0]
    onehot = _one_hot_rows(group_sizes, m)  # [g, m]
    out = jnp.einsum(
        "gm,mk,mn->gkn",
        onehot,
        lhs.astype(jnp.float32),
        grad.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    return out.astype(out_dtype)
