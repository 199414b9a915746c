"""Sparsity schedules: when masks change and how sparse they are at a step.

A schedule gives ``scale(step)`` in [0, 1]: the fraction of each layer's final
sparsity in force after the update at ``step`` (layer density at step t is
``1 - scale(t) * (1 - final_density)``); ``init_scale`` is in force before any
update; ``is_update_step(step)`` (host int) says when the mask update runs —
before the train step of that step. Drop/grow schedules keep the density and
give ``update_fraction(step)`` instead. ``scale``/``update_fraction`` accept
traced steps.
"""
from __future__ import annotations

import math

import gin
import jax.numpy as jnp
import numpy as np


def _check_int(value: int, arg: str, minimum: int = 0) -> int:
    if int(value) != value or value < minimum:
        raise ValueError(f"{arg}: {value!r} must be an integer >= {minimum}")
    return int(value)


def _check_span(start: int, end: int) -> None:
    if end <= start:
        raise ValueError(f"end: {end} precedes or equals start {start}; a schedule needs end > start")


class Schedule:
    """Base: sparse from the start, never updated."""

    kind = "prune"  # or "drop_grow"
    init_scale = 1.0
    final_density: float | None = None  # set by schedules that solve for it

    def scale(self, step):
        return jnp.ones((), jnp.float32) + 0.0 * jnp.asarray(step, jnp.float32)

    def is_update_step(self, step: int) -> bool:
        return False

    def update_fraction(self, step):
        return jnp.zeros((), jnp.float32)


@gin.configurable
class ConstantSchedule(Schedule):
    """Static sparsity: the mask chosen at init is kept for the whole run."""


@gin.configurable
class DenseSchedule(Schedule):
    """Never sparse (dense baseline)."""

    init_scale = 0.0

    def scale(self, step):
        return jnp.zeros((), jnp.float32) + 0.0 * jnp.asarray(step, jnp.float32)


@gin.configurable
class OneShotSchedule(Schedule):
    """Dense until ``step``; pruned to the final density at ``step`` (0 = at init, e.g. SNIP)."""

    init_scale = 0.0

    def __init__(self, step: int = 0):
        self.step = _check_int(step, "step")

    def scale(self, step):
        return (jnp.asarray(step) >= self.step).astype(jnp.float32)

    def is_update_step(self, step: int) -> bool:
        return int(step) == self.step


@gin.configurable
class PolynomialSchedule(Schedule):
    """Gradual pruning (Zhu & Gupta): ``scale = 1 - (1 - p)^exponent``, p = progress in [start, end].

    Updates every ``frequency`` steps from ``start`` and at ``end``.
    """

    init_scale = 0.0

    def __init__(self, start: int = 0, end: int = 1000, frequency: int = 100, exponent: float = 3.0):
        self.start = _check_int(start, "start")
        self.end = _check_int(end, "end")
        _check_span(self.start, self.end)
        self.frequency = _check_int(frequency, "frequency", 1)
        if exponent <= 0:
            raise ValueError(f"exponent: {exponent!r} must be > 0")
        self.exponent = float(exponent)

    def scale(self, step):
        p = jnp.clip((jnp.asarray(step, jnp.float32) - self.start) / (self.end - self.start), 0.0, 1.0)
        return 1.0 - (1.0 - p) ** self.exponent

    def is_update_step(self, step: int) -> bool:
        step = int(step)
        if step < self.start or step > self.end:
            return False
        return (step - self.start) % self.frequency == 0 or step == self.end


@gin.configurable
class DropGrowSchedule(Schedule):
    """Periodic drop/grow (SET, RigL): every ``frequency`` steps in (start, end),
    with update fraction ``init_fraction`` decayed by cosine (or kept constant)."""

    kind = "drop_grow"
    init_scale = 1.0

    def __init__(self, frequency: int = 100, end: int = 1000, init_fraction: float = 0.3,
                 start: int = 0, decay: str = "cosine"):
        self.frequency = _check_int(frequency, "frequency", 1)
        self.start = _check_int(start, "start")
        self.end = _check_int(end, "end")
        _check_span(self.start, self.end)
        if not 0.0 < init_fraction <= 1.0:
            raise ValueError(f"init_fraction: {init_fraction!r} is outside (0, 1]")
        if decay not in ("cosine", "constant"):
            raise ValueError(f"decay: {decay!r} is not 'cosine' or 'constant'")
        self.init_fraction, self.decay = float(init_fraction), decay

    def is_update_step(self, step: int) -> bool:
        step = int(step)
        return self.start < step < self.end and (step - self.start) % self.frequency == 0

    def update_fraction(self, step):
        if self.decay == "constant":
            return jnp.float32(self.init_fraction) + 0.0 * jnp.asarray(step, jnp.float32)
        p = jnp.clip((jnp.asarray(step, jnp.float32) - self.start) / (self.end - self.start), 0.0, 1.0)
        return 0.5 * self.init_fraction * (1.0 + jnp.cos(jnp.pi * p))


