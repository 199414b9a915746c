"""What the MLPs sow about their intermediate activations, for the activation-sparsity
regularizer (ProSparse) and metrics (sparsejax/sparsity/activation/).

When the collection `STATS` ('act_stats') is mutable, every MLP sows, under its own path:
  a     [rows, mlp]  the gate activation act(gate(x))
  h     [rows, mlp]  the intermediate that enters the down projection (a * up)
  rows  [rows] int32 (routed experts only) the token (index into batch * seq) of each row,
        -1 for rows that hold no assignment (unused buffer slots, rows past the groups)
Dense MLPs and shared experts have one row per token, in token order. Nothing is sown (and
nothing costs) when the collection is not mutable.
"""
from __future__ import annotations

import flax.linen as nn
import jax

STATS = "act_stats"


def recording(module: nn.Module) -> bool:
    """Whether `module` should sow activation statistics now."""
    return module.is_mutable_collection(STATS) and not module.is_initializing()


def record(module: nn.Module, a: jax.Array, h: jax.Array, rows: jax.Array | None = None) -> None:
    """Sows one MLP's gate activation and intermediate (and row -> token map) if recording."""
    if not recording(module):
        return
    module.sow(STATS, "a", a.reshape(-1, a.shape[-1]))
    module.sow(STATS, "h", h.reshape(-1, h.shape[-1]))
    if rows is not None:
        module.sow(STATS, "rows", rows.reshape(-1))
