"""Dynamic prefill masks: block layouts estimated from the input, per batch row and head.

The long-context prefill methods (MInference, FlexPrefill, XAttention; one module each)
score the (query block, key block) tiles of a causal attention map from q and k, keep the
tiles their rule selects, and always keep the sink block(s) and a local window of blocks,
as the papers do. The layout then runs on the block-sparse op, so skipped tiles cost
nothing. They are masks for prefill (one pass over a prompt or a row): a KV-cache decode
step after them attends densely (``token_rule`` is causal).

Every method shares:

* ``sink_blocks`` / ``local_blocks``: key blocks ``[0, sink_blocks)`` and the
  ``local_blocks`` blocks ending at the diagonal are always kept;
* ``max_blocks``: at most this many key blocks per query block (mandatory ones first,
  then by the method's score). It bounds the compute statically: the XLA path pads each
  query block to ``min(its causal blocks, max_blocks)`` list entries, so a threshold
  rule that would select more blocks than ``max_blocks`` is cut back to it;
* ``length``: the number of real tokens when the input was padded on the right to whole
  blocks (0: all), so the estimators read the last *real* queries.

Block sizes: the methods score square tiles, so ``block_q == block_k``.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse_attention import masks as masks_lib


def check_fraction(name: str, value: float, cls: str, low_open: bool = True) -> None:
    """``value`` in (0, 1] (or [0, 1] with ``low_open=False``)."""
    ok = isinstance(value, (int, float)) and (0 < value <= 1 if low_open else 0 <= value <= 1)
    if not ok:
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{cls}: {name}={value!r} must be a number in {interval}.")


@dataclasses.dataclass(frozen=True, eq=False)
class PrefillMask(masks_lib.BlockMask):
    """Base class of the dynamic prefill masks (causal; see the module docstring)."""

    sink_blocks: int = 1
    local_blocks: int = 1
    max_blocks: int | None = None
    length: int = 0

    dynamic = True

    def __post_init__(self):
        name = type(self).__name__
        masks_lib._check_positive("local_blocks", self.local_blocks, name)
        if not isinstance(self.sink_blocks, int) or self.sink_blocks < 0:
            raise ValueError(f"{name}: sink_blocks={self.sink_blocks!r} must be an integer >= 0.")
        if self.max_blocks is not None:
            masks_lib._check_positive("max_blocks", self.max_blocks, name)
            if self.max_blocks < self.sink_blocks + self.local_blocks:
                raise ValueError(f"{name}: max_blocks={self.max_blocks} must be at least "
                                 f"sink_blocks + local_blocks = "
                                 f"{self.sink_blocks + self.local_blocks} (always kept).")
        if not isinstance(self.length, int) or self.length < 0:
            raise ValueError(f"{name}: length={self.length!r} must be an integer >= 0.")

    def token_mask(self, q_pos, k_pos):
        return k_pos <= q_pos

    @property
    def token_rule(self):
        return masks_lib.CausalMask()

    def block_layout(self, seq_q, seq_k, block_q, block_k):
        raise ValueError(f"{type(self).__name__}: the layout depends on q and k; use "
                         f"block_layout_dynamic.")

    def row_bounds(self, seq_q: int, seq_k: int, block_q: int, block_k: int) -> np.ndarray:
        """Static upper bound on each query block's list length, ``[q_blocks]``."""
        qb, kb = seq_q // block_q, seq_k // block_k
        causal = np.minimum(np.arange(qb) + 1 + (kb - qb), kb)
        return causal if self.max_blocks is None else np.minimum(causal, self.max_blocks)

    def max_blocks_per_row(self, seq_q: int, seq_k: int, block_q: int, block_k: int) -> int:
        return int(self.row_bounds(seq_q, seq_k, block_q, block_k).max())

    def block_layout_dynamic(self, q: jax.Array, k: jax.Array, block_q: int,
                             block_k: int) -> jax.Array:
        """Selected tiles ``[batch, heads, q_blocks, kv_blocks]`` (bool, no gradient)."""
        if block_q != block_k or q.shape[1] != k.shape[1]:
            raise ValueError(f"{type(self).__name__}: needs square tiles over a prompt's own "
                             f"keys (block_q == block_k, seq_q == seq_k); got block_q={block_q}, "
                             f"block_k={block_k}, seq_q={q.shape[1]}, seq_k={k.shape[1]}.")
        q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
        qb = q.shape[1] // block_q
        allowed = jnp.asarray(causal_blocks(qb))
        keep = mandatory_blocks(qb, self.sink_blocks, self.local_blocks)
        selected, score = self.select(q, k, block_q)
        layout = (selected | keep) & allowed
        return cap_rows(layout, score, jnp.asarray(keep), self.max_blocks)

    def select(self, q: jax.Array, k: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
        """The method's rule: (selected ``[b, h, qb, kb]`` bool, block score ``[b, h, qb,
        kb]`` float32 ranking the blocks for ``max_blocks``)."""
        raise NotImplementedError

    def bind(self, layer: int, length: int) -> "PrefillMask":
        """This mask for one layer's input of ``length`` real tokens (methods with per-layer
        settings override it to read ``layer``)."""
        return dataclasses.replace(self, length=length)

    def real_length(self, seq: int) -> int:
        if self.length > seq:
            raise ValueError(f"{type(self).__name__}: length={self.length} exceeds the "
                             f"sequence ({seq}).")
        return self.length or seq


def causal_blocks(qb: int) -> np.ndarray:
    """``[qb, qb]``: the tiles on or below the diagonal."""
    return np.tril(np.ones((qb, qb), bool))


def mandatory_blocks(qb: int, sink: int, local: int) -> np.ndarray:
    """``[qb, qb]``: the sink columns and the ``local`` blocks ending at the diagonal."""
    r, c = np.arange(qb)[:, None], np.arange(qb)[None, :]
    return ((c < sink) | ((r - c >= 0) & (r - c < local))) & (c <= r)


def cap_rows(layout: jax.Array, score: jax.Array, keep: jax.Array,
             max_blocks: int | None) -> jax.Array:
    """At most ``max_blocks`` tiles per row of ``layout``: the mandatory ``keep`` first,
    then the highest ``score``."""
    kb = layout.shape[-1]
    if max_blocks is None or max_blocks >= kb:
        return layout
    key = jnp.where(keep, jnp.inf, jnp.where(layout, score.astype(jnp.float32), -jnp.inf))
    _, top = jax.lax.top_k(key, max_blocks)
    return layout & masks_lib.index_mask(top, kb)


def cumulative_select(mass: jax.Array, threshold: float, keep: jax.Array,
                      allowed: jax.Array) -> jax.Array:
    """Per row: the mandatory tiles ``keep``, then the other allowed tiles in order of
    decreasing ``mass`` while the mass kept *before* each is below ``threshold`` times the
    row's total (so the tile that crosses the threshold is kept). XAttention's rule."""
    keep, allowed = (jnp.broadcast_to(x, mass.shape) for x in (keep, allowed))
    mass = jnp.where(allowed, mass.astype(jnp.float32), 0.0)
    total = jnp.sum(mass, axis=-1, keepdims=True)
    key = jnp.where(keep, jnp.inf, jnp.where(allowed, mass, -1.0))
    order = jnp.argsort(-key, axis=-1, stable=True)
    sorted_mass = jnp.take_along_axis(mass, order, axis=-1)
    before = jnp.cumsum(sorted_mass, axis=-1) - sorted_mass
    sorted_keep = jnp.take_along_axis(keep & allowed, order, axis=-1)
    sorted_allowed = jnp.take_along_axis(allowed, order, axis=-1)
    chosen = sorted_keep | (sorted_allowed & (before < threshold * total))
    return jnp.take_along_axis(chosen, jnp.argsort(order, axis=-1), axis=-1)


def top_count(score: jax.Array, count: jax.Array) -> jax.Array:
    """Bool mask of the ``count`` (per row, traced) highest entries of ``score``'s last axis."""
    order = jnp.argsort(-score, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1)
    return rank < count[..., None]


def expand_kv(k: jax.Array, heads: int) -> jax.Array:
    """``[b, s, kv_heads, d]`` -> ``[b, s, heads, d]`` (each GQA group shares its kv head)."""
    return jnp.repeat(k, heads // k.shape[2], axis=2)


def last_query_attention(q: jax.Array, k: jax.Array, n: int, length: int) -> jax.Array:
    """Causal softmax attention of the last ``n`` real queries (positions ``[length - n,
    length)``) over every key: ``[b, h, n, seq]`` float32."""
    n = min(n, length)
    pos = np.arange(length - n, length)
    qs = q[:, length - n:length].astype(jnp.float32)
    ke = expand_kv(k, q.shape[2]).astype(jnp.float32)
    logits = jnp.einsum("bihd,bjhd->bhij", qs, ke) / math.sqrt(q.shape[-1])
    vis = np.arange(k.shape[1])[None, :] <= pos[:, None]
    return jax.nn.softmax(jnp.where(vis, logits, -jnp.inf), axis=-1)


def diagonal_sums(attn: jax.Array, length: int) -> jax.Array:
    """``attn`` ``[b, h, n, seq]`` of the queries ``[length - n, length)`` -> ``[b, h, seq]``:
    the mass at each offset ``o = q_pos - k_pos`` summed over the queries."""
    n, seq = attn.shape[-2], attn.shape[-1]
    pos = np.arange(length - n, length)
    kpos = pos[:, None] - np.arange(seq)[None, :]  # [n, offsets]
    valid = kpos >= 0
    picked = jnp.take_along_axis(attn, jnp.asarray(np.where(valid, kpos, 0))[None, None], -1)
    return jnp.sum(jnp.where(valid, picked, 0.0), axis=-2)


def block_sum(x: jax.Array, block: int) -> jax.Array:
    """Sum over consecutive groups of ``block`` along the last axis."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block).sum(-1)


def vertical_layout(columns: jax.Array, qb: int) -> jax.Array:
    """Key blocks ``columns`` ``[b, h, kb]`` (bool) kept for every query block at or after
    them: ``[b, h, qb, kb]``."""
    return columns[:, :, None, :] & jnp.asarray(causal_blocks(qb))[None, None]


def by_distance(x: jax.Array, qb: int) -> jax.Array:
    """``x`` ``[..., qb]`` indexed by block distance ``r - c`` -> ``[..., qb, qb]`` tiles
    (entries above the diagonal read distance 0)."""
    dist = np.arange(qb)[:, None] - np.arange(qb)[None, :]
    return jnp.take(x, jnp.asarray(np.clip(dist, 0, qb - 1)), axis=-1)


def slash_layout(distances: jax.Array, qb: int) -> jax.Array:
    """Block distances ``distances`` ``[b, h, kb]`` (bool; distance ``r - c``) as tiles
    ``[b, h, qb, kb]``."""
    return by_distance(distances, qb) & jnp.asarray(causal_blocks(qb))


def offsets_to_distances(offsets: jax.Array, block: int, qb: int) -> jax.Array:
    """Token offsets ``o`` marked in ``offsets`` ``[b, h, seq]`` -> block distances
    ``[b, h, qb]``: the diagonal ``k = q - o`` crosses the tiles at distances
    ``floor(o / block)`` and ``ceil(o / block)`` from the diagonal tile."""
    o = np.arange(offsets.shape[-1])
    lo = jnp.zeros(offsets.shape[:-1] + (qb + 1,), bool)
    lo = lo.at[..., o // block].max(offsets).at[..., -(-o // block)].max(offsets)
    return lo[..., :qb]
