"""XAttention (Xu et al., 2025): tiles scored by strided antidiagonal sums, kept up to a
cumulative threshold (mask kind ``'xattention'``).

Within each ``stride x stride`` sub-tile of the attention logits the antidiagonal sum is
``sum_s q[i*S + S-1-s] . k[j*S + s]``: the logits of a reshaped query (its ``S`` tokens in
reverse, concatenated) against a reshaped key (its ``S`` tokens concatenated), a matmul
``S`` times smaller per side than attention. Scaled by ``1 / (sqrt(d) * S)``, masked
causally at the reshaped granularity (reshaped key ``j <= i``) and softmaxed per reshaped
query, the probabilities are summed per ``block x block`` tile. Per query block the sink
and local tiles are kept, then the others by decreasing mass while the mass kept before
each is below ``threshold`` of the row's total (the authors' ``find_blocks_chunked``).
"""
from __future__ import annotations

import dataclasses
import math

import gin
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse_attention import dynamic


@gin.configurable
@dataclasses.dataclass(frozen=True, eq=False)
class XAttentionMask(dynamic.PrefillMask):
    """``threshold`` τ in (0, 1]: the attention mass each query block keeps; ``stride`` S:
    the antidiagonal stride (dividing the block size)."""

    threshold: float = 0.9
    stride: int = 8

    def __post_init__(self):
        super().__post_init__()
        dynamic.check_fraction("threshold", self.threshold, "XAttentionMask")
        if not isinstance(self.stride, int) or self.stride <= 0:
            raise ValueError(f"XAttentionMask: stride={self.stride!r} must be a positive "
                             f"integer.")

    def select(self, q, k, block):
        if block % self.stride:
            raise ValueError(f"XAttentionMask: stride={self.stride} must divide the block "
                             f"size {block}.")
        mass = antidiagonal_mass(q, k, block, self.stride)
        qb = mass.shape[-1]
        keep = jnp.asarray(dynamic.mandatory_blocks(qb, self.sink_blocks, self.local_blocks))
        allowed = jnp.asarray(dynamic.causal_blocks(qb))
        return dynamic.cumulative_select(mass, self.threshold, keep, allowed), mass


def antidiagonal_mass(q: jax.Array, k: jax.Array, block: int, stride: int) -> jax.Array:
    """Tile masses ``[b, h, qb, kb]`` (float32): the strided antidiagonal softmax summed
    per tile. q ``[b, s, h, d]``, k ``[b, s, kv_heads, d]``."""
    b, s, h, d = q.shape
    n = s // stride
    qr = q.astype(jnp.float32).reshape(b, n, stride, h, d)[:, :, ::-1]
    qr = jnp.transpose(qr, (0, 3, 1, 2, 4)).reshape(b, h, n, stride * d)
    ke = dynamic.expand_kv(k, h).astype(jnp.float32).reshape(b, n, stride, h, d)
    kr = jnp.transpose(ke, (0, 3, 1, 2, 4)).reshape(b, h, n, stride * d)
    logits = jnp.einsum("bhie,bhje->bhij", qr, kr) / (math.sqrt(d) * stride)
    vis = jnp.asarray(np.tril(np.ones((n, n), bool)))
    p = jax.nn.softmax(jnp.where(vis, logits, -jnp.inf), axis=-1)
    m, qb = block // stride, s // block
    return p.reshape(b, h, qb, m, qb, m).sum(axis=(3, 5))
