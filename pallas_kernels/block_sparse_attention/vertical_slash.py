"""MInference's vertical-slash pattern at token granularity (XLA, forward only): each query
attends to the selected key columns at or before it and to the keys at the selected
offsets behind it, each key once, and to nothing else.

The tiled alternative (`minference.py`) runs the tiles that cover these tokens on the
block-sparse op. Here every query gathers exactly ``vertical + slash`` keys: fewer
multiply-adds than the covering tiles when the selected columns are spread over many
blocks, but through gathers instead of matmuls on contiguous tiles.
`benchmarks/long_context.py` times both.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse_attention.dynamic import expand_kv

NEG = -1e30


def vertical_slash_attention(q: jax.Array, k: jax.Array, v: jax.Array, columns: jax.Array,
                             offsets: jax.Array, chunk: int = 512) -> jax.Array:
    """q ``[b, s, h, d]``, k/v ``[b, s, kv_h, d]``; ``columns`` ``[b, h, nv]`` and
    ``offsets`` ``[b, h, ns]`` (int32, distinct per row; ``offsets`` >= 0) -> ``[b, s, h,
    d]``. Query ``i`` sees key ``j`` iff ``j <= i`` and (``j`` in ``columns`` or ``i - j`` in
    ``offsets``). Queries are processed ``chunk`` at a time (memory ``chunk * (nv + ns) * d``
    per head)."""
    b, s, h, d = q.shape
    chunk = math.gcd(s, chunk)
    scale = 1.0 / math.sqrt(d)
    kh = expand_kv(k, h).transpose(0, 2, 1, 3).astype(jnp.float32)  # [b, h, s, d]
    vh = expand_kv(v, h).transpose(0, 2, 1, 3).astype(jnp.float32)
    qh = q.transpose(0, 2, 1, 3).astype(jnp.float32) * scale
    is_col = jnp.zeros((b, h, s), bool).at[
        jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None], columns].set(True)
    take = jax.vmap(jax.vmap(lambda x, i: x[i]))  # per (b, h): [s, d][idx] -> [..., d]
    kc, vc = take(kh, columns), take(vh, columns)  # [b, h, nv, d]

    def one(start):
        pos = start + jnp.arange(chunk)  # [C]
        qc = jax.lax.dynamic_slice_in_dim(qh, start, chunk, axis=2)  # [b, h, C, d]
        lv = jnp.einsum("bhcd,bhnd->bhcn", qc, kc)
        lv = jnp.where(columns[:, :, None, :] <= pos[:, None], lv, NEG)
        key = pos[None, None, :, None] - offsets[:, :, None, :]  # [b, h, C, ns]
        ok = key >= 0
        key = jnp.where(ok, key, 0)
        ks = take(kh, key)  # [b, h, C, ns, d]
        ls = jnp.einsum("bhcd,bhcnd->bhcn", qc, ks)
        ok = ok & ~jnp.take_along_axis(is_col[:, :, None, :], key, axis=-1)
        ls = jnp.where(ok, ls, NEG)
        logits = jnp.concatenate([lv, ls], axis=-1)
        p = jnp.exp(logits - jnp.max(logits, -1, keepdims=True))
        p = jnp.where(logits > NEG / 2, p, 0.0)
        p = p / jnp.sum(p, -1, keepdims=True)
        nv = columns.shape[-1]
        out = (jnp.einsum("bhcn,bhnd->bhcd", p[..., :nv], vc)
               + jnp.einsum("bhcn,bhcnd->bhcd", p[..., nv:], take(vh, key)))
        return out  # [b, h, C, d]

    outs = jax.lax.map(one, jnp.arange(0, s, chunk))  # [chunks, b, h, C, d]
    out = jnp.moveaxis(outs, 0, 2).reshape(b, h, s, d)
    return out.transpose(0, 2, 1, 3).astype(q.dtype)
