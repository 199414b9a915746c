"""Stacked gated-MLP experts, the expert math used by every dispatch strategy, and the
always-on shared experts."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.models.act_record import record
from sparsejax.models.activations import Gated, gated

Dtype = Any
SWIGLU: Gated = gated("silu")
KERNEL_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                               in_axis=-2, out_axis=-1, batch_axis=(0,))

# A grouped matmul: (lhs [m, k] sorted by group, rhs [g, k, n], group_sizes [g]) -> [m, n].
GroupedMatmul = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


class ExpertWeights(NamedTuple):
    wi_gate: jax.Array  # [E, embed, mlp]
    wi_up: jax.Array    # [E, embed, mlp]
    wo: jax.Array       # [E, mlp, embed]


class Experts(nn.Module):
    """Creates the stacked expert weights with logical axes ('expert', 'embed', 'mlp')."""

    num_experts: int
    embed_dim: int
    mlp_dim: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self) -> ExpertWeights:
        e, d, f = self.num_experts, self.embed_dim, self.mlp_dim
        wi_init = nn.with_logical_partitioning(KERNEL_INIT, ("expert", "embed", "mlp"))
        wo_init = nn.with_logical_partitioning(KERNEL_INIT, ("expert", "mlp", "embed"))
        return ExpertWeights(
            self.param("wi_gate", wi_init, (e, d, f), self.param_dtype),
            self.param("wi_up", wi_init, (e, d, f), self.param_dtype),
            self.param("wo", wo_init, (e, f, d), self.param_dtype))


def cast(w: ExpertWeights, dtype: Dtype) -> ExpertWeights:
    return ExpertWeights(*(a.astype(dtype) for a in w))


# Called with (gate activation, intermediate) of every row the experts compute (e.g. to sow
# them: models/act_record.py).
Observer = Callable[[jax.Array, jax.Array], None]


def batched_ffn(x: jax.Array, w: ExpertWeights, act: Gated = SWIGLU,
                observe: Observer | None = None) -> jax.Array:
    """Gated MLP per expert on a fixed buffer. x: [E, C, embed] -> [E, C, embed]; `act`:
    fn(gate, up) -> (gate activation, intermediate) (models/activations.py)."""
    gate = jnp.einsum("ecd,edf->ecf", x, w.wi_gate)
    up = jnp.einsum("ecd,edf->ecf", x, w.wi_up)
    a, h = act(gate, up)
    if observe is not None:
        observe(a, h)
    return jnp.einsum("ecf,efd->ecd", h, w.wo)


def ragged_dot(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32))


def grouped_ffn(x: jax.Array, group_sizes: jax.Array, w: ExpertWeights,
                gmm: GroupedMatmul = ragged_dot, act: Gated = SWIGLU,
                observe: Observer | None = None) -> jax.Array:
    """Gated MLP on tokens sorted by expert. x: [M, embed]; group_sizes: [E] (rows past
    sum(group_sizes) come out as zeros) -> [M, embed]."""
    gate = gmm(x, w.wi_gate, group_sizes)
    up = gmm(x, w.wi_up, group_sizes)
    a, h = act(gate, up)
    if observe is not None:
        observe(a, h)
    return gmm(h, w.wo, group_sizes)


class SharedExperts(nn.Module):
    """`num_shared` always-on experts, fused into one gated MLP of width num_shared * mlp_dim
    (identical to running them separately and summing). x: [..., embed]."""

    embed_dim: int
    mlp_dim: int
    num_shared: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    activation: str = "silu"
    activation_threshold: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        f = self.mlp_dim * self.num_shared
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        wi_init = nn.with_logical_partitioning(init, ("embed", "mlp"))
        wg = self.param("wi_gate", wi_init, (self.embed_dim, f), self.param_dtype)
        wu = self.param("wi_up", wi_init, (self.embed_dim, f), self.param_dtype)
        wo = self.param("wo", nn.with_logical_partitioning(init, ("mlp", "embed")),
                        (f, self.embed_dim), self.param_dtype)
        x = x.astype(self.dtype)
        act = gated(self.activation, self.activation_threshold)
        a, h = act(x @ wg.astype(self.dtype), x @ wu.astype(self.dtype))
        record(self, a, h)
        return h @ wo.astype(self.dtype)
