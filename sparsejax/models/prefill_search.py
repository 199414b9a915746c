"""MInference's offline pattern search (Jiang et al., NeurIPS 2024, microsoft/MInference):
each attention head gets the MInference pattern whose block layout keeps the most of its dense
attention on calibration rows.

For every layer and query head, the *recall* of a pattern ('vertical_slash', 'block_sparse',
'a_shape') is the fraction of the dense causal attention probability mass (softmax over the
keys at or before each query within its packed segment, the attention the dense model
computes) that falls inside the tiles the pattern's layout keeps, averaged over the real
queries of all rows. The layouts are the online ones: `MInferenceMask.block_layout_dynamic` of
a single-pattern mask with the template's budgets, on the same q and k. A head gets the pattern
of highest recall; patterns within `TIE_TOLERANCE` of it tie, and the tie goes to the one that
keeps fewer tiles (then to the cheaper estimate, in `CHEAPEST_FIRST` order).

The budgets (`vertical_size`, `slash_size`, `top_k`, `a_shape_blocks`, ...) are the template's,
so the search compares the patterns at the cost they are given: the result reports each
pattern's *density* (kept tiles / causal tiles) beside its recall. `prefill_method_spec` turns
the result into the `attention_kernel.prefill_method` that runs it (`layer_patterns`, one
entry per layer), `gin_text` into the gin file that binds it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse_attention import dynamic
from pallas_kernels.block_sparse_attention.minference import PATTERNS, MInferenceMask

TIE_TOLERANCE = 1e-6  # recalls this close are equal
CHEAPEST_FIRST = ("a_shape", "block_sparse", "vertical_slash")  # static, pooled, last-q scores
SEARCHED = ("pattern", "layer_patterns", "layer", "length")  # MInferenceMask fields it sets


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """Per layer: the chosen pattern of each query head (`patterns`; None for a layer the
    search skipped), and every pattern's recall and density, ``[layers, patterns, heads]``
    (pattern axis in `PATTERNS` order; NaN on skipped layers)."""

    patterns: tuple[tuple[str, ...] | None, ...]
    recall: np.ndarray
    density: np.ndarray

    def chosen(self, table: np.ndarray) -> np.ndarray:
        """``[layers, heads]``: `table` (recall or density) at each head's chosen pattern."""
        out = np.full((table.shape[0], table.shape[2]), np.nan)
        for layer, names in enumerate(self.patterns):
            if names is not None:
                idx = [PATTERNS.index(n) for n in names]
                out[layer] = table[layer, idx, np.arange(len(names))]
        return out


def single_pattern(template: MInferenceMask, pattern: str) -> MInferenceMask:
    """The template's budgets with one pattern for every head."""
    return dataclasses.replace(template, pattern=pattern, layer_patterns=(), layer=-1, length=0)


def tile_mass(q: jax.Array, k: jax.Array, segment_ids: jax.Array, block: int) -> jax.Array:
    """Dense causal attention mass per tile, ``[b, heads, q_blocks, k_blocks]``: the softmax
    weights (keys at or before the query, same segment) summed over each tile's queries and
    keys. Each real query's weights sum to 1; padding queries (segment 0) count 0. Computed one
    query block at a time, so memory grows with ``seq`` rather than ``seq**2``."""
    b, s, h, d = q.shape
    qb = s // block
    kf = dynamic.expand_kv(k, h).astype(jnp.float32)
    qf = q.astype(jnp.float32).reshape(b, qb, block, h, d)
    seg = segment_ids.astype(jnp.int32)
    kpos = jnp.arange(s)

    def one(i):
        logits = jnp.einsum("bqhd,bkhd->bhqk", qf[:, i], kf) / math.sqrt(d)
        qpos = i * block + jnp.arange(block)
        qseg = jax.lax.dynamic_slice_in_dim(seg, i * block, block, axis=1)
        vis = (kpos[None, None] <= qpos[None, :, None]) & (seg[:, None, :] == qseg[:, :, None])
        p = jax.nn.softmax(jnp.where(vis[:, None], logits, -jnp.inf), axis=-1)
        p = p * (qseg > 0)[:, None, :, None]
        return dynamic.block_sum(p.sum(2), block)  # [b, h, k_blocks]

    return jnp.moveaxis(jax.lax.map(one, jnp.arange(qb)), 0, 2)


@functools.partial(jax.jit, static_argnames=("template", "block"))
def _row_stats(q, k, segment_ids, template, block):
    """(mass inside each pattern's layout ``[P, h]``, its kept tiles ``[P, h]``, real queries)."""
    mass = tile_mass(q, k, segment_ids, block)
    layouts = jnp.stack([single_pattern(template, p).block_layout_dynamic(q, k, block, block)
                         for p in PATTERNS])  # [P, b, h, qb, qb]
    inside = jnp.sum(jnp.where(layouts, mass[None], 0.0), axis=(1, 3, 4))
    tiles = jnp.sum(layouts, axis=(1, 3, 4)).astype(jnp.float32)
    return inside, tiles, jnp.sum(segment_ids > 0).astype(jnp.float32)


