"""The gathered matmul in plain XLA (the CPU path): gather the active rows/columns of the
weight (`jnp.take`), then one dense matmul over the C gathered slots. Work and weight reads
are proportional to the capacity C, not to the full weight; slots past `count` are zeroed
in the small operand, so they add exact zeros."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def gather_matmul_xla(x: jax.Array, w: jax.Array, idx: jax.Array, count: jax.Array,
                      mode: str, out_dtype, transpose_w: bool = False) -> jax.Array:
    valid = jnp.arange(idx.shape[0]) < count
    dtype = jnp.promote_types(x.dtype, w.dtype)
    if mode == "rows":
        xs = jnp.where(valid[None, :], jnp.take(x, idx, axis=1, mode="clip"), 0).astype(dtype)
        y = jnp.dot(xs, jnp.take(w, idx, axis=0, mode="clip").astype(dtype),
                    preferred_element_type=jnp.float32)
    else:
        if transpose_w:  # w [N, K]: the active columns are contiguous rows
            wc = jnp.take(w, idx, axis=0, mode="clip").astype(dtype)  # [C, K]
            y = jax.lax.dot_general(x.astype(dtype), wc, (((1,), (1,)), ((), ())),
                                    preferred_element_type=jnp.float32)
        else:
            y = jnp.dot(x.astype(dtype), jnp.take(w, idx, axis=1, mode="clip").astype(dtype),
                        preferred_element_type=jnp.float32)
        y = jnp.where(valid[None, :], y, 0.0)
    return y.astype(out_dtype)
