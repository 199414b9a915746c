"""The KV cache: one {cached_key, cached_value, pos, index} entry per attention layer (and
page_min / page_max under Quest decoding, models/quest.py), in the
'cache' collection that `Attention(decode=True)` reads and extends. (Named apart from the
projections: a compact weight format makes 'key' and 'value' submodules of the layer.)"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from sparsejax.models.layers import dtype_from_name
from sparsejax.models.quest import QuestDecode, empty_pages


def init_cache(model_config: Any, batch: int, length: int, dtype: Any = None) -> dict:
    """An empty cache for `batch` rows of up to `length` tokens: key/value
    [batch, length, kv_heads, head_dim] (the compute dtype), slot positions [batch, length]
    (-1: empty) and the next free slot. With Quest decoding on (models/quest.QuestDecode) the
    length is rounded up to whole pages, which also keep their key bounds."""
    if not 1 <= length <= model_config.max_seq_len:
        raise ValueError(f"cache length {length} (prompt + new tokens) must be in "
                         f"[1, ModelConfig.max_seq_len={model_config.max_seq_len}]")
    quest = QuestDecode()
    quest.check_model(int(model_config.max_seq_len))
    if quest.enabled:  # whole pages (page_size divides max_seq_len, so still within it)
        length = -(-length // quest.page_size) * quest.page_size
    dtype = dtype_from_name(dtype or model_config.dtype)
    kvh, hd = model_config.num_kv_heads, model_config.head_dim
    shape = (batch, length, kvh, hd)

    def layer():
        attn = {"cached_key": jnp.zeros(shape, dtype), "cached_value": jnp.zeros(shape, dtype),
                "pos": jnp.full((batch, length), -1, jnp.int32),
                "index": jnp.zeros((), jnp.int32)}
        if quest.enabled:
            attn.update(empty_pages(batch, length // quest.page_size, kvh, hd))
        return {"attn": attn}

    cache = {f"layer_{i}": layer() for i in range(model_config.num_layers)}
    if getattr(model_config, "scan_layers", False):  # stacked like the scanned layers' params
        from sparsejax.models.layer_stack import layer_period, stack_layers
        cache = stack_layers(cache, layer_period(model_config))
    return cache
