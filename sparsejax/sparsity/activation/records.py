"""The MLP activations a forward pass sowed (models/act_record.py), with the rows that count.

    sites = layer_records(mutated["act_stats"], batch["segment_ids"])
    # {'layer_0/mlp': Record(a [rows, f], h [rows, f], valid [rows] bool, tokens [rows])}

A row counts when it holds a real token (segment id != 0: not padding) and, for routed
experts, an assignment. Dense MLPs and shared experts have one row per token in token order.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sparsejax.models.layer_stack import unstack_layers


class Record(NamedTuple):
    a: jax.Array       # [rows, f] gate activation
    h: jax.Array       # [rows, f] intermediate entering the down projection
    valid: jax.Array   # [rows] bool
    tokens: jax.Array  # [rows] int32 token index (batch-major), clipped into range
    routed: bool       # rows are expert assignments (not one per token)


def _sites(tree: Any, path: tuple[str, ...] = ()) -> dict[str, dict]:
    if isinstance(tree, dict) or hasattr(tree, "items"):
        keys = set(tree.keys())
        out = {}
        if {"a", "h"} <= keys:
            out["/".join(path)] = tree
        for k, v in tree.items():
            if k not in ("a", "h", "rows"):
                out.update(_sites(v, path + (str(k),)))
        return out
    return {}


def _one(values: Any) -> jax.Array:
    vals = values if isinstance(values, tuple) else (values,)
    if len(vals) != 1:
        raise ValueError(f"an MLP sowed its activations {len(vals)} times in one forward pass")
    return vals[0]


def layer_records(stats: Any, segment_ids: jax.Array) -> dict[str, Record]:
    """{MLP path: Record} of a sown 'act_stats' collection; segment_ids: [batch, seq]."""
    stats = unstack_layers(stats)  # a scanned model sows on the stacked `layers` group
    token_valid = (segment_ids != 0).reshape(-1)
    t = token_valid.shape[0]
    out = {}
    for path, node in sorted(_sites(stats or {}).items()):
        a, h = _one(node["a"]), _one(node["h"])
        if "rows" in node:
            rows = _one(node["rows"])
            safe = jnp.clip(rows, 0, t - 1)
            valid = (rows >= 0) & token_valid[safe]
            out[path] = Record(a, h, valid, safe, True)
        else:
            if a.shape[0] != t:
                raise ValueError(f"{path} sowed {a.shape[0]} rows for {t} tokens")
            out[path] = Record(a, h, token_valid, jnp.arange(t, dtype=jnp.int32), False)
    return out


def mean_abs(x: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean |x| over the valid rows and every column (float32; 0 without valid rows)."""
    w = valid.astype(jnp.float32)[:, None]
    total = jnp.sum(jnp.abs(x.astype(jnp.float32)) * w)
    return total / jnp.maximum(jnp.sum(w) * x.shape[-1], 1.0)
