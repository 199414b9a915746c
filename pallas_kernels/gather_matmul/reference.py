"""Plain jax.numpy definition of the gathered matmul; every backend is tested against it.

With `idx [C]` int32 and `count` (a scalar, 0 <= count <= C), the first `count` entries of
`idx` name the active rows or columns of `w`; entries from `count` on are padding (any value)
and contribute nothing:

* mode "rows": ``y[b, n] = sum_{c < count} x[b, idx[c]] * w[idx[c], n]`` — x [B, K],
  w [K, N] -> [B, N]. With distinct active indices this is ``(x * m) @ w`` for the 0/1 mask m
  of those indices: the product with the inactive inputs left out.
* mode "cols": ``y[b, c] = sum_k x[b, k] * w[k, idx[c]]`` for c < count, 0 after — x [B, K],
  w [K, N] -> [B, C]: only the active output columns, compact. With `transpose_w`, w is
  stored neuron-major as [N, K] (``w_t[idx[c], k]``), so each active column is one
  contiguous row in memory.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

MODES = ("rows", "cols")


def gather_matmul_reference(x: jax.Array, w: jax.Array, idx: jax.Array, count: jax.Array,
                            mode: str = "rows", transpose_w: bool = False) -> jax.Array:
    """The definition above, in float32 at the highest precision; output dtype float32."""
    if transpose_w:
        w = w.T
    c = idx.shape[0]
    valid = jnp.arange(c) < count
    x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    if mode == "rows":
        xs = jnp.where(valid[None, :], jnp.take(x32, idx, axis=1, mode="clip"), 0.0)
        return jnp.dot(xs, jnp.take(w32, idx, axis=0, mode="clip"), precision=hi)
    y = jnp.dot(x32, jnp.take(w32, idx, axis=1, mode="clip"), precision=hi)
    return jnp.where(valid[None, :], y, 0.0)
