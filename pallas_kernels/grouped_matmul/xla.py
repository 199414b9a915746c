"""XLA formulation of `gmm` / `tgmm` for CPU: work proportional to the routed rows.

XLA:CPU runs `jax.lax.ragged_dot` with a `[g, m, n]` intermediate, i.e. work and memory of
groups x rows: at 64 experts the dropless MoE layer was 20-30x slower than one-hot dispatch.
Here the rows are copied into a *padded layout* in which every group starts on a tile
boundary (MegaBlocks' padding): at most `ceil(m / tm) + min(g, m) - 1` tiles of `tm` rows,
each owned by exactly one group, so the grouped matmul is one batched dense matmul
`[tiles, tm, k] @ [tiles, k, n]` with each tile's group weights gathered, and `tgmm` is a
batched `[tiles, k, tm] @ [tiles, tm, n]` summed per group. Padding rows are zeros, so no
tile mixes groups and nothing is masked: rows in no group are never read (inf/NaN there
cannot leak).

A visit list over unpadded row tiles (the Pallas kernels' `metadata.make_tile_schedule`:
tiles straddling a boundary visited once per group, masked, then summed) does the same number
of tile matmuls; in the MoE layer's forward + backward on a 2-core CPU (benchmarks/
moe_dispatch.py --quick shapes) it measured 1.0-1.2x this layout's time at 8 experts and
1.15-1.4x at 64 (the masking and the scatter-add over straddling tiles cost more than the
row gathers).

Group sizes are clipped as in `reference.effective_group_sizes`: rows past the last group
give zeros in `gmm` and are ignored by `tgmm`. Plain jax.numpy, so it runs under `jit` with
traced sizes; ops.py wraps `gmm` in a custom VJP (d lhs = gmm with rhs transposed,
d rhs = tgmm), which measured faster than autodiff through the gathers.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul import reference


class PaddedLayout(NamedTuple):
    """Where each row goes in the padded layout; all int32.

    dest: [m] padded slot of every row (`tiles * tm`, out of range, for rows in no group).
    src: [tiles * tm] source row of every slot (`m`, out of range, for padding slots).
    tile_groups: [tiles] group that owns each tile (unused tiles: the last group, all zero).
    """

    dest: jax.Array
    src: jax.Array
    tile_groups: jax.Array


def num_tiles(m: int, num_groups: int, tm: int) -> int:
    """Static bound on padded tiles: each of the <= min(g, m) non-empty groups adds at most
    one partly filled tile to the ceil(m / tm) a dense layout needs."""
    return max(1, -(-m // tm) + min(num_groups, m) - 1)


def default_tile_rows(m: int, num_groups: int, k: int, n: int) -> int:
    """Rows per tile, a power of two in [8, 256].

    A tile costs about `alpha + tm` row-matmuls (alpha: fixed per-tile cost, larger for
    larger `k * n`), and there are about `m / tm + g` tiles, so the total is smallest at
    `tm = sqrt(alpha * m / g)`. alpha = 16 * max(1, sqrt(k * n) / 128) fits what a 2-core
    CPU measured: best tm 32 at (m, g, k, n) = (1024, 8, 64, 256), (4096, 64, 64, 64) and
    (2048, 32, 128, 128); 128-256 at (8192, 8, 512, 512).
    """
    alpha = 16.0 * max(1.0, math.sqrt(k * n) / 128.0)
    best = math.sqrt(alpha * m / max(num_groups, 1))
    low = 1 << int(math.log2(max(best, 1.0)))  # power of two <= best; round to the nearer
    tm = max(8, min(256, low * 2 if best > low * math.sqrt(2.0) else low))  # one (ties: down)
    return min(tm, max(8, 1 << (m - 1).bit_length()))  # no tile much larger than m


def padded_layout(group_sizes: jax.Array, m: int, tm: int) -> PaddedLayout:
    """Builds the row <-> slot maps for `m` rows split by `group_sizes [g]` (traced)."""
    g = group_sizes.shape[0]
    tiles = num_tiles(m, g, tm)
    sizes = reference.effective_group_sizes(group_sizes, m)
    ends = jnp.cumsum(sizes)
    padded = (sizes + tm - 1) // tm * tm
    padded_ends = jnp.cumsum(padded)
    # group of each row (g for rows past the last group) and its offset inside the group
    rows = jnp.arange(m, dtype=jnp.int32)
    row_group = jnp.searchsorted(ends, rows, side="right").astype(jnp.int32)
    grp = jnp.minimum(row_group, g - 1)
    shift = (padded_ends - padded) - (ends - sizes)  # slot start - row start, per group
    dest = jnp.where(row_group < g, rows + shift[grp], tiles * tm).astype(jnp.int32)
    src = jnp.full((tiles * tm,), m, jnp.int32).at[dest].set(rows, mode="drop")
    tile_groups = jnp.searchsorted(
        padded_ends // tm, jnp.arange(tiles, dtype=jnp.int32), side="right"
    )
    return PaddedLayout(dest, src, jnp.minimum(tile_groups, g - 1).astype(jnp.int32))


def _to_tiles(x: jax.Array, layout: PaddedLayout, tm: int) -> jax.Array:
    """Rows [m, c] -> padded tiles [tiles, tm, c], zeros in padding slots."""
    tiled = jnp.take(x, layout.src, axis=0, mode="fill", fill_value=0)
    return tiled.reshape(-1, tm, x.shape[1])


def gmm_xla(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    tm: int,
    transpose_rhs: bool = False,
    out_dtype: jnp.dtype | None = None,
) -> jax.Array:
    """out[r] = lhs[r] @ rhs[group(r)] (rhs [g, k, n], or [g, n, k] with transpose_rhs).

    lhs: [m, k] rows sorted by group; group_sizes: [g] int32 -> [m, n] in out_dtype
    (default lhs.dtype), accumulated in float32; rows in no group are zero.
    """
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    m, k = lhs.shape
    g = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    if min(m, k, n, g) == 0:
        return jnp.zeros((m, n), out_dtype)
    layout = padded_layout(group_sizes, m, tm)
    spec = "wtk,wnk->wtn" if transpose_rhs else "wtk,wkn->wtn"
    y = jnp.einsum(
        spec,
        _to_tiles(lhs, layout, tm),
        jnp.take(rhs, layout.tile_groups, axis=0),
        preferred_element_type=jnp.float32,
    ).reshape(-1, n)
    return jnp.take(y, layout.dest, axis=0, mode="fill", fill_value=0).astype(out_dtype)


def tgmm_xla(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    *,
    tm: int,
    out_dtype: jnp.dtype | None = None,
) -> jax.Array:
    """out[i] = lhs[rows_i]ᵀ @ grad[rows_i]; lhs [m, k], grad [m, n] -> [g, k, n].

    Accumulated in float32; empty groups give zeros, rows in no group are ignored.
    """
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    m, k = lhs.shape
    n = grad.shape[1]
    g = group_sizes.shape[0]
    if min(m, k, n, g) == 0:
        return jnp.zeros((g, k, n), out_dtype)
    layout = padded_layout(group_sizes, m, tm)
    per_tile = jnp.einsum(
        "wtk,wtn->wkn",
        _to_tiles(lhs, layout, tm),
        _to_tiles(grad, layout, tm),
        preferred_element_type=jnp.float32,
    )
    out = jax.ops.segment_sum(per_tile, layout.tile_groups, g, indices_are_sorted=True)
    return out.astype(out_dtype)
