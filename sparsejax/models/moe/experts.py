"""Stacked gated-MLP experts, the expert math used by every dispatch strategy, and the
always-on shared experts."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.models.act_record import record
from sparsejax.models.activations import SWIGLU_ALPHA, SWIGLU_LIMIT, Gated, gated

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
    wi_gate_bias: jax.Array | None = None  # [E, mlp] (MoeMlp.expert_bias; None: no biases)
    wi_up_bias: jax.Array | None = None    # [E, mlp]
    wo_bias: jax.Array | None = None       # [E, embed]


class Experts(nn.Module):
    """Creates the stacked expert weights with logical axes ('expert', 'embed', 'mlp')."""

    num_experts: int
    embed_dim: int
    mlp_dim: int
    param_dtype: Dtype = jnp.float32
    bias: bool = False  # per-expert biases of the three projections (gpt-oss)

    @nn.compact
    def __call__(self) -> ExpertWeights:
        e, d, f = self.num_experts, self.embed_dim, self.mlp_dim
        wi_init = nn.with_logical_partitioning(KERNEL_INIT, ("expert", "embed", "mlp"))
        wo_init = nn.with_logical_partitioning(KERNEL_INIT, ("expert", "mlp", "embed"))
        kernels = (self.param("wi_gate", wi_init, (e, d, f), self.param_dtype),
                   self.param("wi_up", wi_init, (e, d, f), self.param_dtype),
                   self.param("wo", wo_init, (e, f, d), self.param_dtype))
        if not self.bias:
            return ExpertWeights(*kernels)
        zeros = nn.initializers.zeros
        mlp_b = nn.with_logical_partitioning(zeros, ("expert", "mlp"))
        return ExpertWeights(
            *kernels, self.param("wi_gate_bias", mlp_b, (e, f), self.param_dtype),
            self.param("wi_up_bias", mlp_b, (e, f), self.param_dtype),
            self.param("wo_bias", nn.with_logical_partitioning(zeros, ("expert", "embed")),
                       (e, d), self.param_dtype))


def cast(w: ExpertWeights, dtype: Dtype) -> ExpertWeights:
    return ExpertWeights(*(None if a is None else a.astype(dtype) for a in w))


def _plus(y: jax.Array, bias: jax.Array | None) -> jax.Array:
    """y [E, C, n] + a per-expert bias [E, n] (None: y)."""
    return y if bias is None else y + bias[:, None, :].astype(y.dtype)


def _plus_rows(y: jax.Array, bias: jax.Array | None, group_sizes: jax.Array) -> jax.Array:
    """y [M, n] (rows sorted by expert, `group_sizes` [E] rows each, rows past their sum
    unused) + each row's expert's bias [E, n]; unused rows stay zero."""
    if bias is None:
        return y
    ends = jnp.cumsum(group_sizes)
    expert = jnp.searchsorted(ends, jnp.arange(y.shape[0]), side="right")  # [M], E past the end
    rows = jnp.take(bias, jnp.minimum(expert, bias.shape[0] - 1), axis=0).astype(y.dtype)
    return y + jnp.where((expert < bias.shape[0])[:, None], rows, jnp.zeros_like(rows))


# Called with (gate activation, intermediate) of every row the experts compute (e.g. to sow
# them: models/act_record.py).
Observer = Callable[[jax.Array, jax.Array], None]


def batched_ffn(x: jax.Array, w: ExpertWeights, act: Gated = SWIGLU,
                observe: Observer | None = None) -> jax.Array:
    """Gated MLP per expert on a fixed buffer. x: [E, C, embed] -> [E, C, embed]; `act`:
    fn(gate, up) -> (gate activation, intermediate) (models/activations.py)."""
    gate = _plus(jnp.einsum("ecd,edf->ecf", x, w.wi_gate), w.wi_gate_bias)
    up = _plus(jnp.einsum("ecd,edf->ecf", x, w.wi_up), w.wi_up_bias)
    a, h = act(gate, up)
    if observe is not None:
        observe(a, h)
    return _plus(jnp.einsum("ecf,efd->ecd", h, w.wo), w.wo_bias)


def ragged_dot(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32))


def grouped_ffn(x: jax.Array, group_sizes: jax.Array, w: ExpertWeights,
                gmm: GroupedMatmul = ragged_dot, act: Gated = SWIGLU,
                observe: Observer | None = None) -> jax.Array:
    """Gated MLP on tokens sorted by expert. x: [M, embed]; group_sizes: [E] (rows past
    sum(group_sizes) come out as zeros) -> [M, embed]."""
    gate = _plus_rows(gmm(x, w.wi_gate, group_sizes), w.wi_gate_bias, group_sizes)
    up = _plus_rows(gmm(x, w.wi_up, group_sizes), w.wi_up_bias, group_sizes)
    a, h = act(gate, up)
    if observe is not None:
        observe(a, h)
    return _plus_rows(gmm(h, w.wo, group_sizes), w.wo_bias, group_sizes)


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
    swiglu: tuple = (SWIGLU_ALPHA, SWIGLU_LIMIT)  # (alpha, limit) of 'clamped_swiglu'

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
        act = gated(self.activation, self.activation_threshold, *self.swiglu)
        a, h = act(x @ wg.astype(self.dtype), x @ wu.astype(self.dtype))
        record(self, a, h)
        return h @ wo.astype(self.dtype)
