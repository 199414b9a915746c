"""Sparsity schedules: when masks change and how sparse they are at a step.

A schedule gives ``scale(step)`` in [0, 1]: the fraction of each layer's final sparsity in
force after the update at ``step`` (layer density at step t is ``1 - scale(t) * (1 -
final_density)``); ``init_scale`` is in force before any update; ``is_update_step(step)``
(host int) says when the mask update runs — before the train step of that step. Drop/grow
schedules keep the density and give ``update_fraction(step)`` instead. ``scale`` and
``update_fraction`` accept traced steps.

Every step setting (start, end, frequency, step, dense_step, total_steps) is an absolute
step (an int) or a fraction of the run (a float in [0, 1]: ``end = 0.75`` is 75% of
``TrainConfig.num_steps``). Fractions are resolved by ``bind(num_steps)``, which the method
calls before training; the shipped configs use fractions so that they mean the same thing
at every run length. Schedules are registered by name in ``SCHEDULES``
(``MaskedPruningMethod.schedule = 'drop_grow'``).
"""
from __future__ import annotations

import math

import gin
import jax.numpy as jnp
import numpy as np

from sparsejax.config import check_step_spec, run_step
from sparsejax.registry import Registry


class Schedule:
    """Base: sparse from the start, never updated."""

    kind = "prune"  # or "drop_grow"
    init_scale = 1.0  # > 0: the run starts sparse, with masks chosen by the init criterion
    prunes = False  # its updates choose masks with the prune criterion
    final_density: float | None = None  # set by schedules that solve for it
    _steps: dict[str, tuple[int | float, int]] = {}  # setting -> (raw value, minimum)
    _bound: int | None = None

    def _spec(self, **steps: tuple[int | float, int]) -> None:
        """Records step settings {name: (value, minimum)} after checking their types."""
        cls = type(self).__name__
        for name, (value, minimum) in steps.items():
            check_step_spec(value, f"{cls}.{name}", minimum)
        self._steps = dict(steps)

    def bind(self, num_steps: int) -> "Schedule":
        """Resolves fractions against the run's length; returns self."""
        cls = type(self).__name__
        for name, (value, minimum) in self._steps.items():
            setattr(self, name, run_step(value, num_steps, f"{cls}.{name}", minimum))
        self._bound = int(num_steps)
        self._check()
        return self

    def _check(self) -> None:
        """Validates the resolved steps (spans)."""

    def _check_span(self) -> None:
        cls = type(self).__name__
        if self.end <= self.start:
            raise ValueError(f"{cls}.end={self.end} precedes or equals {cls}.start="
                             f"{self.start} (resolved for {self._bound} steps); a schedule needs "
                             f"end > start")

    def update_steps(self, num_steps: int) -> list[int]:
        """The steps in [0, num_steps) at which a mask update runs."""
        return [t for t in range(num_steps) if self.is_update_step(t)]

    def scale(self, step):
        return jnp.ones((), jnp.float32) + 0.0 * jnp.asarray(step, jnp.float32)

    def is_update_step(self, step: int) -> bool:
        return False

    def update_fraction(self, step):
        return jnp.zeros((), jnp.float32)


SCHEDULES: Registry[type[Schedule]] = Registry("schedule")


@gin.configurable
@SCHEDULES.register("constant")
class ConstantSchedule(Schedule):
    """Static sparsity: the mask chosen at init is kept for the whole run."""


@gin.configurable
@SCHEDULES.register("dense")
class DenseSchedule(Schedule):
    """Never sparse (dense baseline)."""

    init_scale = 0.0

    def scale(self, step):
        return jnp.zeros((), jnp.float32) + 0.0 * jnp.asarray(step, jnp.float32)


@gin.configurable
@SCHEDULES.register("one_shot")
class OneShotSchedule(Schedule):
    """Dense until ``step``; pruned to the final density at ``step`` (0 = at init, e.g. SNIP)."""

    init_scale = 0.0
    prunes = True

    def __init__(self, step: int | float = 0):
        self._spec(step=(step, 0))

    def _check(self):
        if self.step >= self._bound:
            raise ValueError(f"OneShotSchedule.step={self.step} is not inside the run of "
                             f"{self._bound} steps, so the prune would never happen")

    def scale(self, step):
        return (jnp.asarray(step) >= self.step).astype(jnp.float32)

    def is_update_step(self, step: int) -> bool:
        return int(step) == self.step


@gin.configurable
@SCHEDULES.register("polynomial")
class PolynomialSchedule(Schedule):
    """Gradual pruning (Zhu & Gupta): ``scale = 1 - (1 - p)^exponent``, p = progress in [start, end].

    Updates every ``frequency`` steps from ``start`` and at ``end``.
    """

    init_scale = 0.0
    prunes = True

    def __init__(self, start: int | float = 0.0, end: int | float = 0.75,
                 frequency: int | float = 0.05, exponent: float = 3.0):
        self._spec(start=(start, 0), end=(end, 0), frequency=(frequency, 1))
        if not exponent > 0:
            raise ValueError(f"{type(self).__name__}.exponent={exponent!r} must be > 0")
        self.exponent = float(exponent)

    def _check(self):
        self._check_span()

    def scale(self, step):
        p = jnp.clip((jnp.asarray(step, jnp.float32) - self.start) / (self.end - self.start), 0.0, 1.0)
        return 1.0 - (1.0 - p) ** self.exponent

    def is_update_step(self, step: int) -> bool:
        step = int(step)
        if step < self.start or step > self.end:
            return False
        return (step - self.start) % self.frequency == 0 or step == self.end


