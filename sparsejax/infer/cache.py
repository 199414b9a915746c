"""The KV cache: one {cached_key, cached_value, pos, index} entry per attention layer, in the
'cache' collection that `Attention(decode=True)` reads and extends. (Named apart from the
projections: a compact weight format makes 'key' and 'value' submodules of the layer.) With
multi-head latent attention (`ModelConfig.kv_lora_rank` > 0) an entry holds the compressed
{cached_latent, cached_rope_key} instead (models/mla.py states the memory ratio)."""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from sparsejax.models.layers import dtype_from_name


def init_cache(model_config: Any, batch: int, length: int, dtype: Any = None) -> dict:
    """An empty cache for `batch` rows of up to `length` tokens: key/value
    [batch, length, kv_heads, head_dim] (the compute dtype), slot positions [batch, length]
    (-1: empty) and the next free slot."""
    if not 1 <= length <= model_config.max_seq_len:
        raise ValueError(f"cache length {length} (prompt + new tokens) must be in "
                         f"[1, ModelConfig.max_seq_len={model_config.max_seq_len}]")
    dtype = dtype_from_name(dtype or model_config.dtype)
    shape = (batch, length, model_config.num_kv_heads, model_config.head_dim)
    rank = int(getattr(model_config, "kv_lora_rank", 0))
    if rank:  # the latent (after its norm) and the rotary key, shared by the heads
        kv = lambda: {"cached_latent": jnp.zeros((batch, length, rank), dtype),
                      "cached_rope_key": jnp.zeros(
                          (batch, length, model_config.qk_rope_head_dim), dtype)}
    else:
        kv = lambda: {"cached_key": jnp.zeros(shape, dtype),
                      "cached_value": jnp.zeros(shape, dtype)}
    layer = lambda: {"attn": {**kv(), "pos": jnp.full((batch, length), -1, jnp.int32),
                              "index": jnp.zeros((), jnp.int32)}}
    cache = {f"layer_{i}": layer() for i in range(model_config.num_layers)}
    if getattr(model_config, "scan_layers", False):  # stacked like the scanned layers' params
        from sparsejax.models.layer_stack import layer_period, stack_layers
        cache = stack_layers(cache, layer_period(model_config))
    return cache
