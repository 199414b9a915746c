"""The dense format: a [in, out] kernel, as `nn.Dense` stores it (the default)."""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.models.formats import WEIGHT_FORMATS, WeightFormat
from sparsejax.models.init import DEFAULT_KERNEL_INIT, zero_padding


@WEIGHT_FORMATS.register("dense")
class Dense(WeightFormat):
    """A dense [in, out] kernel (a sparsity method may keep a mask beside it)."""

    param_names = ("kernel",)

    def __call__(self, module, x, *, features, axes, dtype, param_dtype, real_features):
        kernel = module.param(
            "kernel", nn.with_logical_partitioning(
                zero_padding(DEFAULT_KERNEL_INIT, -1, real_features), axes),
            (x.shape[-1], features), param_dtype)
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))

    def to_dense(self, params: Mapping[str, jax.Array], in_features: int) -> jax.Array:
        return params["kernel"]

    def from_dense(self, kernel: jax.Array, **kwargs: Any) -> dict[str, jax.Array]:
        return {"kernel": jnp.asarray(kernel)}
