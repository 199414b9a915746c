"""On-device tile schedule for grouped matmul kernels, built from `group_sizes`.

The kernels walk a static-length list of *work items*. Work item `w` handles one
`tm`-row tile of `lhs` for one group: a tile that straddles a group boundary is
visited once per group it holds (with row masking in the kernel). Items are
ordered by group, then by tile, so the row-tile index never decreases: a TPU
output block is only ever revisited by consecutive grid steps.

Everything here is traced jax.numpy (no host round trip), so it runs under jit
with dynamic `group_sizes`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul import reference


class TileSchedule(NamedTuple):
    """Per-work-item metadata; all int32.

    group_ids: [num_items] group of each item (inactive items repeat the last one).
    tile_ids: [num_items] row-tile index of each item.
    starts, ends: [num_groups] first row and one-past-last row of each group.
    num_active: [1] number of leading items that do real work.
    """

    group_ids: jax.Array
    tile_ids: jax.Array
    starts: jax.Array
    ends: jax.Array
    num_active: jax.Array


def num_work_items(tiles_m: int, num_groups: int) -> int:
    """Static upper bound on work items.

    Non-empty contiguous groups touch at most `tiles_m + nonempty - 1` tiles in
    total (neighbours share at most one tile); visiting each empty group once
    adds at most `num_groups - nonempty`. So `tiles_m + num_groups` always fits.
    """
    return tiles_m + num_groups


def group_bounds(
    group_sizes: jax.Array, m: int, *, rows: int, trailing_group: bool
) -> tuple[jax.Array, jax.Array]:
    """Row ranges `[starts, ends)` of the groups after clipping sizes to `m`.

    With `trailing_group`, a virtual group `g` owning rows `[sum, rows)` is
    appended (used by gmm to write zeros to rows that belong to no group).
    """
    sizes = reference.effective_group_sizes(group_sizes, m)
    ends = jnp.cumsum(sizes).astype(jnp.int32)
    starts = ends - sizes
    if trailing_group:
        last = ends[-1:]
        starts = jnp.concatenate([starts, last])
        ends = jnp.concatenate([ends, jnp.full((1,), rows, jnp.int32)])
    return starts, ends


def make_tile_schedule(
    starts: jax.Array,
    ends: jax.Array,
    *,
    tm: int,
    tiles_m: int,
    visit_empty_groups: bool,
) -> TileSchedule:
    """Builds the work-item list for groups with row ranges `[starts, ends)`.

    visit_empty_groups: give each empty group one item (tgmm must zero its
      output block); otherwise empty groups cost nothing.
    """
    num_groups = starts.shape[0]
    sizes = ends - starts
    first = jnp.minimum(starts // tm, tiles_m - 1)
    last = (jnp.maximum(ends, 1) - 1) // tm
    tiles = jnp.where(sizes > 0, last - first + 1, 1 if visit_empty_groups else 0)
    cum = jnp.cumsum(tiles).astype(jnp.int32)  # [G]
    offsets = cum - tiles
    total = cum[-1]

    num_items = num_work_items(tiles_m, num_groups)
    w = jnp.arange(num_items, dtype=jnp.int32)
    # Inactive items (w >= total) repeat the last active item so TPU block
    # indices stay put and nothing is re-fetched or written back.
    w = jnp.minimum(w, jnp.maximum(total - 1, 0))
    group_ids = jnp.searchsorted(cum, w, side="right").astype(jnp.int32)
    group_ids = jnp.minimum(group_ids, num_groups - 1)
    tile_ids = first[group_ids] + (w - offsets[group_ids])
    tile_ids = jnp.clip(tile_ids, 0, tiles_m - 1).astype(jnp.int32)
    return TileSchedule(
        group_ids=group_ids,
        tile_ids=tile_ids,
        starts=starts.astype(jnp.int32),
        ends=ends.astype(jnp.int32),
        num_active=total.reshape(1).astype(jnp.int32),
    )
