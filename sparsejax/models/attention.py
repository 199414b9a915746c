"""Multi-head self-attention with grouped-query heads, RoPE and packed-sequence masking.

`kind="dense"` uses `jax.nn.dot_product_attention` (the best implementation on the device);
`kind="block_sparse"` calls the Pallas block-sparse attention op with a gin-chosen mask.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.models.layers import DEFAULT_KERNEL_INIT, Dtype, as_tokens, rotary_embedding

ATTENTION_KINDS = ("dense", "block_sparse")


def causal_segment_mask(segment_ids: jax.Array) -> jax.Array:
    """[batch, seq] segment ids -> boolean [batch, 1, seq, seq]: causal and same segment."""
    seq = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal[None] & same)[:, None]


class Attention(nn.Module):
    """Causal self-attention. x: [batch, seq, embed] -> [batch, seq, embed]."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    kind: str = "dense"
    sparse_mask: Any = None  # a block-sparse mask spec (dict of kwargs) when kind == "block_sparse"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _proj(self, x, heads, name):
        """x: [b, s, embed] -> [b, s, heads, head_dim]. Kernels are 2-D [in, out] like every
        other linear layer, so sparsity (ERK, N:M along the input dim) treats them alike."""
        kernel = self.param(
            name, nn.with_logical_partitioning(DEFAULT_KERNEL_INIT, ("embed", "heads")),
            (x.shape[-1], heads * self.head_dim), self.param_dtype)
        y = as_tokens(x) @ kernel.astype(self.dtype)  # [tokens, heads * head_dim]
        return y.reshape(*x.shape[:-1], heads, self.head_dim)

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        q = self._proj(x, self.num_heads, "query")  # [b, s, h, d]
        k = self._proj(x, self.num_kv_heads, "key")  # [b, s, kv_h, d]
        v = self._proj(x, self.num_kv_heads, "value")
        q = rotary_embedding(q, positions, self.rope_theta)
        k = rotary_embedding(k, positions, self.rope_theta)
        q = nn.with_logical_constraint(q, ("batch", "seq", "heads", "kv"))
        if self.kind == "dense":
            out = jax.nn.dot_product_attention(q, k, v, mask=causal_segment_mask(segment_ids))
        elif self.kind == "block_sparse":
            from sparsejax.models.sparse_attention import BlockSparseSelfAttention
            out = BlockSparseSelfAttention(self.sparse_mask, name="block_sparse")(
                q, k, v, segment_ids)
        else:
            raise ValueError(f"attention kind={self.kind!r} is unknown; valid: {ATTENTION_KINDS}")
        out = nn.with_logical_constraint(out, ("batch", "seq", "heads", "kv"))
        out_kernel = self.param(
            "out", nn.with_logical_partitioning(DEFAULT_KERNEL_INIT, ("heads", "embed")),
            (self.num_heads * self.head_dim, x.shape[-1]), self.param_dtype)
        y = out.reshape(-1, out_kernel.shape[0]).astype(self.dtype) @ out_kernel.astype(self.dtype)
        return y.reshape(x.shape)
