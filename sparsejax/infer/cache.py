"""The KV cache: one {cached_key, cached_value, pos, index} entry per attention layer (and
page_min / page_max under Quest decoding, models/quest.py), in the
'cache' collection that `Attention(decode=True)` reads and extends. (Named apart from the
projections: a compact weight format makes 'key' and 'value' submodules of the layer.) With
multi-head latent attention (`ModelConfig.kv_lora_rank` > 0) an entry holds the compressed
{cached_latent, cached_rope_key} instead (models/mla.py states the memory ratio)."""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from sparsejax.models.layer_stack import layer_period, stack_layers
from sparsejax.models.layers import dtype_from_name
from sparsejax.models.quest import QuestDecode, empty_pages
from sparsejax.models.streaming_heads import StreamingHeads, empty_ring


def init_cache(model_config: Any, batch: int, length: int, dtype: Any = None,
               streaming: StreamingHeads | None = None) -> dict:
    """An empty cache for `batch` rows of up to `length` tokens: key/value
    [batch, length, kv_heads, head_dim] (the compute dtype), slot positions [batch, length]
    (-1: empty) and the next free slot. With Quest decoding on (models/quest.QuestDecode) the
    length is rounded up to whole pages, which also keep their key bounds; the streaming heads
    of `streaming` (default: the gin-bound models/streaming_heads.StreamingHeads) keep a ring
    of sink + recent slots instead of the full length."""
    if not 1 <= length <= model_config.max_seq_len:
        raise ValueError(f"cache length {length} (prompt + new tokens) must be in "
                         f"[1, ModelConfig.max_seq_len={model_config.max_seq_len}]")
    quest = QuestDecode()
    quest.check_model(int(model_config.max_seq_len))
    if quest.enabled:  # whole pages (page_size divides max_seq_len, so still within it)
        length = -(-length // quest.page_size) * quest.page_size
    streaming = StreamingHeads() if streaming is None else streaming
    streaming.check_model(model_config)
    dtype = dtype_from_name(dtype or model_config.dtype)
    hd = model_config.head_dim
    rank = int(getattr(model_config, "kv_lora_rank", 0))
    if rank and (quest.enabled or streaming.heads):
        raise ValueError("QuestDecode.budget_pages and StreamingHeads.heads select cached keys "
                         "per KV head; multi-head latent attention (ModelConfig.kv_lora_rank="
                         f"{rank}) caches one shared latent: leave them unset")

    def layer(i):
        if rank:  # the latent (after its norm) and the rotary key, shared by the heads
            return {"attn": {
                "cached_latent": jnp.zeros((batch, length, rank), dtype),
                "cached_rope_key": jnp.zeros((batch, length, model_config.qk_rope_head_dim),
                                             dtype),
                "pos": jnp.full((batch, length), -1, jnp.int32),
                "index": jnp.zeros((), jnp.int32)}}
        stream = streaming.of_layer(i)
        kvh = model_config.num_kv_heads - len(stream)  # the full cache's heads
        shape = (batch, length, kvh, hd)
        attn = {"cached_key": jnp.zeros(shape, dtype), "cached_value": jnp.zeros(shape, dtype),
                "pos": jnp.full((batch, length), -1, jnp.int32),
                "index": jnp.zeros((), jnp.int32)}
        if quest.enabled:
            attn.update(empty_pages(batch, length // quest.page_size, kvh, hd))
        if stream:
            attn.update(empty_ring(batch, streaming.ring, len(stream), hd, dtype))
        return {"attn": attn}

    cache = {f"layer_{i}": layer(i) for i in range(model_config.num_layers)}
    if getattr(model_config, "scan_layers", False):  # stacked like the scanned layers' params
        cache = stack_layers(cache, layer_period(model_config))
    return cache
