"""Each attention layer's q, k and v on calibration rows, for the offline head calibrations
(streaming heads, `models/streaming_heads.calibrate`; the prefill pattern search,
`models/prefill_search.py`).

`Attention` sows its (q, k, v) into the `COLLECTION` collection when that collection is
mutable: after the norms and RoPE, before the attention itself, so q is ``[b, s, heads, d]``
and k, v are ``[b, s, kv_heads, d]`` exactly as the layer's attention reads them. A forward
pass without the collection mutable sows nothing and costs nothing.
"""
from __future__ import annotations

from typing import Any

import jax

COLLECTION = "attn_qkv"


def capture_qkv(model: Any, variables: dict, tokens: jax.Array, positions: jax.Array,
                segment_ids: jax.Array) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
    """One jitted forward pass of `model` (unscanned layers) over rows ``[batch, seq]``;
    returns each layer's (q, k, v), layer 0 first. `variables`: the model's ({'params': ...},
    and its MoE state if any)."""
    _, sown = jax.jit(lambda v, t, p, s: model.apply(v, t, p, s, mutable=[COLLECTION]))(
        variables, tokens, positions, segment_ids)
    layers = sown[COLLECTION]
    out = []
    for layer in range(model.config.num_layers):
        (qkv,) = layers[f"layer_{layer}"]["attn"]["qkv"]
        out.append(qkv)
    return out
