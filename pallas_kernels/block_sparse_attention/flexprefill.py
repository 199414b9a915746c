"""FlexPrefill (Lai et al., ICLR 2025): per head, a Jensen-Shannon test chooses query-aware
or vertical-slash selection; blocks are kept up to a cumulative attention ``gamma`` (mask
kind ``'flexprefill'``).

Per batch row and head, with B the block size:

1. The last block of real queries attends (causally, softmax) to every key: â
   ``[B, seq]``. Its mean over queries is the *vertical* distribution over keys; its
   sums along diagonals (divided by B) the *slash* distribution over offsets.
2. The vertical distribution summed per key block is compared with the *pooled*
   estimate softmax(mean(last query block) . mean(key block)) by the square root of the
   Jensen-Shannon divergence. Below ``tau`` the head is *query-aware*.
3. Vertical-slash heads keep the fewest key columns (and offsets) whose sorted mass
   covers ``gamma``, counted in tokens and turned into ``tokens // B + 1`` blocks (clamped
   to ``[min_budget, max_budget]``), then the key blocks (offset blocks) with the most
   vertical (slash) mass; the first key block and the diagonal are always among them.
   Query-aware heads take ``min_budget`` vertical and slash blocks, plus, from the pooled
   scores softmax(mean(q block) . mean(k block)) over each query block's causal blocks,
   the tiles of largest score whose cumulative sum over the whole map stays within
   ``gamma`` times the number of query blocks (the authors' ``score_cover_idx``).

The authors convert the covering token count to blocks with a fixed 128; here it is the
block size B (equal to theirs at B = 128).
"""
from __future__ import annotations

import dataclasses
import math

import gin
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse_attention import dynamic
from pallas_kernels.block_sparse_attention.topk import gate_scores


@gin.configurable
@dataclasses.dataclass(frozen=True, eq=False)
class FlexPrefillMask(dynamic.PrefillMask):
    """``gamma`` in (0, 1]: attention coverage; ``tau`` in [0, 1]: the JS-divergence
    threshold below which a head is query-aware (0: never); ``min_budget`` /
    ``max_budget``: vertical and slash blocks per head (``max_budget`` None: no limit)."""

    gamma: float = 0.9
    tau: float = 0.1
    min_budget: int = 1
    max_budget: int | None = None

    def __post_init__(self):
        super().__post_init__()
        dynamic.check_fraction("gamma", self.gamma, "FlexPrefillMask")
        dynamic.check_fraction("tau", self.tau, "FlexPrefillMask", low_open=False)
        if not isinstance(self.min_budget, int) or self.min_budget < 1:
            raise ValueError(f"FlexPrefillMask: min_budget={self.min_budget!r} must be an "
                             f"integer >= 1 (blocks).")
        if self.max_budget is not None and (not isinstance(self.max_budget, int)
                                            or self.max_budget < self.min_budget):
            raise ValueError(f"FlexPrefillMask: max_budget={self.max_budget!r} must be None or "
                             f"an integer >= min_budget={self.min_budget} (blocks).")

    def select(self, q, k, block):
        parts = flexprefill_scores(q, k, block, self.real_length(q.shape[1]), self.gamma)
        qb = q.shape[1] // block
        hi = qb if self.max_budget is None else min(self.max_budget, qb)
        aware = parts["jsd"] < self.tau  # [b, h]
        lo = min(self.min_budget, qb)
        nv = jnp.where(aware, lo, jnp.clip(parts["vertical_count"], lo, hi))
        ns = jnp.where(aware, lo, jnp.clip(parts["slash_count"], lo, hi))
        vertical = parts["vertical"].at[..., 0].set(jnp.inf)
        slash = parts["slash"].at[..., 0].set(jnp.inf)
        layout = (dynamic.vertical_layout(dynamic.top_count(vertical, nv), qb)
                  | dynamic.slash_layout(dynamic.top_count(slash, ns), qb))
        layout = layout | (aware[..., None, None] & parts["query_aware"])
        score = (parts["vertical"][:, :, None, :] + dynamic.by_distance(parts["slash"], qb)
                 + parts["pooled"])
        return layout, score


def js_distance(p: jax.Array, r: jax.Array) -> jax.Array:
    """Square root of the Jensen-Shannon divergence of distributions on the last axis."""
    m = (p + r) / 2
    kl = lambda a: jnp.sum(jnp.where(a > 0, a * jnp.log(jnp.where(a > 0, a, 1.0)
                                                         / jnp.where(a > 0, m, 1.0)), 0.0), -1)
    return jnp.sqrt(jnp.maximum(0.5 * kl(p) + 0.5 * kl(r), 0.0))


def cover_count(x: jax.Array) -> jax.Array:
    """The authors' ``score_cover_topk`` before the threshold: sorted cumulative mass."""
    return jnp.cumsum(-jnp.sort(-x, axis=-1), axis=-1)


def flexprefill_scores(q: jax.Array, k: jax.Array, block: int, length: int,
                       gamma: float) -> dict:
    """The quantities FlexPrefill decides from, per batch row and head:
    ``vertical`` / ``slash`` ``[b, h, kb]`` (mass per key block / per offset block),
    their covering block counts, ``jsd`` ``[b, h]``, the query-aware tiles and the pooled
    tile scores ``[b, h, qb, kb]``."""
    b, s, h, d = q.shape
    qb = s // block
    attn = dynamic.last_query_attention(q, k, block, length)  # [b, h, B, s]
    n = attn.shape[-2]
    vertical_tok = attn.mean(-2)
    slash_tok = dynamic.diagonal_sums(attn, length) / n
    count = lambda x: jnp.sum(cover_count(x) <= gamma, axis=-1) + 1
    vertical = dynamic.block_sum(vertical_tok, block)
    slash = dynamic.block_sum(slash_tok, block)
    scale = 1.0 / math.sqrt(d)
    last_q = q[:, length - n:length].astype(jnp.float32) * scale
    k_pool = dynamic.expand_kv(k, h).astype(jnp.float32).reshape(b, qb, block, h, d).mean(2)
    real = jnp.asarray(np.arange(qb) * block < length)  # key blocks holding real tokens
    pooled_last = jax.nn.softmax(jnp.where(real, jnp.einsum("bhd,bjhd->bhj", last_q.mean(1),
                                                            k_pool), -jnp.inf), -1)
    causal = jnp.asarray(dynamic.causal_blocks(qb))
    logits = gate_scores(q, k, block, block)  # pooled q . pooled k / sqrt(d)
    pooled = jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1)  # [b, h, qb, kb]
    flat = pooled.reshape(b, h, qb * qb)
    order = jnp.argsort(-flat, axis=-1, stable=True)
    covered = jnp.cumsum(jnp.take_along_axis(flat, order, -1), -1) <= gamma * qb
    query_aware = jnp.take_along_axis(covered, jnp.argsort(order, -1), -1).reshape(pooled.shape)
    return {"vertical": vertical, "slash": slash,
            "vertical_count": count(vertical_tok) // block + 1,
            "slash_count": count(slash_tok) // block + 1,
            "jsd": js_distance(pooled_last, vertical),
            "query_aware": query_aware & causal, "pooled": pooled}
