"""Gradual magnitude pruning of compact block-sparse weights: the fan-in `k` shrinks in stages.

A block-sparse projection (models/formats/block_sparse.py: values [out_blocks, k, block_in,
block_out], indices [out_blocks, k]) starts with the fan-in of `BlockSparse.density` (1.0:
every block). At each update step of the schedule (Zhu & Gupta's cubic `polynomial` schedule)
the stored fraction goes to `d(t) = d0 + (density - d0) * scale(t)`, spread over the
projections as the format spreads its density at init (`BlockSparse.distribution`), and each
output block column keeps its `k(t)` stored blocks of largest Frobenius norm. Kept blocks keep
their values and optimizer slots; the others are gone from params, optimizer state and
checkpoints.

Every stage changes the param shapes, so the train step compiles again: the stages are
planned on the host at `init` (steps whose fan-ins equal the previous stage's are skipped),
logged when they happen (the trainer), and a shipped config keeps them few. A run resumed
after a stage restores the shrunk shapes from its checkpoint (`resizes`).
"""
from __future__ import annotations

import logging
from typing import Any

import gin
import jax
import jax.numpy as jnp

# the module, not its names: models/formats/block_sparse.py imports sparsejax.sparsity
# (distributions), whose package imports this module while block_sparse is still loading
from sparsejax.models.formats import block_sparse as block_format
from sparsejax.sparsity import optim
from sparsejax.sparsity import schedules as sched_lib
from sparsejax.sparsity.block_dst import _flat, _unflat, block_norms
from sparsejax.sparsity.distributions import check_density
from sparsejax.sparsity.layout import LAYOUT
from sparsejax.sparsity.method import METHODS, SparsityMethod, new_stats_state, track_density

PyTree = Any
log = logging.getLogger(__name__)


def keep_slots(values: jax.Array, k: int) -> jax.Array:
    """[out_blocks, k] int32: per output block column, the slots of the k stored blocks of
    largest Frobenius norm, in slot order."""
    top = jax.lax.top_k(block_norms(values), k)[1]
    return jnp.sort(top, axis=-1).astype(jnp.int32)