@gin.configurable
@SCHEDULES.register("drop_grow")
class DropGrowSchedule(Schedule):
    """Periodic drop/grow (SET, RigL): every ``frequency`` steps in (start, end), with update
    fraction ``init_fraction`` decayed by cosine (or kept constant)."""

    kind = "drop_grow"
    init_scale = 1.0

    def __init__(self, frequency: int | float = 0.05, end: int | float = 0.75,
                 init_fraction: float = 0.3, start: int | float = 0, decay: str = "cosine"):
        self._spec(frequency=(frequency, 1), end=(end, 0), start=(start, 0))
        if not 0.0 < init_fraction <= 1.0:
            raise ValueError(f"DropGrowSchedule.init_fraction={init_fraction!r} is outside (0, 1]")
        if decay not in ("cosine", "constant"):
            raise ValueError(f"DropGrowSchedule.decay={decay!r} is not 'cosine' or 'constant'")
        self.init_fraction, self.decay = float(init_fraction), decay

    def _check(self):
        self._check_span()

    def is_update_step(self, step: int) -> bool:
        step = int(step)
        return self.start < step < self.end and (step - self.start) % self.frequency == 0

    def update_fraction(self, step):
        if self.decay == "constant":
            return jnp.float32(self.init_fraction) + 0.0 * jnp.asarray(step, jnp.float32)
        p = jnp.clip((jnp.asarray(step, jnp.float32) - self.start) / (self.end - self.start), 0.0, 1.0)
        return 0.5 * self.init_fraction * (1.0 + jnp.cos(jnp.pi * p))


@gin.configurable
@SCHEDULES.register("sparse_then_dense")
class SparseThenDenseSchedule(Schedule):
    """SPDF: sparse from init, made dense at ``dense_step`` and trained on densely."""

    init_scale = 1.0

    def __init__(self, dense_step: int | float = 0.5):
        self._spec(dense_step=(dense_step, 1))

    def _check(self):
        if self.dense_step >= self._bound:
            raise ValueError(f"SparseThenDenseSchedule.dense_step={self.dense_step} is not "
                             f"inside the run of {self._bound} steps; the run would never go "
                             f"dense")

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
            f"AverageDensitySchedule.avg_density={avg_density!r} is not reachable with this "
            f"schedule; valid range ({lo:.4f}, 1]")
    return final


def solve_start_step(avg_density: float, final_density: float, end: int, total_steps: int,
                     frequency: int = 1, exponent: float = 3.0) -> int:
    """Latest-first bisection for the start step whose polynomial schedule (ending at ``end``)
    gives the average density closest to ``avg_density`` (later start -> denser run)."""

    def avg(start: int) -> float:
        s = PolynomialSchedule(start, end, frequency, exponent).bind(total_steps)
        return realized_average_density(s, final_density, total_steps)

    lo, hi = 0, end - 1
    if not avg(lo) <= avg_density <= avg(hi):
        raise ValueError(
            f"AverageDensitySchedule.avg_density={avg_density!r} is not reachable with final "
            f"density {final_density} and end {end}; valid range [{avg(lo):.4f}, {avg(hi):.4f}]")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if avg(mid) <= avg_density:
            lo = mid
        else:
            hi = mid
    return lo if abs(avg(lo) - avg_density) <= abs(avg(hi) - avg_density) else hi


@gin.configurable
@SCHEDULES.register("average_density")
class AverageDensitySchedule(PolynomialSchedule):
    """Gradual polynomial schedule meeting a prescribed *average* density over the run ("The
    Journey Matters"). Solves for the final density (``solve_for="final_density"``) or for
    the start step given ``final_density``. ``total_steps`` defaults to the run's length."""

    def __init__(self, avg_density: float = 0.5, total_steps: int | float | None = None,
                 start: int | float = 0, end: int | float = 0.5, frequency: int | float = 0.01,
                 exponent: float = 3.0, solve_for: str = "final_density",
                 final_density: float | None = None):
        if not 0.0 < avg_density <= 1.0 or math.isnan(avg_density):
            raise ValueError(f"AverageDensitySchedule.avg_density={avg_density!r} is outside (0, 1]")
        if solve_for not in ("final_density", "start"):
            raise ValueError(f"AverageDensitySchedule.solve_for={solve_for!r} is not "
                             f"'final_density' or 'start'")
        if solve_for == "start":
            if final_density is None or not 0.0 < final_density <= 1.0:
                raise ValueError(f"AverageDensitySchedule.final_density={final_density!r} must "
                                 f"be in (0, 1] when solve_for='start'")
        elif final_density is not None:
            raise ValueError(f"AverageDensitySchedule.final_density={final_density!r} is given "
                             f"but solve_for='final_density' solves for it; use solve_for='start'")
        super().__init__(start, end, frequency, exponent)
        if total_steps is not None:
            self._steps["total_steps"] = (total_steps, 1)
            check_step_spec(total_steps, "AverageDensitySchedule.total_steps", 1)
        self.avg_density, self.solve_for = float(avg_density), solve_for
        self._given_final = final_density

    def _check(self):
        if "total_steps" not in self._steps:
            self.total_steps = self._bound
        if self.end > self.total_steps:
            raise ValueError(f"AverageDensitySchedule.end={self.end} is after total_steps "
                             f"{self.total_steps}")
        if self.solve_for == "final_density":
            self._check_span()
            self.final_density = solve_final_density(self, self.avg_density, self.total_steps)
        else:
            self.start = solve_start_step(self.avg_density, self._given_final, self.end,
                                          self.total_steps, self.frequency, self.exponent)
            self.final_density = float(self._given_final)
