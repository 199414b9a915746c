"""Data-dependent top-k block selection (SeerAttention-style gate) and its distillation loss.

The gate mean-pools q and k per block, optionally projects them with small
learned per-head matrices, scores ``pooled_q . pooled_k`` and keeps the top-k
kv blocks per query block plus the diagonal (intersected with causality). The
gate is trained separately with :func:`topk_gate_distillation_loss`, which pulls
its block softmax towards the block-pooled full attention map.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse_attention import masks as masks_lib


@gin.configurable
@dataclasses.dataclass(frozen=True, eq=False)
class TopKBlockMask(masks_lib.BlockMask):
    """Keep the ``top_k`` highest-scoring kv blocks per query block (+ the diagonal).

    ``gate_params`` (optional) is ``{"wq": [heads, head_dim, gate_dim],
    "wk": [kv_heads, head_dim, gate_dim]}`` from :func:`init_gate_params`;
    without it the raw pooled q/k are scored. The layout is computed under
    ``stop_gradient``: attention gradients do not flow into the gate.
    """

    top_k: int = 8
    causal: bool = True
    gate_params: Any = dataclasses.field(default=None, compare=False, repr=False)

    dynamic = True

    def __post_init__(self):
        masks_lib._check_positive("top_k", self.top_k, "TopKBlockMask")

    def token_mask(self, q_pos, k_pos):
        return (k_pos <= q_pos) if self.causal else ((q_pos >= 0) | (k_pos >= 0))

    @property
    def token_rule(self):
        return masks_lib.CausalMask() if self.causal else None

    def with_params(self, gate_params: Any) -> "TopKBlockMask":
        """Same mask with (traced) gate parameters attached."""
        return dataclasses.replace(self, gate_params=gate_params)

    def max_blocks_per_row(self, seq_q: int, seq_k: int, block_q: int, block_k: int) -> int:
        """Longest possible row list: ``top_k`` picks plus the diagonal tiles (one, or
        several when ``block_k < block_q``)."""
        diag = _diagonal(seq_q // block_q, seq_k // block_k, block_q, block_k)
        return min(seq_k // block_k, self.top_k + int(diag.sum(-1).max(initial=0)))

    def allowed_layout(self, seq_q, seq_k, block_q, block_k) -> np.ndarray:
        """Tiles the selection may pick from: ``[1, qb, kb]``."""
        if self.causal:
            return masks_lib.CausalMask().block_layout(seq_q, seq_k, block_q, block_k)
        return np.ones((1, seq_q // block_q, seq_k // block_k), bool)

    def gate_scores(self, q: jax.Array, k: jax.Array, block_q: int, block_k: int) -> jax.Array:
        """Gate logits ``[batch, heads, q_blocks, kv_blocks]`` (float32) from q ``[b, sq, h, d]``, k ``[b, sk, kvh, d]``."""
        return gate_scores(q, k, block_q, block_k, self.gate_params)

    def block_layout_dynamic(self, q, k, block_q, block_k) -> jax.Array:
        """Selected tiles ``[batch, heads, q_blocks, kv_blocks]`` (bool, no gradient)."""
        scores = jax.lax.stop_gradient(self.gate_scores(q, k, block_q, block_k))
        _, _, qb, kb = scores.shape
        allowed = jnp.asarray(self.allowed_layout(q.shape[1], k.shape[1], block_q, block_k))
        scores = jnp.where(allowed[None], scores, -jnp.inf)
        kk = min(self.top_k, kb)
        _, top = jax.lax.top_k(scores, kk)  # [b, h, qb, kk]
        picked = masks_lib.index_mask(top, kb)
        diag = jnp.asarray(_diagonal(qb, kb, block_q, block_k))
        return (picked | diag) & allowed[None]

    def block_layout(self, seq_q, seq_k, block_q, block_k):
        raise ValueError("TopKBlockMask: the layout depends on q and k; use block_layout_dynamic.")


def _diagonal(q_blocks: int, kv_blocks: int, block_q: int, block_k: int) -> np.ndarray:
    """``[q_blocks, kv_blocks]``: the kv tiles holding the keys at the query tile's own
    positions (always kept)."""
    qstart = np.arange(q_blocks)[:, None] * block_q
    kv = np.arange(kv_blocks)[None, :]
    return (kv >= qstart // block_k) & (kv <= (qstart + block_q - 1) // block_k)


def init_gate_params(key: jax.Array, num_heads: int, num_kv_heads: int, head_dim: int,
                     gate_dim: int = 32, dtype=jnp.float32) -> dict[str, jax.Array]:
    """Gate projections ``wq: [heads, head_dim, gate_dim]``, ``wk: [kv_heads, head_dim, gate_dim]``."""
    kq, kk = jax.random.split(key)
    std = 1.0 / math.sqrt(head_dim)
    return {
        "wq": (jax.random.normal(kq, (num_heads, head_dim, gate_dim)) * std).astype(dtype),
        "wk": (jax.random.normal(kk, (num_kv_heads, head_dim, gate_dim)) * std).astype(dtype),
    }


def gate_scores(q: jax.Array, k: jax.Array, block_q: int, block_k: int,
                gate_params: Any = None) -> jax.Array:
    """Pooled block scores ``[b, h, qb, kb]`` (float32); GQA kv heads are shared by their group."""
    b, sq, h, d = q.shape
    _, sk, kvh, _ = k.shape
    qp = q.astype(jnp.float32).reshape(b, sq // block_q, block_q, h, d).mean(2)  # [b, qb, h, d]
    kp = k.astype(jnp.float32).reshape(b, sk // block_k, block_k, kvh, d).mean(2)  # [b, kb, kvh, d]
    if gate_params is not None:
        qp = jnp.einsum("bqhd,hde->bqhe", qp, gate_params["wq"].astype(jnp.float32))
        kp = jnp.einsum("bkhd,hde->bkhe", kp, gate_params["wk"].astype(jnp.float32))
    kp = jnp.repeat(kp, h // kvh, axis=2)
    return jnp.einsum("bqhe,bkhe->bhqk", qp, kp) / math.sqrt(qp.shape[-1])


def topk_gate_distillation_loss(q: jax.Array, k: jax.Array, mask: TopKBlockMask, *,
                                block_q: int, block_k: int, scale: float | None = None,
                                segment_ids: jax.Array | None = None) -> jax.Array:
    """KL(block-pooled full attention || softmax(gate scores)), averaged over rows.

    Target: the dense attention probabilities (causal if ``mask.causal``,
    segment-masked), summed over each kv block and averaged over the query
    rows of a block, so every block row is a distribution over kv blocks.
    Only the gate parameters in ``mask.gate_params`` receive gradient.
    """
    b, sq, h, d = q.shape
    _, sk, kvh, _ = k.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qb, kb = sq // block_q, sk // block_k
    qs, ks = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    ke = jnp.repeat(ks, h // kvh, axis=2).astype(jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", qs.astype(jnp.float32), ke) * scale
    vis = jnp.ones((1, 1, sq, sk), bool)
    if mask.causal:
        vis = vis & (jnp.arange(sk)[None, :] <= jnp.arange(sq)[:, None])
    if segment_ids is not None:
        vis = vis & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    logits = jnp.where(vis, logits, -1e30)
    probs = jax.nn.softmax(logits, axis=-1) * jnp.any(vis, axis=-1, keepdims=True)
    target = probs.reshape(b, h, qb, block_q, kb, block_k).sum(-1).mean(-2)  # [b, h, qb, kb]
    target = jax.lax.stop_gradient(target)
    allowed = jnp.asarray(mask.allowed_layout(sq, sk, block_q, block_k))[None]
    scores = jnp.where(allowed, mask.gate_scores(qs, ks, block_q, block_k), -1e30)
    log_gate = jax.nn.log_softmax(scores, axis=-1)
    kl = jnp.where(target > 0, target * (jnp.log(jnp.where(target > 0, target, 1.0)) - log_gate), 0.0)
    return jnp.mean(jnp.sum(kl, axis=-1))
