"""Sparsity structures: how a layer's scores become a mask with a target number of kept
entries. Registered by name in `STRUCTURES` (`MaskedPruningMethod.structure = 'nm'`); the
parametrized ones are gin-configurable classes (`NMStructure.n = 2`).

* ``unstructured``: the best entries of each layer;
* ``global``: the best entries over all layers together (one threshold);
* ``per_output``: each output unit (kernel column) keeps the same fraction of its inputs,
  as Wanda and SparseGPT compare weights;
* ``nm``: N of every M consecutive entries along an axis (density fixed at N/M);
* ``block``: whole [bh, bw] blocks of a 2-D kernel, scored by the sum of their entries;
  the best blocks of the layer, or with ``BlockStructure.per_column`` the same number of
  blocks in every output block column (a constant fan-in: the structure the compact
  ``block_sparse`` weight format stores, `prune --compact`).
"""
from __future__ import annotations

from typing import Any, Mapping

import gin
import jax
import jax.numpy as jnp

from sparsejax.registry import Registry
from sparsejax.sparsity import nm as nm_lib
from sparsejax.sparsity import paths as paths_lib
from sparsejax.sparsity import select

PyTree = Any


class Structure:
    """Base: unstructured top-k within each layer."""

    fixed_density: float | None = None  # a density the structure imposes (N:M)
    supports_drop_grow = True

    def check(self, path: str, shape: tuple[int, ...]) -> None:
        """Raises a ValueError if a prunable param of `shape` cannot have this structure."""

    def select(self, scores: PyTree, masks: PyTree, counts: Mapping[str, jax.Array], *,
               scale, alive_only: bool, valid: PyTree | None = None) -> PyTree:
        """New masks keeping `counts[path]` entries of each layer (`scale` is the schedule's
        fraction of the final sparsity, 0 = dense)."""
        return select.layerwise_topk(scores, masks, counts, alive_only, valid)


STRUCTURES: Registry[type[Structure]] = Registry("structure")


@STRUCTURES.register("unstructured")
class Unstructured(Structure):
    """Any entries: the best of each layer (per-layer density from the distribution)."""


@STRUCTURES.register("global")
class Global(Structure):
    """Any entries, one ranking over all layers (the distribution sets only the total)."""

    def select(self, scores, masks, counts, *, scale, alive_only, valid=None):
        total = sum(counts.values())
        return select.global_topk(scores, masks, total, alive_only, valid)


@STRUCTURES.register("per_output")
class PerOutput(Structure):
    """Each output unit (last axis of a kernel) keeps the same fraction of its inputs."""

    supports_drop_grow = False

    def check(self, path, shape):
        if len(shape) < 2:
            raise ValueError(f"structure 'per_output': params[{path!r}] has shape {shape}; it "
                             f"needs a kernel of rank >= 2")

    def select(self, scores, masks, counts, *, scale, alive_only, valid=None):
        out = []
        valid_leaves = [None] * len(jax.tree.leaves(masks)) if valid is None else \
            jax.tree.leaves(valid)
        for (path, m), s, v in zip(paths_lib.named_leaves(masks), jax.tree.leaves(scores),
                                   valid_leaves):
            s = select.ranked(s, m, alive_only, v)
            cols = jnp.moveaxis(s, -1, 0).reshape(s.shape[-1], -1)  # [out, in...]
            valid_cols = s.shape[-1] if v is None else jnp.sum(jnp.any(v.reshape(-1, s.shape[-1]), 0))
            k = jnp.round(counts[path] / valid_cols).astype(jnp.int32)
            keep = jax.vmap(lambda c: select.topk_mask(c, k))(cols)
            keep = jnp.moveaxis(keep.reshape((s.shape[-1],) + s.shape[:-1]), 0, -1)
            out.append(keep if v is None else keep & v)
        return select.unflatten_like(masks, out)


