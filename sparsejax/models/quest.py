"""Quest decode (query-aware KV page selection, mit-han-lab/Quest): at a decode step each query
head attends only to the cache pages whose keys can score highest.

The KV cache (infer/cache.py) is cut into pages of `page_size` slots; for each page and KV head
it keeps the elementwise minimum and maximum of the keys written there (`page_min`,
`page_max` [batch, pages, kv_heads, head_dim]; empty and padding slots left out). A query q
bounds the score of any key of a page by sum_d max(q_d * min_d, q_d * max_d); the
`budget_pages - sink_pages - recent_pages` pages of highest bound are chosen, together with
the first `sink_pages` pages and the `recent_pages` pages ending at the query's own, and the
head attends over the slots of those pages only (gathered, not masked). The prefill, and every
step of a model whose `budget_pages` is 0 (the default), attends over the whole cache as
before. A budget covering the whole cache chooses every page, which is dense decoding up to
the order of the softmax's sums.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import gin
import jax
import jax.numpy as jnp


@gin.configurable
@dataclasses.dataclass(frozen=True)
class QuestDecode:
    """Quest page selection for `sample` with the KV cache (module docstring): pages of
    `page_size` slots, `budget_pages` pages per query head and step including `sink_pages`
    and `recent_pages` (0: off, dense decoding)."""

    page_size: int = 16
    budget_pages: int = 0
    sink_pages: int = 1
    recent_pages: int = 1

    def __post_init__(self):
        for name, low in (("page_size", 1), ("budget_pages", 0), ("sink_pages", 0),
                          ("recent_pages", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"QuestDecode.{name}={v!r} must be an int >= {low}")
        if self.budget_pages and self.budget_pages < self.sink_pages + self.recent_pages:
            raise ValueError(f"QuestDecode.budget_pages={self.budget_pages} must cover "
                             f"sink_pages + recent_pages = {self.sink_pages + self.recent_pages}"
                             f" (0: off)")

    @property
    def enabled(self) -> bool:
        return self.budget_pages > 0

    def check_model(self, max_seq_len: int) -> None:
        """The cache is allocated in whole pages: page_size must divide the model's limit."""
        if self.enabled and max_seq_len % self.page_size:
            raise ValueError(f"QuestDecode.page_size={self.page_size} must divide the cache "
                             f"block ModelConfig.max_seq_len={max_seq_len} (the KV cache is "
                             f"allocated in whole pages)")

    def check_cache(self, cache_len: int) -> None:
        if cache_len % self.page_size:
            raise ValueError(f"QuestDecode.page_size={self.page_size} does not divide the "
                             f"cache block of {cache_len} slots; build the cache with "
                             f"infer.cache.init_cache")
        pages = cache_len // self.page_size
        if self.budget_pages > pages:
            raise ValueError(f"QuestDecode.budget_pages={self.budget_pages} is larger than the "
                             f"cache: {pages} pages of {self.page_size} slots")


def empty_pages(batch: int, pages: int, kv_heads: int, head_dim: int) -> dict:
    """page_min / page_max of an empty cache (+inf / -inf: no key yet)."""
    shape = (batch, pages, kv_heads, head_dim)
    return {"page_min": jnp.full(shape, jnp.inf, jnp.float32),
            "page_max": jnp.full(shape, -jnp.inf, jnp.float32)}


def update_pages(page_min: jax.Array, page_max: jax.Array, k: jax.Array, slot_pos: jax.Array,
                 start: jax.Array, page_size: int) -> tuple[jax.Array, jax.Array]:
    """The page bounds after keys k [batch, s, kv_heads, head_dim] are written at slots
    start .. start + s - 1 (slot_pos [batch, s]: -1 for padding, which is left out)."""
    pages = (start + jnp.arange(k.shape[1])) // page_size  # [s]
    valid = (slot_pos >= 0)[:, :, None, None]
    k = k.astype(jnp.float32)
    page_min = page_min.at[:, pages].min(jnp.where(valid, k, jnp.inf))
    page_max = page_max.at[:, pages].max(jnp.where(valid, k, -jnp.inf))
    return page_min, page_max


