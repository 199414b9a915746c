"""Streaming heads (DuoAttention, mit-han-lab/duo-attention) for decoding with the KV cache:
KV heads labelled *streaming* keep only the first `sink_tokens` and the last `recent_tokens`
tokens in their cache, a ring of sink + recent slots; *retrieval* heads keep the full cache.
The cache of a layer with streaming heads is that much smaller (`cache_bytes`).

`StreamingHeads.heads` gives, per layer, the indices of its streaming KV heads (default: none,
which is dense decoding). A streaming head attends, at every step of prefill and decode, to
the tokens whose slot is a sink slot or within `recent_tokens` of the query's slot (the
Λ-shaped mask); when sink + recent covers the whole cache, that is every token, and the
result is dense decoding.

`calibrate` labels heads from calibration rows: for each layer and KV head, the relative
error of the head's attention output under the Λ mask against the full causal one (over its
query group); `label_heads` makes the `fraction` of KV heads with the lowest error streaming
(DuoAttention optimizes a gate per head on synthetic retrieval data; the deviation under the
streaming mask is the quantity that gate trades off).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.models.qkv_capture import capture_qkv


@gin.configurable
@dataclasses.dataclass(frozen=True)
class StreamingHeads:
    """Per layer, the streaming KV heads (`heads`: a tuple of index tuples, one per layer from
    layer 0; missing layers have none), and the sink and recent tokens they keep."""

    heads: tuple = ()
    sink_tokens: int = 4
    recent_tokens: int = 64

    def __post_init__(self):
        for name, low in (("sink_tokens", 0), ("recent_tokens", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"StreamingHeads.{name}={v!r} must be an int >= {low}")
        try:
            heads = tuple(tuple(int(h) for h in layer) for layer in self.heads)
        except TypeError:
            raise ValueError(f"StreamingHeads.heads={self.heads!r} must be a tuple of tuples "
                             f"of KV head indices, one per layer") from None
        object.__setattr__(self, "heads", heads)

    @property
    def ring(self) -> int:
        return self.sink_tokens + self.recent_tokens

    def of_layer(self, layer: int) -> tuple[int, ...]:
        return self.heads[layer] if 0 <= layer < len(self.heads) else ()

    def check_model(self, cfg: Any) -> None:
        """Labels must name existing layers and KV heads, once each; scanned layers share one
        cache shape, so they are refused."""
        if not self.heads:
            return
        if getattr(cfg, "scan_layers", False):
            raise ValueError("StreamingHeads.heads is set but ModelConfig.scan_layers=True; "
                             "streaming heads need per-layer caches (scan_layers=False)")
        if len(self.heads) > cfg.num_layers:
            raise ValueError(f"StreamingHeads.heads={self.heads!r} labels {len(self.heads)} "
                             f"layers; the model has {cfg.num_layers}")
        for i, layer in enumerate(self.heads):
            if len(set(layer)) != len(layer) or any(not 0 <= h < cfg.num_kv_heads
                                                    for h in layer):
                raise ValueError(f"StreamingHeads.heads={self.heads!r}: layer {i} must list "
                                 f"distinct KV heads in [0, {cfg.num_kv_heads})")


def split_heads(num_kv_heads: int, streaming: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """(retrieval, streaming) KV head indices."""
    return [h for h in range(num_kv_heads) if h not in streaming], list(streaming)


def query_heads(kv: list[int], group: int) -> list[int]:
    """The query heads of KV heads `kv` (GQA: query head j reads KV head j // group)."""
    return [h * group + j for h in kv for j in range(group)]


def empty_ring(batch: int, ring: int, n_heads: int, head_dim: int, dtype: Any) -> dict:
    return {"stream_key": jnp.zeros((batch, ring, n_heads, head_dim), dtype),
            "stream_value": jnp.zeros((batch, ring, n_heads, head_dim), dtype),
            "stream_pos": jnp.full((batch, ring), -1, jnp.int32),
            "stream_slot": jnp.full((ring,), -1, jnp.int32)}


def lambda_mask(q_slots: jax.Array, k_slots: jax.Array, sink: int, recent: int) -> jax.Array:
    """[s, T]: a key slot is seen by a query slot when it is not after it and is a sink slot or
    within `recent` of it."""
    q, k = q_slots[:, None], k_slots[None, :]
    return (k <= q) & ((k < sink) | (q - k < recent))


def streaming_attention(q, k, v, ring: dict, slot_pos, positions, start, settings,
                        window: int = 0) -> tuple[jax.Array, dict]:
    """q [b, s, n*g, d], k/v [b, s, n, d] of the streaming heads written at slots start ..
    start + s - 1 (slot_pos [b, s]: -1 on padding): attention over the ring and the chunk
    under the Λ mask, and the ring after the chunk's sink and last `recent` tokens are
    written."""
    s = q.shape[1]
    sink, recent, size = settings.sink_tokens, settings.recent_tokens, settings.ring
    q_slots = start + jnp.arange(s)
    keys = jnp.concatenate([ring["stream_key"], k.astype(ring["stream_key"].dtype)], 1)
    values = jnp.concatenate([ring["stream_value"], v.astype(ring["stream_value"].dtype)], 1)
    kpos = jnp.concatenate([ring["stream_pos"], slot_pos], 1)  # [b, R + s]
    kslot = jnp.concatenate([ring["stream_slot"], q_slots])  # [R + s]
    vis = (kpos[:, None, :] >= 0) & (kpos[:, None, :] <= positions[:, :, None])
    vis = vis & (kslot >= 0)[None, None] & lambda_mask(q_slots, kslot, sink, recent)[None]
    if window > 0:
        vis = vis & (positions[:, :, None] - kpos[:, None, :] < window)
    out = jax.nn.dot_product_attention(q, keys.astype(q.dtype), values.astype(q.dtype),
                                       mask=vis[:, None])
    ring_slot = jnp.where(q_slots < sink, q_slots, sink + (q_slots - sink) % recent)
    keep = (q_slots < sink) | (q_slots >= start + s - recent)
    dest = jnp.where(keep, ring_slot, size)  # out of range: dropped
    new = {"stream_key": ring["stream_key"].at[:, dest].set(
               k.astype(ring["stream_key"].dtype), mode="drop"),
           "stream_value": ring["stream_value"].at[:, dest].set(
               v.astype(ring["stream_value"].dtype), mode="drop"),
           "stream_pos": ring["stream_pos"].at[:, dest].set(slot_pos, mode="drop"),
           "stream_slot": ring["stream_slot"].at[dest].set(q_slots, mode="drop")}
    return out, new


def cache_bytes(cache: Any) -> int:
    """Bytes of a KV cache pytree."""
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(cache)))


