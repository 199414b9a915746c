"""The block-sparse format: `k` stored blocks per output block column (constant fan-in).

Params of a projection [in, out] with blocks (block_in, block_out):
  values  [out_blocks, k, block_in, block_out]   (float; trained)
  indices [out_blocks, k] int32                  (the input block of each stored block; the
                                                  run keeps it beside the masks)
and x @ W runs through `pallas_kernels.block_sparse_matmul` (FLOPs, bytes and optimizer
state scale with k / in_blocks). With `distribution='uniform'` (the default) every projection
stores the same fraction, `k = max(1, round(density * in_blocks))`; another distribution of
sparsity/distributions.py ('erk', 'erdos_renyi') spreads `density` over the model's
block-sparse projections (`fan_in`: the stored fraction of all of them together is `density`
up to rounding, and a projection that needs at least one block per column takes it out of the
others' share). The layout at init holds `k` distinct input blocks per column chosen at random or
by the Frobenius norm of the dense layer's initial draw (`init`). Values are the blocks of
that dense draw (the dense layer's distribution), so a compact layer and its masked-dense
twin start from the same weights.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse_matmul import block_sparse_matmul, check_indices
from pallas_kernels.block_sparse_matmul.reference import to_dense
from sparsejax.models.formats import WEIGHT_FORMATS, WeightFormat
from sparsejax.models.init import DEFAULT_KERNEL_INIT, zero_padding
from sparsejax.sparsity.distributions import DISTRIBUTIONS, layer_densities

INITS = ("random", "magnitude")


def block_norms(kernel: jax.Array, block_in: int, block_out: int) -> jax.Array:
    """[in_blocks, out_blocks] Frobenius norms of a [in, out] kernel's blocks."""
    i, o = kernel.shape
    b = kernel.astype(jnp.float32).reshape(i // block_in, block_in, o // block_out, block_out)
    return jnp.sqrt(jnp.sum(b * b, axis=(1, 3)))


def top_blocks(scores: jax.Array, k: int) -> jax.Array:
    """[out_blocks, k] int32: per output block column, the k input blocks of highest score
    ([in_blocks, out_blocks] scores), in ascending block order."""
    idx = jax.lax.top_k(scores.T, k)[1]
    return jnp.sort(idx, axis=-1).astype(jnp.int32)


def gather_blocks(kernel: jax.Array, indices: jax.Array, block_in: int,
                  block_out: int) -> jax.Array:
    """values [out_blocks, k, block_in, block_out]: the blocks of kernel [in, out] at indices."""
    i, o = kernel.shape
    b = kernel.reshape(i // block_in, block_in, o // block_out, block_out).transpose(2, 0, 1, 3)
    return jnp.take_along_axis(b, indices[:, :, None, None], axis=1)


def fan_in(shapes: Mapping[str, tuple[int, int]], density: float, distribution: str,
           block_in: int, block_out: int) -> dict[str, int]:
    """{path: k} for projections of dense shapes {path: (in, out)}: the fan-in in blocks of
    each when `distribution` spreads `density` over them, every k in [1, in_blocks].

    A projection whose share would round to no block keeps one, and the others share what is
    left (repeated until none falls below one block). Projections of one shape get one k (the
    layers of a scanned model are stacked): each shape's share is rounded down, then rounded
    up, largest remainders first, wherever that brings the stored total nearer `density` of
    all the weights."""
    in_blocks = {p: i // block_in for p, (i, _) in shapes.items()}
    size = {p: i * o for p, (i, o) in shapes.items()}
    floor: set[str] = set()
    while True:
        free = {p: shapes[p] for p in shapes if p not in floor}
        left = density * sum(size.values()) - sum(size[p] / in_blocks[p] for p in floor)
        if not free or left <= 0:
            floor.update(free)
            free = {}
            break
        dens = layer_densities(free, min(1.0, left / sum(size[p] for p in free)), distribution)
        low = {p for p in free if dens[p] * in_blocks[p] < 0.5}
        if not low:
            break
        floor |= low
    by_shape: dict[tuple[int, int], list[str]] = {}
    for p in free:
        by_shape.setdefault(shapes[p], []).append(p)
    share = {s: dens[m[0]] * in_blocks[m[0]] for s, m in by_shape.items()}  # exact, in blocks
    k = {s: int(min(in_blocks[m[0]], max(1, np.floor(share[s])))) for s, m in by_shape.items()}
    block_cost = {s: len(m) * s[1] * block_in for s, m in by_shape.items()}  # one more block
    total = (sum(k[s] * block_cost[s] for s in by_shape)
             + sum(size[p] / in_blocks[p] for p in floor))
    target = density * sum(size.values())
    for s in sorted(by_shape, key=lambda s: (-(share[s] - np.floor(share[s])), s)):
        if k[s] < in_blocks[by_shape[s][0]] and abs(total + block_cost[s] - target) < abs(
                total - target):
            k[s] += 1
            total += block_cost[s]
    out = {p: 1 for p in floor}
    out.update({p: k[s] for s, members in by_shape.items() for p in members})
    return {p: out[p] for p in shapes}


def block_mask(indices: jax.Array, in_features: int, block_in: int,
               block_out: int) -> jax.Array:
    """The bool [in, out] mask of a layout: True inside the stored blocks."""
    ob, k = indices.shape
    ones = jnp.ones((ob, k, block_in, block_out), jnp.bool_)
    return to_dense(ones, indices, in_features // block_in)


@gin.configurable
@WEIGHT_FORMATS.register("block_sparse")
class BlockSparse(WeightFormat):
    """Constant fan-in block-sparse weights: values [out_blocks, k, bi, bo] + int32 indices."""

    param_names = ("values", "indices")

    def __init__(self, block_in: int = 32, block_out: int = 32, density: float = 0.1,
                 init: str = "random", backend: str | None = None,
                 distribution: str = "uniform"):
        for name, b in (("block_in", block_in), ("block_out", block_out)):
            if not isinstance(b, int) or b < 1:
                raise ValueError(f"BlockSparse.{name}={b!r} must be a positive int")
        if not 0.0 < float(density) <= 1.0:
            raise ValueError(f"BlockSparse.density={density!r} must be in (0, 1]")
        if init not in INITS:
            raise ValueError(f"BlockSparse.init={init!r} is not valid; valid: {INITS}")
        DISTRIBUTIONS.get(distribution, "BlockSparse.distribution")
        self.block_in, self.block_out = block_in, block_out
        self.density, self.init, self.backend = float(density), init, backend
        self.distribution = distribution
        self.k: int | None = None  # this projection's planned fan-in (`at`)

    @property
    def plans_layers(self) -> bool:
        return self.distribution != "uniform"

    def plan(self, shapes):
        """{path: k} spread by `distribution` over the model's block-sparse projections
        (`fan_in`); none under 'uniform', where each projection keeps `density` itself."""
        if not self.plans_layers:
            return {}
        for i, o in shapes.values():
            self.blocks(i, o)  # block sizes that do not divide are refused by name
        return fan_in(shapes, self.density, self.distribution, self.block_in, self.block_out)

    def at(self, setting):
        fmt = copy.copy(self)
        fmt.k = int(setting)
        return fmt

    def blocks(self, in_features: int, features: int) -> tuple[int, int, int]:
        """(in_blocks, out_blocks, k) of a [in_features, features] projection: k planned for
        this projection (`at`), or `density` of its input blocks."""
        for name, n, b in (("in", in_features, self.block_in), ("out", features, self.block_out)):
            if n % b:
                raise ValueError(f"BlockSparse.block_{name}={b} does not divide the "
                                 f"projection's {name}_features={n}")
        ib, ob = in_features // self.block_in, features // self.block_out
        k = self.k if self.k is not None else round(self.density * ib)
        return ib, ob, max(1, min(ib, k))

    def draw(self, key: jax.Array, in_features: int, features: int, dtype: Any,
             real_features: int | None) -> tuple[jax.Array, jax.Array]:
        """(values, indices) at init: blocks of the dense layer's initial draw."""
        ib, ob, k = self.blocks(in_features, features)
        w_key, pick_key = jax.random.split(key)
        kernel = zero_padding(DEFAULT_KERNEL_INIT, -1, real_features)(
            w_key, (in_features, features), dtype)
        if self.init == "magnitude":
            scores = block_norms(kernel, self.block_in, self.block_out)
        else:
            scores = jax.random.uniform(pick_key, (ib, ob))
        indices = top_blocks(scores, k)
        return gather_blocks(kernel, indices, self.block_in, self.block_out), indices

    def __call__(self, module, x, *, features, axes, dtype, param_dtype, real_features):
        ib, ob, k = self.blocks(x.shape[-1], features)
        drawn = (self.draw(module.make_rng("params"), x.shape[-1], features, param_dtype,
                           real_features) if module.is_initializing() else (None, None))
        values = module.param("values", nn.with_logical_partitioning(
            lambda _: drawn[0], ("out_blocks", None, None, None)))
        indices = module.param("indices", nn.with_logical_partitioning(
            lambda _: drawn[1], ("out_blocks", None)))
        y = block_sparse_matmul(x.astype(dtype), values.astype(dtype), indices,
                                backend=self.backend)
        return y

    def to_dense(self, params: Mapping[str, jax.Array], in_features: int) -> jax.Array:
        """W [in, out], zeros outside the stored blocks; the block size is the values' own
        (params written under other BlockSparse settings convert all the same)."""
        return to_dense(params["values"], params["indices"],
                        in_features // params["values"].shape[-2])

    def from_dense(self, kernel: jax.Array, *, indices: Any = None, mask: Any = None,
                   project: bool = False, **kwargs: Any) -> dict[str, jax.Array]:
        """The compact params of `kernel` [in, out] at `indices` (default: the blocks where
        `mask`, or else the kernel, has a nonzero entry; they must number the same in every
        column). Exact when every entry of the kernel outside the stored blocks is zero;
        otherwise refused, unless `project`: then (without `indices`) each output block
        column keeps the k = density * in_blocks input blocks of largest Frobenius norm (the
        nearest layout of this density in Frobenius norm) and the other blocks are dropped,
        e.g. to convert a trained dense kernel."""
        kernel = jnp.asarray(kernel)
        ib, ob, k = self.blocks(*kernel.shape)
        if indices is None and project:
            indices = top_blocks(block_norms(kernel, self.block_in, self.block_out), k)
        if indices is None:
            where = kernel if mask is None else jnp.asarray(mask, jnp.float32)
            nz = np.asarray(block_norms(where, self.block_in, self.block_out) > 0)  # [ib, ob]
            counts = nz.sum(axis=0)
            if counts.min() != counts.max():
                raise ValueError(f"kernel {kernel.shape}: its nonzero blocks are not a constant "
                                 f"fan-in ({counts.min()}..{counts.max()} per output block "
                                 f"column of {self.block_out}); pass indices= or project=True")
            k = max(int(counts.max()), 1)
            scores = nz.astype(np.float32) + np.linspace(0, 0.5, ib)[:, None] * (1 - nz)
            indices = top_blocks(jnp.asarray(scores), k)
        indices = jnp.asarray(indices, jnp.int32)
        check_indices(indices, ib)
        values = gather_blocks(kernel, indices, self.block_in, self.block_out)
        mask = block_mask(indices, kernel.shape[0], self.block_in, self.block_out)
        if not project and bool(jnp.any(jnp.where(mask, 0, kernel) != 0)):
            raise ValueError("kernel has nonzero entries outside the blocks at `indices`: the "
                             "compact format would drop them (project=True drops them on "
                             "purpose)")
        return {"values": values, "indices": indices}