def head_recall(q: jax.Array, k: jax.Array, template: MInferenceMask, block: int,
                segment_ids: jax.Array | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(recall, density), each ``[patterns, heads]`` in `PATTERNS` order, of one layer's q
    ``[b, s, h, d]`` and k ``[b, s, kv_h, d]`` (post-RoPE). One row at a time: the layouts
    are per row and head, so this equals the whole batch at once."""
    b, s = q.shape[:2]
    if block < 1 or s % block:
        raise ValueError(f"block_size={block} must be a positive divisor of the sequence "
                         f"length {s}")
    seg = (np.ones((b, s), np.int32) if segment_ids is None
           else np.asarray(segment_ids, np.int32))
    inside = tiles = queries = 0.0
    for r in range(b):
        i, t, n = _row_stats(q[r:r + 1], k[r:r + 1], seg[r:r + 1], template, block)
        inside, tiles, queries = inside + np.asarray(i), tiles + np.asarray(t), queries + float(n)
    qb = s // block
    recall = inside / max(queries, 1.0)
    density = tiles / (b * qb * (qb + 1) / 2)
    return recall, density


def choose(recall: np.ndarray, density: np.ndarray) -> tuple[str, ...]:
    """Per head (columns of ``[patterns, heads]`` tables): the pattern of highest recall;
    within `TIE_TOLERANCE` of it, the one keeping fewer tiles, then the cheaper estimate."""
    out = []
    for h in range(recall.shape[1]):
        best = recall[:, h].max()
        tied = [p for i, p in enumerate(PATTERNS) if recall[i, h] >= best - TIE_TOLERANCE]
        out.append(min(tied, key=lambda p: (density[PATTERNS.index(p), h],
                                            CHEAPEST_FIRST.index(p))))
    return tuple(out)


def search_patterns(qk: Sequence[tuple[jax.Array, jax.Array] | None], template: MInferenceMask,
                    block: int, segment_ids: jax.Array | None = None) -> SearchResult:
    """The search over layers: `qk` holds each layer's (q, k) on the calibration rows, or None
    for a layer that does not run the prefill method (skipped); `segment_ids` ``[b, s]`` are
    the rows' (0: padding; None: one segment per row)."""
    check_template(template)
    heads = next((x[0].shape[2] for x in qk if x is not None), None)
    if heads is None:
        raise ValueError("the pattern search got no layer to search (every entry is None)")
    n = len(PATTERNS)
    recall = np.full((len(qk), n, heads), np.nan)
    density = np.full((len(qk), n, heads), np.nan)
    patterns: list[tuple[str, ...] | None] = []
    for layer, pair in enumerate(qk):
        if pair is None:
            patterns.append(None)
            continue
        recall[layer], density[layer] = head_recall(pair[0], pair[1], template, block,
                                                    segment_ids)
        patterns.append(choose(recall[layer], density[layer]))
    return SearchResult(tuple(patterns), recall, density)


def check_template(template: MInferenceMask) -> None:
    """The template gives budgets only: the search sets the patterns."""
    if not isinstance(template, MInferenceMask):
        raise ValueError(f"the pattern search needs an MInferenceMask template, got "
                         f"{type(template).__name__}")
    default = MInferenceMask()
    set_ = [f for f in SEARCHED if getattr(template, f) != getattr(default, f)]
    if set_:
        raise ValueError(f"MInferenceMask.{set_[0]}={getattr(template, set_[0])!r}: the pattern "
                         f"search chooses the patterns; give budgets only")


def budgets(template: MInferenceMask) -> dict[str, Any]:
    """Every setting of the template but the searched fields (what the result runs with)."""
    return {f.name: getattr(template, f.name) for f in dataclasses.fields(template)
            if f.name not in SEARCHED}


def prefill_method_spec(result: SearchResult, template: MInferenceMask,
                        block: int) -> dict[str, Any]:
    """The `attention_kernel.prefill_method` that runs the result: kind 'minference', the
    template's budgets, `block_size` and one `layer_patterns` entry per layer (a skipped
    layer, which never reads its entry, gets 'a_shape')."""
    entries = tuple("a_shape" if names is None else names for names in result.patterns)
    return {"kind": "minference", "block_size": block, **budgets(template),
            "layer_patterns": entries}


def gin_text(spec: dict[str, Any], header: str = "") -> str:
    """A gin file binding ``attention_kernel.prefill_method = spec`` (one layer's patterns a
    line), after `header` lines as comments."""
    lines = [f"# {line}" for line in header.splitlines()]
    lines.append("attention_kernel.prefill_method = {")
    for key, value in spec.items():
        if key == "layer_patterns":
            lines.append(f"    {key!r}: (")
            lines += [f"        {entry!r}," for entry in value]
            lines.append("    ),")
        else:
            lines.append(f"    {key!r}: {value!r},")
    lines.append("}")
    return "\n".join(lines) + "\n"
