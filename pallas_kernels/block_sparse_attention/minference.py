"""MInference (Jiang et al., NeurIPS 2024): per-head A-shape, vertical-slash or block-sparse
patterns, estimated online from the input (mask kind ``'minference'``).

* ``'vertical_slash'``: the last ``last_q`` real queries attend (causally) to every key;
  the ``vertical_size`` key columns with the most mass (the first ``keep_global`` tokens
  always among them) and the ``slash_size`` offsets ``q - k`` with the most mass summed
  along diagonals (the nearest ``keep_local`` always among them) are kept, as the authors'
  ``get_vertical_and_slash_idx``. They run as the tiles that cover them: a column's key
  block for every query block at or after it, an offset's one or two tiles per query
  block (the diagonal ``k = q - o`` crosses distances ``floor(o / B)`` and ``ceil(o /
  B)``). The tiles hold more than the selected tokens, so the layout keeps at least the
  mass the token pattern keeps.
* ``'block_sparse'``: the ``top_k`` key blocks by mean-pooled q . mean-pooled k per query
  block.
* ``'a_shape'``: the sink blocks and ``a_shape_blocks`` local blocks only (static).

``pattern`` is one name for every head or a tuple with one name per query head;
``layer_patterns`` holds one such entry per layer (the offline search's result, chosen
per layer by ``layer``). Every pattern also keeps the sink and local blocks.
"""
from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse_attention import dynamic
from pallas_kernels.block_sparse_attention.masks import index_mask
from pallas_kernels.block_sparse_attention.topk import gate_scores

PATTERNS = ("vertical_slash", "block_sparse", "a_shape")


@gin.configurable
@dataclasses.dataclass(frozen=True, eq=False)
class MInferenceMask(dynamic.PrefillMask):
    """See the module docstring. Sizes ``vertical_size``, ``slash_size``, ``keep_global``,
    ``keep_local`` and ``last_q`` are in tokens, ``top_k`` and ``a_shape_blocks`` in
    blocks."""

    pattern: str | tuple = "vertical_slash"
    layer_patterns: tuple = ()
    layer: int = -1
    last_q: int = 64
    vertical_size: int = 256
    slash_size: int = 512
    keep_global: int = 30
    keep_local: int = 100
    top_k: int = 8
    a_shape_blocks: int = 4

    def __post_init__(self):
        super().__post_init__()
        for name in ("last_q", "vertical_size", "slash_size", "keep_global", "keep_local",
                     "top_k", "a_shape_blocks"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"MInferenceMask: {name}={getattr(self, name)!r} must be a "
                                 f"positive integer.")
        for entry in (self.pattern, *self.layer_patterns):
            names = (entry,) if isinstance(entry, str) else tuple(entry)
            bad = [n for n in names if n not in PATTERNS]
            if bad or not names:
                raise ValueError(f"MInferenceMask: pattern {entry!r} must be one of {PATTERNS} "
                                 f"or a tuple of them (one per query head).")

    def bind(self, layer: int, length: int) -> "MInferenceMask":
        """Also chooses this layer's `layer_patterns` entry."""
        return dataclasses.replace(self, layer=layer, length=length)

    def head_patterns(self, heads: int) -> tuple[str, ...]:
        """This layer's pattern per query head."""
        entry = self.pattern
        if self.layer_patterns:
            if not 0 <= self.layer < len(self.layer_patterns):
                raise ValueError(f"MInferenceMask: layer={self.layer} has no entry in "
                                 f"layer_patterns (length {len(self.layer_patterns)}).")
            entry = self.layer_patterns[self.layer]
        names = (entry,) * heads if isinstance(entry, str) else tuple(entry)
        if len(names) != heads:
            raise ValueError(f"MInferenceMask: {len(names)} head patterns {names!r} for "
                             f"{heads} query heads.")
        return names

    def select(self, q, k, block):
        b, s, h, _ = q.shape
        qb = s // block
        names = np.asarray(self.head_patterns(h))
        parts = {}
        if "vertical_slash" in names:
            parts["vertical_slash"] = vertical_slash(q, k, block, self.real_length(s), self)
        if "block_sparse" in names:
            parts["block_sparse"] = pooled_topk(q, k, block, self.top_k)
        a_shape = jnp.asarray(dynamic.mandatory_blocks(qb, self.sink_blocks,
                                                       self.a_shape_blocks))
        parts["a_shape"] = (jnp.broadcast_to(a_shape, (b, h, qb, qb)),
                            jnp.zeros((b, h, qb, qb), jnp.float32))
        layout = jnp.zeros((b, h, qb, qb), bool)
        score = jnp.zeros((b, h, qb, qb), jnp.float32)
        for name, (lay, sc) in parts.items():
            on = jnp.asarray(names == name)[None, :, None, None]
            layout = jnp.where(on, lay, layout)
            score = jnp.where(on, sc, score)
        return layout, score