def take(x: jax.Array, slots: jax.Array) -> jax.Array:
    """x [out_blocks, k, ...] at `slots` [out_blocks, k'] along its second axis."""
    idx = slots.reshape(slots.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


@gin.configurable
@METHODS.register("block_gmp")
class BlockGMPMethod(SparsityMethod):
    """GMP on compact block-sparse weights: the fan-in shrinks to `density` in stages."""

    resizes = ("values", "indices")  # leaves whose k axis an update shrinks (checkpoints)

    def __init__(self, density: float = 0.1, schedule: str | sched_lib.Schedule = "polynomial"):
        self.density = check_density(density, "BlockGMPMethod.density")
        if isinstance(schedule, str):
            schedule = sched_lib.SCHEDULES.get(schedule, "BlockGMPMethod.schedule")()
        if not isinstance(schedule, sched_lib.PolynomialSchedule):
            raise ValueError(f"BlockGMPMethod.schedule={type(schedule).__name__} is not valid; "
                             f"valid: 'polynomial' (gradual pruning in stages)")
        self.schedule = schedule
        self.stages: list[tuple[int, dict[str, int]]] = []  # (step, {values path: k}), planned

    def bind(self, run):
        super().bind(run)
        self.schedule.bind(run.num_steps)
        return self

    def _projections(self, flat_params) -> dict[str, tuple[int, int, int, int]]:
        """{values path: (in_features, out_features, k, block_in)} of the block-sparse
        projections."""
        out = {}
        for owner, c in self.require_bound().compact.items():
            v = flat_params.get(f"{owner}/values")
            if v is not None:
                out[f"{owner}/values"] = (c.in_features, c.out_features, v.shape[1], v.shape[2])
        return out

    def plan(self, flat_params) -> None:
        """The stages (host side, from the static shapes): at each update step of the
        schedule, the fan-in of every projection; steps that change nothing are dropped."""
        projs = self._projections(flat_params)
        if not projs:
            raise ValueError("make_method.name='block_gmp' shrinks compact block-sparse weights, "
                             "and this model has none: set ModelConfig.weight_format="
                             "'block_sparse' (or an override)")
        fmt = block_format.BlockSparse()
        shapes = {p: (i, o) for p, (i, o, _, _) in projs.items()}
        k = {p: kk for p, (_, _, kk, _) in projs.items()}
        d0 = self.stored_fraction(flat_params)
        if self.density >= d0:
            raise ValueError(f"BlockGMPMethod.density={self.density} must be below the stored "
                             f"fraction at init ({d0:.4f}, BlockSparse.density="
                             f"{fmt.density}); GMP only shrinks the layout")
        self.stages = []
        for t in self.schedule.update_steps(self.run.num_steps):
            with jax.ensure_compile_time_eval():  # init may run under a trace
                d = d0 + (self.density - d0) * float(self.schedule.scale(t))
            if fmt.plans_layers:
                want = block_format.fan_in(shapes, d, fmt.distribution, projs[next(iter(projs))][3],
                              fmt.block_out)
            else:
                want = {p: max(1, round(d * (i // projs[p][3]))) for p, (i, _) in shapes.items()}
            new = {p: min(k[p], want[p]) for p in k}
            if new != k:
                self.stages.append((t, new))
                k = new

    def stored_fraction(self, flat_params) -> float:
        projs = self._projections(flat_params)
        return (sum(kk * o * bi for (_, o, kk, bi) in projs.values())
                / sum(i * o for (i, o, _, _) in projs.values()))

    def init(self, params, rng):
        flat = _flat(params)
        self.plan(flat)
        return params, {**new_stats_state(None),
                        "density": jnp.float32(self.stored_fraction(flat))}

    def is_update_step(self, step: int) -> bool:
        return any(t == int(step) for t, _ in self.stages)

    def on_grads(self, params, sparsity, grads, *, step=0):
        return grads, track_density(sparsity)

    def _next_stage(self, flat_params) -> dict[str, int]:
        """The fan-ins after the stage that follows the layout of `flat_params` (static)."""
        now = {p: kk for p, (_, _, kk, _) in self._projections(flat_params).items()}
        plans = [k for _, k in self.stages]
        for k in plans:
            if all(k[p] <= now[p] for p in now) and k != now:
                return k
        raise ValueError(f"BlockGMPMethod: no stage follows the current fan-ins {now} "
                         f"(the planned stages end at {plans[-1] if plans else now})")

    def update(self, params, opt_state, sparsity, *, step, rng=None, grads=None):
        flat_p, flat_l = _flat(params), _flat(sparsity[LAYOUT])
        target = self._next_stage(flat_p)
        slots, before, dropped = {}, 0, 0
        for vpath, k in target.items():
            before += flat_p[vpath].shape[0] * flat_p[vpath].shape[1]
            dropped += flat_p[vpath].shape[0] * (flat_p[vpath].shape[1] - k)
            values = flat_p[vpath]
            if k == values.shape[1]:
                continue
            s = keep_slots(values, k)
            ipath = vpath[: -len("values")] + "indices"
            flat_p[vpath], flat_l[ipath] = take(values, s), take(flat_l[ipath], s)
            slots[vpath] = s
        new_params = _unflat(flat_p)
        opt_state = optim.take_slots(opt_state, params, _unflat(
            {p: slots.get(p) for p in _flat(params)}), take)
        density = jnp.float32(self.stored_fraction(flat_p))
        sparsity = {**sparsity, LAYOUT: _unflat(flat_l), "density": density}
        metrics = {"sparsity/density": density, "sparsity/churn": jnp.float32(dropped / before)}
        return new_params, opt_state, sparsity, metrics

    def metrics(self, params, sparsity):
        """The stored fraction now and its running average; the average param count counts
        the block-sparse projections at that average (their stored entries over the run)."""
        out = super().metrics(params, sparsity)
        out["sparsity/density"] = sparsity["density"]
        dense = sum(i * o for (i, o, _, _) in self._projections(_flat(params)).values())
        out["sparsity/avg_param_count"] = out["sparsity/param_count"] + (
            sparsity["avg_density"] - sparsity["density"]) * dense
        return out