@gin.configurable
@STRUCTURES.register("nm")
class NMStructure(Structure):
    """N:M: N kept of every M consecutive entries along `axis` (density N/M)."""

    supports_drop_grow = False

    def __init__(self, n: int = 2, m: int = 4, axis: int = -2):
        nm_lib.check_nm(n, m)
        self.n, self.m, self.axis = int(n), int(m), int(axis)
        self.fixed_density = self.n / self.m

    def check(self, path, shape):
        nm_lib.check_groupable(shape, self.m, self.axis, f"params[{path!r}]")

    def select(self, scores, masks, counts, *, scale, alive_only, valid=None):
        dense = jnp.asarray(scale) <= 0
        new = jax.tree.map(
            lambda s: jnp.where(dense, True, nm_lib.nm_topk(s, self.n, self.m, self.axis)),
            scores)
        return new if valid is None else jax.tree.map(lambda a, v: a & v, new, valid)


@gin.configurable
@STRUCTURES.register("block")
class BlockStructure(Structure):
    """Whole [bh, bw] blocks of 2-D kernels [in, out], ranked by the sum of their scores.

    `per_column=False`: the layer's best blocks, however they fall. `per_column=True`: in
    every output block column (bw output units) the same number of its best blocks,
    `round(kept count / (bh * bw * output block columns))` clamped to [1, input blocks]:
    a constant fan-in, as the compact `block_sparse` format (models/formats/block_sparse.py,
    `k = round(density * in_blocks)`) stores it (not with drop/grow schedules)."""

    def __init__(self, block: tuple[int, int] = (4, 4), per_column: bool = False):
        if len(tuple(block)) != 2 or min(block) < 1:
            raise ValueError(f"BlockStructure.block={block!r} must be two positive ints")
        if not isinstance(per_column, bool):
            raise ValueError(f"BlockStructure.per_column={per_column!r} must be True or False")
        self.block = tuple(int(b) for b in block)
        self.per_column = per_column
        # drop/grow counts blocks per layer; moving blocks per column is block DST's
        # (make_method.name='block_dst' on compact weights)
        self.supports_drop_grow = not per_column

    def check(self, path, shape):
        bh, bw = self.block
        if len(shape) != 2 or shape[0] % bh or shape[1] % bw:
            raise ValueError(f"BlockStructure.block={self.block}: params[{path!r}] has shape "
                             f"{shape}; block sparsity needs a 2-D kernel whose dims are "
                             f"multiples of the block")

    def _blocks(self, x):
        bh, bw = self.block
        return x.reshape(x.shape[0] // bh, bh, x.shape[1] // bw, bw)

    def _expand(self, b):
        bh, bw = self.block
        return jnp.repeat(jnp.repeat(b, bh, axis=0), bw, axis=1)

    def select(self, scores, masks, counts, *, scale, alive_only, valid=None):
        area = self.block[0] * self.block[1]
        out = []
        valid_leaves = [None] * len(jax.tree.leaves(masks)) if valid is None else \
            jax.tree.leaves(valid)
        for (path, m), s, v in zip(paths_lib.named_leaves(masks), jax.tree.leaves(scores),
                                   valid_leaves):
            bs = self._blocks(s.astype(jnp.float32)).sum(axis=(1, 3))
            alive = self._blocks(m).any(axis=(1, 3))
            ok = None if v is None else self._blocks(v).any(axis=(1, 3))
            ranked = select.ranked(bs, alive, alive_only, ok)  # [in_blocks, out_blocks]
            if self.per_column:
                ib, ob = bs.shape
                k = jnp.clip(jnp.round(counts[path] / (area * ob)), 1, ib).astype(jnp.int32)
                keep = jax.vmap(lambda c: select.topk_mask(c, k), in_axes=1, out_axes=1)(ranked)
            else:
                keep = select.topk_mask(ranked, jnp.round(counts[path] / area).astype(jnp.int32))
            full = self._expand(keep)
            out.append(full if v is None else full & v)
        return select.unflatten_like(masks, out)
