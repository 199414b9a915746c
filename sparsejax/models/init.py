"""Initializers shared by the layers and the weight formats."""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

DEFAULT_KERNEL_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def zero_padding(init: Callable, axis: int, length: int | None) -> Callable:
    """`init` with the entries at index >= `length` along `axis` set to zero. Padding (rows or
    columns that exist only so the vocab axis shards evenly) then stays exactly zero under
    the optimizers here (its gradient is zero), so it is never counted as parameters."""
    if length is None:
        return init

    def padded_init(key, shape, dtype=jnp.float32):
        x = init(key, shape, dtype)
        keep = jax.lax.broadcasted_iota(jnp.int32, shape, axis % len(shape)) < length
        return jnp.where(keep, x, jnp.zeros_like(x))

    return padded_init
