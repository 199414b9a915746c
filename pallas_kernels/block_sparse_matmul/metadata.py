"""The transposed layout of a block-sparse weight, for dx = dy @ Wᵀ.

The forward product reads `k` input blocks per output block (constant fan-in); the input
gradient needs, for each input block, the stored blocks that read it: a fan-out that varies.
`transpose_layout` lists the stored blocks sorted by input block, with one placeholder entry
per input block appended, so every input block has at least one entry (a TPU kernel must
visit, and so zero, every output block of dx) and the length is static:
nnz + in_blocks entries, nnz = out_blocks * k.

Everything here is traced jax.numpy, so it runs under jit on indices that change (DST).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class TransposedLayout(NamedTuple):
    """Per-entry metadata, all int32, entries sorted by input block (real entries of a
    block first, then its placeholder).

    in_block: [n] the input block (dx block) of each entry; non-decreasing.
    out_block: [n] the output block o of a real entry (0 for a placeholder).
    slot: [n] its slot j in `values[o, j]` (0 for a placeholder).
    valid: [n] 1 for a stored block, 0 for a placeholder.
    offsets: [in_blocks + 1] CSR offsets: entries offsets[i] .. offsets[i+1]-1 are input
      block i's, the last of them its placeholder (so offsets[i+1] - offsets[i] - 1 stored
      blocks read input block i).
    """

    in_block: jax.Array
    out_block: jax.Array
    slot: jax.Array
    valid: jax.Array
    offsets: jax.Array


def transpose_layout(indices: jax.Array, in_blocks: int) -> TransposedLayout:
    """The entries of `indices` [out_blocks, k] sorted by input block (see module doc)."""
    ob, k = indices.shape
    nnz = ob * k
    flat = indices.reshape(-1).astype(jnp.int32)
    rows = jnp.concatenate([flat, jnp.arange(in_blocks, dtype=jnp.int32)])
    valid = jnp.concatenate([jnp.ones((nnz,), jnp.int32), jnp.zeros((in_blocks,), jnp.int32)])
    # sort key: input block, then real entries before the placeholder, then stored order
    order = jnp.argsort(rows * 2 + (1 - valid), stable=True)
    entry = jnp.concatenate([jnp.arange(nnz, dtype=jnp.int32), jnp.zeros((in_blocks,), jnp.int32)])
    entry = entry[order]
    valid = valid[order]
    counts = jnp.zeros((in_blocks,), jnp.int32).at[flat].add(1) + 1
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts).astype(jnp.int32)])
    return TransposedLayout(in_block=rows[order], out_block=jnp.where(valid == 1, entry // k, 0),
                            slot=jnp.where(valid == 1, entry % k, 0), valid=valid,
                            offsets=offsets)
