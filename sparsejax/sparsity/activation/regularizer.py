"""Activation regularizers: extra loss terms on the MLPs' intermediate activations.

They are not sparsity methods (those act on weights): the run's regularizer is chosen apart
from its method (`make_activation_regularizer.name`, default 'none'), so ProSparse combines
with any weight-sparsity method (RigL, N:M, ...) and with MoE layers. The trainer adds
`loss(stats, segment_ids, step)` to the loss, where `stats` is the 'act_stats' collection
the model sows while the regularizer is active (models/act_record.py).

ProSparse (Song et al., 2024): an L1 penalty on the gate activations act(gate(x)) of every
MLP, whose factor rises in stages along sine curves. With stage boundaries
b_0 = start < b_1 < ... < b_n (`stage_ends`) and factors lambda_1 <= ... <= lambda_n
(lambda_0 = 0), at step t in stage i

    lambda(t) = lambda_{i-1} + (lambda_i - lambda_{i-1}) * sin(pi/2 * (t - b_{i-1}) / (b_i - b_{i-1}))

0 before `start` and lambda_n after b_n. The penalty is lambda(t) times the mean over MLP
layers of each layer's mean |act(gate(x))| over real tokens (routed experts: over computed
assignments) and neurons. Pair it with a ReLU-family activation (configs/activation/
prosparse.gin); its threshold shift (FATReLU) is `ModelConfig.activation_threshold`, set
at eval or sampling time.
"""
from __future__ import annotations

import math
from typing import Any

import gin
import jax
import jax.numpy as jnp

from sparsejax.config import check_step_spec, run_step
from sparsejax.registry import Registry
from sparsejax.sparsity.activation.records import layer_records, mean_abs


class ActivationRegularizer:
    """Base: no penalty. `active` regularizers make the model sow its activations."""

    active: bool = False

    def bind(self, num_steps: int) -> "ActivationRegularizer":
        """Resolves run-relative steps against the run's length."""
        return self

    def loss(self, stats: Any, segment_ids: jax.Array, step: jax.Array) -> tuple[jax.Array, dict]:
        """(penalty, metrics) for one batch."""
        return jnp.zeros((), jnp.float32), {}


REGULARIZERS: Registry[type[ActivationRegularizer]] = Registry("activation regularizer")


@REGULARIZERS.register("none")
class NoRegularizer(ActivationRegularizer):
    """No activation penalty (default)."""


def sine_stages(step: jax.Array, starts: list[int], ends: list[int],
                factors: list[float]) -> jax.Array:
    """The stage-wise sine ramp of the module docstring at `step` (float32)."""
    t = jnp.asarray(step, jnp.float32)
    out = jnp.zeros((), jnp.float32)
    prev = 0.0
    for b0, b1, lam in zip(starts, ends, factors):
        frac = jnp.clip((t - b0) / max(b1 - b0, 1), 0.0, 1.0)
        rise = prev + (lam - prev) * jnp.sin(0.5 * math.pi * frac)
        out = jnp.where(t >= b0, rise, out)
        prev = lam
    return out


@gin.configurable
@REGULARIZERS.register("prosparse")
class ProSparseRegularizer(ActivationRegularizer):
    """ProSparse: L1 on the MLP gate activations, factor rising along sine stages."""

    active = True

    def __init__(self, factors: tuple = (1e-3,), stage_ends: tuple = (0.5,),
                 start: int | float = 0.0):
        if isinstance(factors, (int, float)) or isinstance(stage_ends, (int, float)):
            raise ValueError(f"ProSparseRegularizer.factors={factors!r} and stage_ends="
                             f"{stage_ends!r} must be tuples (one entry per stage)")
        factors, stage_ends = tuple(factors), tuple(stage_ends)
        if not factors or len(factors) != len(stage_ends):
            raise ValueError(f"ProSparseRegularizer.factors={factors!r} and stage_ends="
                             f"{stage_ends!r} must be non-empty and of equal length")
        if any(isinstance(f, bool) or not isinstance(f, (int, float)) or f < 0 for f in factors) \
                or list(factors) != sorted(factors):
            raise ValueError(f"ProSparseRegularizer.factors={factors!r} must be numbers >= 0 "
                             f"that never decrease (each stage raises the factor)")
        check_step_spec(start, "ProSparseRegularizer.start")
        for i, e in enumerate(stage_ends):
            check_step_spec(e, f"ProSparseRegularizer.stage_ends[{i}]")
        self.factors, self.stage_ends, self.start = factors, stage_ends, start
        self.bounds: list[int] | None = None

    def bind(self, num_steps: int) -> "ProSparseRegularizer":
        start = run_step(self.start, num_steps, "ProSparseRegularizer.start")
        ends = [run_step(e, num_steps, f"ProSparseRegularizer.stage_ends[{i}]")
                for i, e in enumerate(self.stage_ends)]
        bounds = [start] + ends
        if any(b1 <= b0 for b0, b1 in zip(bounds, bounds[1:])):
            raise ValueError(f"ProSparseRegularizer: start={self.start!r} and stage_ends="
                             f"{self.stage_ends!r} resolve to steps {bounds} over "
                             f"{num_steps} steps; they must strictly increase")
        self.bounds = bounds
        return self

    def factor(self, step: jax.Array) -> jax.Array:
        if self.bounds is None:
            raise ValueError("ProSparseRegularizer: call bind(num_steps) before use")
        return sine_stages(step, self.bounds[:-1], self.bounds[1:], list(self.factors))

    def loss(self, stats, segment_ids, step):
        records = layer_records(stats, segment_ids)
        if not records:
            raise ValueError("ProSparseRegularizer: the model sowed no MLP activations "
                             "(is the 'act_stats' collection mutable?)")
        l1 = sum(mean_abs(r.a, r.valid) for r in records.values()) / len(records)
        lam = self.factor(step)
        return lam * l1, {"factor": lam, "l1": l1}


@gin.configurable
def make_activation_regularizer(name: str = "none") -> ActivationRegularizer:
    """The run's activation regularizer: the registered class `name` with its gin settings."""
    return REGULARIZERS.get(name, "make_activation_regularizer.name")()
