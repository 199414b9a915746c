"""TrainState: everything that changes during training, as one pytree."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import optax


@flax.struct.dataclass
class TrainState:
    """step, params, optimizer state and rng, plus the slots that sparsity (masks and method
    state) and MoE (router balancing biases) fill. All leaves are arrays, so the state jits,
    shards and checkpoints as a whole."""

    step: jax.Array
    params: Any
    opt_state: optax.OptState
    rng: jax.Array  # raw uint32 key data, so it checkpoints as a plain array
    sparsity: Any = None
    moe_state: Any = None