def page_scores(q: jax.Array, page_min: jax.Array, page_max: jax.Array) -> jax.Array:
    """Upper bounds of q·k over each page: q [batch, kv_heads, group, head_dim], bounds
    [batch, pages, kv_heads, head_dim] -> [batch, kv_heads, group, pages] (-inf: empty page)."""
    filled = jnp.isfinite(page_max[..., 0])  # [b, P, kvh]
    lo = jnp.where(filled[..., None], page_min, 0.0)
    hi = jnp.where(filled[..., None], page_max, 0.0)
    q = q.astype(jnp.float32)[:, :, :, None, :]  # [b, kvh, g, 1, d]
    lo, hi = (jnp.moveaxis(t, 1, 2)[:, :, None] for t in (lo, hi))  # [b, kvh, 1, P, d]
    bound = jnp.maximum(q * lo, q * hi).sum(-1)
    return jnp.where(jnp.moveaxis(filled, 1, 2)[:, :, None], bound, -jnp.inf)


def select_pages(scores: jax.Array, current_page: jax.Array, settings: QuestDecode) -> jax.Array:
    """The chosen pages [batch, kv_heads, group, budget_pages] (int32) from the bounds
    [batch, kv_heads, group, pages]: the sink pages, the recent pages ending at
    `current_page` (a scalar) and the rest by highest bound."""
    pages = jnp.arange(scores.shape[-1])
    forced = (pages < settings.sink_pages) | (
        (pages <= current_page) & (pages > current_page - settings.recent_pages))
    ranked = jnp.where(forced, jnp.inf, scores)
    return jax.lax.top_k(ranked, settings.budget_pages)[1].astype(jnp.int32)


def paged_attention(q: jax.Array, cached_key: jax.Array, cached_value: jax.Array,
                    slot_pos: jax.Array, chosen: jax.Array, positions: jax.Array,
                    page_size: int, window: int = 0, rule: Any = None,
                    q_slot: jax.Array | None = None) -> jax.Array:
    """One query per row, q [batch, 1, heads, head_dim], over the chosen pages [batch,
    kv_heads, group, K] of the cache (key/value [batch, L, kv_heads, head_dim], slot_pos
    [batch, L]) -> [batch, 1, heads, head_dim]. A slot is seen when filled and not after the
    query's position (and within `window`, and allowed by a block-sparse token `rule` on slot
    indices, as `attention.cache_mask`)."""
    b, length, kvh, d = cached_key.shape
    g, kk = chosen.shape[2], chosen.shape[3]
    n_pages = length // page_size
    paged = lambda t: jnp.moveaxis(t.reshape(b, n_pages, page_size, kvh, d), 3, 1)  # b,kvh,P,p,d
    flat = chosen.reshape(b, kvh, g * kk)
    take = jax.vmap(jax.vmap(lambda t, i: t[i]))  # over batch, kv heads
    k_sel = take(paged(cached_key), flat).reshape(b, kvh, g, kk * page_size, d)
    v_sel = take(paged(cached_value), flat).reshape(b, kvh, g, kk * page_size, d)
    slots = (flat[..., None] * page_size + jnp.arange(page_size)).reshape(b, kvh, g, -1)
    kpos = jnp.take_along_axis(slot_pos[:, None, None, :], slots, axis=-1)  # [b, kvh, g, T]
    qpos = positions[:, 0][:, None, None, None]
    vis = (kpos >= 0) & (kpos <= qpos)
    if window > 0:
        vis = vis & (qpos - kpos < window)
    if rule is not None:
        vis = vis & rule.token_mask(q_slot, slots)
    qh = q[:, 0].reshape(b, kvh, g, d).astype(jnp.float32)
    logits = jnp.einsum("bkgd,bkgtd->bkgt", qh, k_sel.astype(jnp.float32)) / jnp.sqrt(
        jnp.float32(d))
    logits = jnp.where(vis, logits, -jnp.inf)
    peak = jnp.max(logits, axis=-1, keepdims=True)
    w = jnp.where(vis, jnp.exp(logits - jnp.where(jnp.isfinite(peak), peak, 0.0)), 0.0)
    w = w / jnp.maximum(w.sum(-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    out = jnp.einsum("bkgt,bkgtd->bkgd", w, v_sel.astype(jnp.float32))
    return out.reshape(b, 1, kvh * g, d).astype(q.dtype)
