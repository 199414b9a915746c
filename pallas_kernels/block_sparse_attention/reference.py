"""Dense reference for block-sparse attention: the definition every backend must match."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse_attention import masks as masks_lib

# Finite stand-in for -inf: keeps softmax and its gradient NaN-free.
MASK_VALUE = -1e30


def dense_visibility(mask: masks_lib.BlockMask, q: jax.Array, k: jax.Array, block_q: int,
                     block_k: int, segment_ids: jax.Array | None = None) -> jax.Array:
    """Full boolean mask ``[batch or 1, heads or 1, seq_q, seq_k]``.

    Block layout expanded to tokens, AND the token rule, AND equal segment ids.
    """
    sq, sk = q.shape[1], k.shape[1]
    layout = jnp.asarray(masks_lib.layout_for(mask, q, k, block_q, block_k))
    vis = jnp.repeat(jnp.repeat(layout, block_q, axis=-2), block_k, axis=-1)
    rule = mask.token_rule
    if rule is not None:
        vis = vis & rule(jnp.arange(sq)[:, None], jnp.arange(sk)[None, :])
    if segment_ids is not None:
        vis = vis & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return vis


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: masks_lib.BlockMask, *,
                        block_q: int, block_k: int, segment_ids: jax.Array | None = None,
                        scale: float | None = None) -> jax.Array:
    """Masked softmax attention; q ``[b, sq, h, d]``, k/v ``[b, sk, kvh, d]`` -> ``[b, sq, h, d]``.

    Computed in float32. Rows with no visible key give zeros (and zero gradients).
    """
    h, kvh = q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    ke = jnp.repeat(k, h // kvh, axis=2).astype(jnp.float32)
    ve = jnp.repeat(v, h // kvh, axis=2).astype(jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), ke,
                        precision=jax.lax.Precision.HIGHEST) * scale
    vis = dense_visibility(mask, q, k, block_q, block_k, segment_ids)
    logits = jnp.where(vis, logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(vis, probs, 0.0)  # exact zeros off-mask, zero rows when nothing is visible
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, ve, precision=jax.lax.Precision.HIGHEST)
    return out.astype(q.dtype)
