"""Block-sparse attention masks: block layouts, token rules and compression.

A mask says which (query, key) pairs may attend. Kernels see it in two parts:

* a boolean *block layout* ``[heads or 1, q_blocks, kv_blocks]`` (or, for the
  data-dependent :class:`TopKBlockMask`, ``[batch, heads, q_blocks, kv_blocks]``)
  saying which tiles hold at least one visible pair, compressed into index
  lists (:func:`compress`) so skipped tiles cost no compute and no traffic;
* a *token rule*: a hashable callable ``rule(q_pos, k_pos) -> bool array`` that
  refines the listed tiles (causal diagonal, window edges, strides). It uses
  only elementwise integer operators, so the same rule runs in numpy, XLA,
  Triton and Mosaic kernels. ``None`` means "every pair in a listed tile".
  Its :meth:`~BlockMask.full_layout` marks the tiles where the rule holds for
  every pair; kernels visit those first and skip the rule there
  (:func:`full_first`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import gin
import jax
import jax.numpy as jnp
import numpy as np

TokenRule = Callable[[Any, Any], Any]


def _check_positive(name: str, value: int, cls: str) -> None:
    if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{cls}: {name}={value!r} must be a positive integer.")


class BlockMask:
    """Base class: a static mask defined by a token rule (head-independent)."""

    #: Whether the layout depends on q/k values (computed inside the trace).
    dynamic: bool = False

    def token_mask(self, q_pos, k_pos):
        """Boolean visibility of ``q_pos`` vs ``k_pos`` (broadcasting int arrays)."""
        raise NotImplementedError

    @property
    def token_rule(self) -> TokenRule | None:
        """Hashable rule the kernels apply inside listed tiles (``None``: all visible)."""
        return self

    def __call__(self, q_pos, k_pos):
        return self.token_mask(q_pos, k_pos)

    def block_layout(self, seq_q: int, seq_k: int, block_q: int, block_k: int) -> np.ndarray:
        """Static block layout ``[1, seq_q // block_q, seq_k // block_k]`` (bool)."""
        return _generic_block_layout(self, seq_q, seq_k, block_q, block_k, "any")

    def full_layout(self, seq_q: int, seq_k: int, block_q: int, block_k: int) -> np.ndarray:
        """Tiles where every pair is visible, ``[1, q_blocks, kv_blocks]`` (bool): inside
        them the token rule need not be applied."""
        return _generic_block_layout(self, seq_q, seq_k, block_q, block_k, "all")


@functools.lru_cache(maxsize=64)
def _generic_block_layout(mask: BlockMask, seq_q: int, seq_k: int, block_q: int,
                          block_k: int, reduce: str) -> np.ndarray:
    """Exact layout by evaluating the token rule, a band of query rows at a time:
    tiles with any visible pair (``reduce="any"``) or with all pairs visible ("all")."""
    qb, kb = seq_q // block_q, seq_k // block_k
    out = np.zeros((qb, kb), dtype=bool)
    k_pos = np.arange(seq_k, dtype=np.int64)[None, :]
    rows_per_step = max(1, (1 << 22) // max(seq_k, 1) // block_q)
    for start in range(0, qb, rows_per_step):
        stop = min(qb, start + rows_per_step)
        q_pos = np.arange(start * block_q, stop * block_q, dtype=np.int64)[:, None]
        vis = np.asarray(mask.token_mask(q_pos, k_pos), dtype=bool)
        vis = np.broadcast_to(vis, (q_pos.shape[0], seq_k))
        out[start:stop] = getattr(vis.reshape(stop - start, block_q, kb, block_k),
                                  reduce)(axis=(1, 3))
    out.setflags(write=False)
    return out[None]


def _band_layout(seq_q, seq_k, block_q, block_k, lo, hi, full=False) -> np.ndarray:
    """Tiles holding some pair with ``lo <= q - k <= hi`` (with ``full``: only such pairs)."""
    qs = np.arange(seq_q // block_q)[:, None] * block_q
    ks = np.arange(seq_k // block_k)[None, :] * block_k
    max_diff = qs + block_q - 1 - ks
    min_diff = qs - (ks + block_k - 1)
    if full:
        return ((min_diff >= lo) & (max_diff <= hi))[None]
    return ((max_diff >= lo) & (min_diff <= hi))[None]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CausalMask(BlockMask):
    """Query ``i`` sees keys ``j <= i``."""

    def token_mask(self, q_pos, k_pos):
        return k_pos <= q_pos

    def block_layout(self, seq_q, seq_k, block_q, block_k):
        return _band_layout(seq_q, seq_k, block_q, block_k, 0, seq_q + seq_k)

    def full_layout(self, seq_q, seq_k, block_q, block_k):
        return _band_layout(seq_q, seq_k, block_q, block_k, 0, seq_q + seq_k, full=True)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SlidingWindowMask(BlockMask):
    """Causal local attention: query ``i`` sees keys ``i - window < j <= i``."""

    window: int = 256

    def __post_init__(self):
        _check_positive("window", self.window, "SlidingWindowMask")

    def token_mask(self, q_pos, k_pos):
        d = q_pos - k_pos
        return (d >= 0) & (d < self.window)

    def block_layout(self, seq_q, seq_k, block_q, block_k):
        return _band_layout(seq_q, seq_k, block_q, block_k, 0, self.window - 1)

    def full_layout(self, seq_q, seq_k, block_q, block_k):
        return _band_layout(seq_q, seq_k, block_q, block_k, 0, self.window - 1, full=True)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class GlobalLocalMask(BlockMask):
    """Longformer-style: a local window plus ``num_global`` leading global tokens.

    Global tokens see, and are seen by, every token (within causality if
    ``causal``). Without ``causal`` the window is symmetric: ``|i - j| < window``.
    """

    window: int = 256
    num_global: int = 16
    causal: bool = True

    def __post_init__(self):
        _check_positive("window", self.window, "GlobalLocalMask")
        if not isinstance(self.num_global, (int, np.integer)) or self.num_global < 0:
            raise ValueError(f"GlobalLocalMask: num_global={self.num_global!r} must be >= 0.")

    def token_mask(self, q_pos, k_pos):
        d = q_pos - k_pos
        if self.causal:
            local = (d >= 0) & (d < self.window)
        else:
            local = (d < self.window) & (d > -self.window)
        vis = local | (k_pos < self.num_global) | (q_pos < self.num_global)
        if self.causal:
            vis = vis & (d >= 0)
        return vis


@gin.configurable
@dataclasses.dataclass(frozen=True)
class StridedMask(BlockMask):
    """Sparse-Transformer strided (dilated) pattern, causal.

    Query ``i`` sees key ``j <= i`` if ``i - j < local_window`` or
    ``(i - j) % stride == 0``.
    """

    stride: int = 128
    local_window: int = 128

    def __post_init__(self):
        _check_positive("stride", self.stride, "StridedMask")
        _check_positive("local_window", self.local_window, "StridedMask")

    def token_mask(self, q_pos, k_pos):
        d = q_pos - k_pos
        return (d >= 0) & ((d < self.local_window) | (d % self.stride == 0))


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ChunkedMask(BlockMask):
    """Block-diagonal chunks: tokens see only their own chunk (causally if ``causal``)."""

    chunk_size: int = 512
    causal: bool = False

    def __post_init__(self):
        _check_positive("chunk_size", self.chunk_size, "ChunkedMask")

    def token_mask(self, q_pos, k_pos):
        vis = (q_pos // self.chunk_size) == (k_pos // self.chunk_size)
        if self.causal:
            vis = vis & (k_pos <= q_pos)
        return vis


@dataclasses.dataclass(frozen=True, eq=False)
class BlockLayoutMask(BlockMask):
    """An arbitrary user-given boolean block layout ``[heads or 1, q_blocks, kv_blocks]``.

    Every pair inside a listed tile is visible; the block sizes are implied by
    the sequence lengths divided by the layout's shape.
    """

    layout: np.ndarray = dataclasses.field(default_factory=lambda: np.ones((1, 1, 1), bool))

    def __post_init__(self):
        layout = np.asarray(self.layout)
        if layout.ndim == 2:
            layout = layout[None]
        if layout.ndim != 3 or layout.dtype != np.bool_:
            raise ValueError(
                f"BlockLayoutMask: layout with shape {layout.shape} and dtype {layout.dtype} "
                "must be a bool array [heads or 1, q_blocks, kv_blocks] (or [q_blocks, kv_blocks]).")
        layout = layout.copy()
        layout.setflags(write=False)
        object.__setattr__(self, "layout", layout)

    def token_mask(self, q_pos, k_pos):
        return (q_pos >= 0) | (k_pos >= 0)  # all visible within listed tiles

    @property
    def token_rule(self):
        return None

    def block_sizes(self, seq_q: int, seq_k: int) -> tuple[int, int]:
        """Block sizes implied by the layout; raises ``ValueError`` if they are not integral."""
        _, qb, kb = self.layout.shape
        if seq_q % qb or seq_k % kb:
            raise ValueError(
                f"mask: BlockLayoutMask layout shape {self.layout.shape} does not tile "
                f"seq_q={seq_q}, seq_k={seq_k}; q_blocks must divide seq_q and kv_blocks seq_k.")
        return seq_q // qb, seq_k // kb

    def block_layout(self, seq_q, seq_k, block_q, block_k):
        if self.block_sizes(seq_q, seq_k) != (block_q, block_k):
            raise ValueError(
                f"mask: BlockLayoutMask layout shape {self.layout.shape} implies blocks "
                f"{self.block_sizes(seq_q, seq_k)} but block_q={block_q}, block_k={block_k} were "
                "requested; leave block_q/block_k unset or match the layout.")
        return self.layout


# --------------------------------------------------------------------------- compression


def compress(layout: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Static layout ``[..., rows, cols]`` -> (indices ``[..., rows, max_nnz]``, counts ``[..., rows]``).

    Indices of each row ascend; entries past the count repeat the row's last
    valid index (0 for empty rows) so pipelined kernels fetch nothing new.
    """
    layout = np.asarray(layout, dtype=bool)
    cols = layout.shape[-1]
    counts = layout.sum(-1).astype(np.int32)
    max_nnz = max(1, int(counts.max(initial=0)))
    key = np.where(layout, 0, cols) + np.arange(cols)
    order = np.argsort(key, axis=-1, kind="stable")[..., :max_nnz].astype(np.int32)
    j = np.arange(max_nnz)
    last = np.take_along_axis(order, np.maximum(counts - 1, 0)[..., None], axis=-1)
    idx = np.where(j < counts[..., None], order, np.where(counts[..., None] > 0, last, 0))
    return idx.astype(np.int32), counts


def full_first(idx, cnt, full: np.ndarray):
    """Reorder each row's listed blocks so that those marked in ``full`` come first.

    ``idx`` ``[..., rows, n]`` and ``cnt`` ``[..., rows]`` as from :func:`compress`
    (numpy) or :func:`compress_dynamic` (traced); ``full`` is ``[rows, cols]``: the
    blocks where the token rule holds for every pair. Returns (indices, number of
    full blocks per row); the order within each group and the padding past the
    count are kept.
    """
    xp = np if isinstance(idx, np.ndarray) and isinstance(cnt, np.ndarray) else jnp
    n = idx.shape[-1]
    is_full = xp.asarray(full)[xp.arange(full.shape[0])[:, None], idx]
    valid = xp.arange(n) < cnt[..., None]
    key = xp.where(valid, xp.where(is_full, 0, 1), 2)
    order = (np.argsort(key, axis=-1, kind="stable") if xp is np
             else jnp.argsort(key, axis=-1, stable=True))
    return (xp.take_along_axis(idx, order, axis=-1).astype(np.int32),
            xp.sum(valid & is_full, axis=-1).astype(np.int32))


def index_mask(idx: jax.Array, n: int) -> jax.Array:
    """Bool ``[..., n]`` marking the indices ``idx`` ``[..., m]`` of each row (e.g. the
    picks of ``jax.lax.top_k``)."""
    return jnp.zeros(idx.shape[:-1] + (n,), bool).at[
        tuple(jnp.indices(idx.shape)[:-1]) + (idx,)].set(True)


def compress_dynamic(layout: jax.Array, max_nnz: int) -> tuple[jax.Array, jax.Array]:
    """Traced counterpart of :func:`compress` with a static ``max_nnz``: the most blocks
    any row can hold. Counts are capped at ``max_nnz`` so that no kernel reads past a list."""
    cols = layout.shape[-1]
    counts = jnp.minimum(jnp.sum(layout, axis=-1, dtype=jnp.int32), max_nnz)
    key = jnp.where(layout, 0, cols) + jnp.arange(cols)
    order = jnp.argsort(key, axis=-1, stable=True)[..., :max_nnz].astype(jnp.int32)
    last = jnp.take_along_axis(order, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
    j = jnp.arange(max_nnz)
    idx = jnp.where(j < counts[..., None], order, jnp.where(counts[..., None] > 0, last, 0))
    return idx.astype(jnp.int32), counts


def layout_for(mask: BlockMask, q: jax.Array, k: jax.Array, block_q: int, block_k: int):
    """Block layout of ``mask`` as 4-D ``[batch or 1, heads or 1, q_blocks, kv_blocks]``.

    Static masks give a numpy array; dynamic ones (top-k) a traced bool array.
    """
    if mask.dynamic:
        return mask.block_layout_dynamic(q, k, block_q, block_k)
    return np.asarray(mask.block_layout(q.shape[1], k.shape[1], block_q, block_k))[None]