@gin.configurable
class SparseThenDenseSchedule(Schedule):
    """SPDF: sparse from init, made dense at ``dense_step`` and trained on densely."""

    init_scale = 1.0

    def __init__(self, dense_step: int = 1000):
        self.dense_step = _check_int(dense_step, "dense_step", 1)

    def scale(self, step):
        return (jnp.asarray(step) < self.dense_step).astype(jnp.float32)

    def is_update_step(self, step: int) -> bool:
        return int(step) == self.dense_step


def scale_trajectory(schedule: Schedule, total_steps: int) -> np.ndarray:
    """Host simulation: the scale in force during each train step 0..total_steps-1."""
    out = np.empty(total_steps, np.float64)
    current = float(schedule.init_scale)
    for t in range(total_steps):
        if schedule.is_update_step(t):
            current = float(schedule.scale(t))
        out[t] = current
    return out


def realized_average_density(schedule: Schedule, final_density: float, total_steps: int) -> float:
    """Mean over train steps of the overall density of the prunable params."""
    return float(np.mean(1.0 - scale_trajectory(schedule, total_steps) * (1.0 - final_density)))


def solve_final_density(schedule: Schedule, avg_density: float, total_steps: int) -> float:
    """Final density giving average density ``avg_density`` over the run (exact; density is
    affine in it). Raises ``ValueError`` if no final density in (0, 1] reaches it."""
    mean_scale = float(np.mean(scale_trajectory(schedule, total_steps)))
    if mean_scale <= 0:
        raise ValueError("schedule: it never prunes within total_steps, so avg_density is not reachable")
    final = 1.0 - (1.0 - avg_density) / mean_scale
    if not 0.0 < final <= 1.0:
        lo = 1.0 - mean_scale
        raise ValueError(
            f"avg_density: {avg_density!r} is not reachable with this schedule; valid range ({lo:.4f}, 1]"
        )
    return final


def solve_start_step(avg_density: float, final_density: float, end: int, total_steps: int,
                     frequency: int = 1, exponent: float = 3.0) -> int:
    """Latest-first bisection for the start step whose polynomial schedule (ending at ``end``)
    gives the average density closest to ``avg_density`` (later start -> denser run)."""

    def avg(start: int) -> float:
        return realized_average_density(
            PolynomialSchedule(start, end, frequency, exponent), final_density, total_steps)

    lo, hi = 0, end - 1
    if not avg(lo) <= avg_density <= avg(hi):
        raise ValueError(
            f"avg_density: {avg_density!r} is not reachable with final density {final_density} and "
            f"end {end}; valid range [{avg(lo):.4f}, {avg(hi):.4f}]"
        )
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if avg(mid) <= avg_density:
            lo = mid
        else:
            hi = mid
    return lo if abs(avg(lo) - avg_density) <= abs(avg(hi) - avg_density) else hi


@gin.configurable
class AverageDensitySchedule(PolynomialSchedule):
    """Gradual polynomial schedule meeting a prescribed *average* density over
    ``total_steps`` ("The Journey Matters"). Solves for the final density
    (``solve_for="final_density"``) or for the start step given ``final_density``."""

    def __init__(self, avg_density: float = 0.5, total_steps: int = 1000, start: int = 0,
                 end: int = 500, frequency: int = 10, exponent: float = 3.0,
                 solve_for: str = "final_density", final_density: float | None = None):
        if not 0.0 < avg_density <= 1.0 or math.isnan(avg_density):
            raise ValueError(f"avg_density: {avg_density!r} is outside (0, 1]")
        if end > total_steps:
            raise ValueError(f"end: {end} is after total_steps {total_steps}")
        if solve_for == "final_density":
            super().__init__(start, end, frequency, exponent)
            self.final_density = solve_final_density(self, avg_density, total_steps)
        elif solve_for == "start":
            if final_density is None or not 0.0 < final_density <= 1.0:
                raise ValueError(f"final_density: {final_density!r} must be in (0, 1] when solve_for='start'")
            start = solve_start_step(avg_density, final_density, end, total_steps, frequency, exponent)
            super().__init__(start, end, frequency, exponent)
            self.final_density = float(final_density)
        else:
            raise ValueError(f"solve_for: {solve_for!r} is not 'final_density' or 'start'")
        self.avg_density, self.total_steps = float(avg_density), int(total_steps)