def calibrate(model: Any, variables: dict, tokens: jax.Array, positions: jax.Array,
              segment_ids: jax.Array, sink: int, recent: int) -> np.ndarray:
    """[layers, kv_heads]: each KV head's relative attention output error under the Λ mask
    (sink + recent tokens of each query, by token index) against full causal attention, summed
    over its query group and rows, on calibration rows [batch, seq]; `variables`: the
    model's ({'params': ...}, and its MoE state if any)."""
    qkv = capture_qkv(model, variables, tokens, positions, segment_ids)
    cfg = model.config
    group = cfg.num_heads // cfg.num_kv_heads
    seq = tokens.shape[1]
    idx = jnp.arange(seq)
    segs = jnp.asarray(segment_ids)
    full = (lambda_mask(idx, idx, 0, seq)[None] & (segs[:, :, None] == segs[:, None, :]))[:, None]
    lam = full & lambda_mask(idx, idx, sink, recent)[None, None]
    out = np.zeros((cfg.num_layers, cfg.num_kv_heads))
    for layer in range(cfg.num_layers):
        q, k, v = qkv[layer]
        dense = jax.nn.dot_product_attention(q, k, v, mask=full)
        stream = jax.nn.dot_product_attention(q, k, v, mask=lam)
        err = jnp.sum((stream - dense) ** 2, axis=(0, 1, 3)) / jnp.maximum(
            jnp.sum(dense ** 2, axis=(0, 1, 3)), 1e-30)  # [heads]
        out[layer] = np.asarray(err).reshape(cfg.num_kv_heads, group).sum(-1)
    return out


def label_heads(errors: np.ndarray, fraction: float) -> tuple[tuple[int, ...], ...]:
    """The `StreamingHeads.heads` that make the `fraction` of KV heads (over all layers) with
    the lowest calibration error streaming."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or \
            not 0 <= fraction <= 1:
        raise ValueError(f"fraction={fraction!r} must be in [0, 1] (the share of KV heads "
                         f"made streaming)")
    n = int(round(fraction * errors.size))
    chosen = set(np.argsort(errors, axis=None, kind="stable")[:n].tolist())
    kvh = errors.shape[1]
    return tuple(tuple(h for h in range(kvh) if layer * kvh + h in chosen)
                 for layer in range(errors.shape[0]))