def vertical_slash_indices(q: jax.Array, k: jax.Array, length: int, mask: MInferenceMask
                           ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The authors' token selection: (key columns ``[b, h, nv]``, offsets ``[b, h, ns]``, the
    vertical mass ``[b, h, seq]``, the slash mass per offset ``[b, h, seq]``); columns and
    offsets are distinct and below ``length``."""
    attn = dynamic.last_query_attention(q, k, mask.last_q, length)
    vertical = attn.sum(-2)
    slash = dynamic.diagonal_sums(attn, length)
    pos = np.arange(k.shape[1])
    real = jnp.asarray(pos < length)
    v_key = jnp.where(jnp.asarray(pos < mask.keep_global), jnp.inf,
                      jnp.where(real, vertical, -jnp.inf))
    s_key = jnp.where(jnp.asarray(pos < mask.keep_local), jnp.inf,
                      jnp.where(real, slash, -jnp.inf))
    nv = min(max(mask.vertical_size, mask.keep_global), length)
    ns = min(max(mask.slash_size, mask.keep_local), length)
    _, cols = jax.lax.top_k(v_key, nv)
    _, offs = jax.lax.top_k(s_key, ns)
    return cols.astype(jnp.int32), offs.astype(jnp.int32), vertical, slash


def vertical_slash_tokens(q: jax.Array, k: jax.Array, length: int, mask: MInferenceMask
                          ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """As `vertical_slash_indices`, the columns and offsets as bool masks ``[b, h, seq]``."""
    cols, offs, vertical, slash = vertical_slash_indices(q, k, length, mask)
    return index_mask(cols, k.shape[1]), index_mask(offs, k.shape[1]), vertical, slash


def vertical_slash(q, k, block, length, mask):
    """Tiles covering the vertical-slash tokens, and a tile score (covered mass)."""
    qb = q.shape[1] // block
    cols, offs, vertical, slash = vertical_slash_tokens(q, k, length, mask)
    col_blocks = dynamic.block_sum(cols.astype(jnp.int32), block) > 0
    distances = dynamic.offsets_to_distances(offs, block, qb)
    layout = dynamic.vertical_layout(col_blocks, qb) | dynamic.slash_layout(distances, qb)
    score = (dynamic.block_sum(vertical, block)[:, :, None, :]
             + dynamic.by_distance(dynamic.block_sum(slash, block), qb))
    return layout, score


def pooled_topk(q, k, block, top_k):
    """The ``top_k`` causal key blocks per query block by pooled q . pooled k."""
    qb = q.shape[1] // block
    score = gate_scores(q, k, block, block)
    causal = jnp.asarray(dynamic.causal_blocks(qb))
    score = jnp.where(causal, score, -jnp.inf)
    return _top(score, min(top_k, qb)) & causal, score


def _top(x: jax.Array, n: int) -> jax.Array:
    """Bool mask of the ``n`` largest entries on the last axis."""
    _, idx = jax.lax.top_k(x, n)
    return index_mask(idx, x.shape[-1])
