"""Plain jax.numpy definition of the block-sparse matmul; every backend is tested against it.

A block-sparse weight W [in_features, out_features] is stored compactly with a constant fan-in
of `k` blocks per output block column:

* values  [out_blocks, k, block_in, block_out]
* indices [out_blocks, k] int32: the input block of each stored block, distinct within a row.

    W[indices[o, j] * block_in : (indices[o, j] + 1) * block_in,
      o * block_out : (o + 1) * block_out] = values[o, j]

and every other entry of W is zero. ``block_sparse_matmul(x, values, indices) = x @ W`` for
x [tokens, in_features], with in_features = in_blocks * block_in.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def to_dense(values: jax.Array, indices: jax.Array, in_blocks: int) -> jax.Array:
    """The dense [in_blocks * block_in, out_blocks * block_out] matrix of a compact weight
    (exact: each entry is one stored value or zero)."""
    ob, k, bi, bo = values.shape
    w = jnp.zeros((in_blocks, ob, bi, bo), values.dtype)
    w = w.at[indices, jnp.arange(ob)[:, None]].set(values)  # [ib, ob, bi, bo]
    return w.transpose(0, 2, 1, 3).reshape(in_blocks * bi, ob * bo)


def block_sparse_matmul_reference(x: jax.Array, values: jax.Array, indices: jax.Array) -> jax.Array:
    """x [tokens, in_features] @ to_dense(values, indices) in float32 at the highest
    precision; output float32 [tokens, out_blocks * block_out]."""
    in_blocks = x.shape[-1] // values.shape[2]
    w = to_dense(values.astype(jnp.float32), indices, in_blocks)
    return jnp.dot(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
