"""Dynamic sparse training of compact block-sparse weights (SET and RigL at block level).

The layout of a block-sparse projection (models/formats/block_sparse.py: values
[out_blocks, k, block_in, block_out], indices [out_blocks, k]) changes at the update steps of
a drop/grow schedule: the `round(fraction * out_blocks * k)` (at least one) stored blocks of smallest
Frobenius norm in the layer are dropped, and each output block column grows as many blocks
as it lost, so the fan-in `k` (and with it every shape, the compiled step and the optimizer
state) stays the same. Grown blocks start at zero with zeroed optimizer slots, as the
masked-dense RigL does; a dropped block may be grown again (it restarts at zero).

Grow scores: 'random' (SET) or 'gradient' (RigL: the Frobenius norm of the dense gradient's
block, taken over a forward pass in which every projection holds all its blocks; that pass,
at update steps only, is the run's only dense product, `grad_view`).
"""
from __future__ import annotations

from typing import Any

import gin
import jax
import jax.numpy as jnp
from flax import traverse_util

from sparsejax.sparsity import optim
from sparsejax.sparsity import schedules as sched_lib
from sparsejax.sparsity.layout import LAYOUT
from sparsejax.sparsity.method import METHODS, SparsityMethod, new_stats_state

PyTree = Any
GROWS = ("random", "gradient")


def _flat(tree: PyTree) -> dict[str, Any]:
    return traverse_util.flatten_dict(tree, sep="/")


def _unflat(flat: dict[str, Any]) -> PyTree:
    return traverse_util.unflatten_dict(flat, sep="/")


def block_norms(values: jax.Array) -> jax.Array:
    """[out_blocks, n] Frobenius norms of values [out_blocks, n, block_in, block_out]."""
    v = values.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(v * v, axis=(2, 3)))


def full_blocks(values: jax.Array, indices: jax.Array, in_blocks: int) -> jax.Array:
    """values [ob, k, bi, bo] scattered into [ob, in_blocks, bi, bo] (zeros elsewhere): the
    layout that holds every block."""
    ob = values.shape[0]
    out = jnp.zeros((ob, in_blocks) + values.shape[2:], values.dtype)
    return out.at[jnp.arange(ob)[:, None], indices].set(values)


def drop_grow(values: jax.Array, indices: jax.Array, fraction: jax.Array,
              grow_scores: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(new values, new indices, dropped [ob, k]) for one projection: the layer's
    round(fraction * ob * k) (at least 1) weakest blocks dropped, each column regrowing as many of its
    highest-scoring (grow_scores [ob, in_blocks]) blocks not kept, in the freed slots."""
    ob, k = indices.shape
    # at least one block while the fraction is positive (a small layer would otherwise
    # stop moving long before the schedule ends)
    n = jnp.where(fraction > 0, jnp.maximum(jnp.round(fraction * ob * k), 1), 0).astype(jnp.int32)
    rank = jnp.argsort(jnp.argsort(block_norms(values).reshape(-1), stable=True), stable=True)
    dropped = (rank < n).reshape(ob, k)
    kept = jnp.any(jax.nn.one_hot(indices, grow_scores.shape[1], dtype=jnp.bool_)
                   & ~dropped[..., None], axis=1)  # [ob, in_blocks]
    candidates = jnp.argsort(jnp.where(kept, jnp.inf, -grow_scores.astype(jnp.float32)),
                             axis=-1, stable=True)[:, :k]  # best first, never a kept block
    slot = jnp.clip(jnp.cumsum(dropped, axis=1) - 1, 0, k - 1)  # j-th freed slot gets j-th best
    grown = jnp.take_along_axis(candidates, slot, axis=1).astype(indices.dtype)
    new_indices = jnp.where(dropped, grown, indices)
    new_values = jnp.where(dropped[..., None, None], jnp.zeros_like(values), values)
    return new_values, new_indices, dropped


@gin.configurable
@METHODS.register("block_dst")
class BlockDSTMethod(SparsityMethod):
    """SET / RigL on compact block-sparse weights: drop weak blocks, regrow per column."""

    def __init__(self, schedule: str | sched_lib.Schedule = "drop_grow", grow: str = "random"):
        if isinstance(schedule, str):
            schedule = sched_lib.SCHEDULES.get(schedule, "BlockDSTMethod.schedule")()
        if schedule.kind != "drop_grow":
            raise ValueError(f"BlockDSTMethod.schedule={type(schedule).__name__} is not a "
                             f"drop/grow schedule; a fixed layout needs no method "
                             f"(configs/sparsity/block_static.gin)")
        if grow not in GROWS:
            raise ValueError(f"BlockDSTMethod.grow={grow!r} is not valid; valid: {GROWS}")
        self.schedule, self.grow = schedule, grow

    @property
    def needs_dense_grads(self) -> bool:
        return self.grow == "gradient"

    def bind(self, run):
        super().bind(run)
        self.schedule.bind(run.num_steps)
        return self

    def init(self, params, rng):
        run = self.require_bound()
        if not run.compact:
            raise ValueError("make_method.name='block_dst' moves the blocks of compact "
                             "block-sparse weights, and this model has none: set "
                             "ModelConfig.weight_format='block_sparse' (or an override)")
        return params, new_stats_state(None)

    def is_update_step(self, step: int) -> bool:
        return self.schedule.is_update_step(step)

    def _projections(self, flat_params, flat_layout):
        """[(values path, indices path, in_blocks)] of the block-sparse projections."""
        out = []
        for lpath in flat_layout:
            owner = lpath.rsplit("/", 1)[0]
            vpath = f"{owner}/values"
            block_in = flat_params[vpath].shape[2]
            out.append((vpath, lpath, self.run.compact[owner].in_features // block_in))
        return out

    def grad_view(self, params, sparsity):
        """Params and layout in which every projection holds all its blocks (the dense
        gradient's blocks are the gradient of these values)."""
        if self.grow != "gradient":
            return params, sparsity
        flat_p, flat_l = _flat(params), _flat(sparsity[LAYOUT])
        for vpath, lpath, ib in self._projections(flat_p, flat_l):
            values, idx = flat_p[vpath], flat_l[lpath]
            flat_p[vpath] = full_blocks(values, idx, ib)
            flat_l[lpath] = jnp.broadcast_to(jnp.arange(ib, dtype=idx.dtype), (idx.shape[0], ib))
        return _unflat(flat_p), {**sparsity, LAYOUT: _unflat(flat_l)}

    def update(self, params, opt_state, sparsity, *, step, rng=None, grads=None):
        fraction = self.schedule.update_fraction(step)
        flat_p, flat_l = _flat(params), _flat(sparsity[LAYOUT])
        flat_g = None if grads is None else _flat(grads)
        changed = {path: None for path in flat_p}
        moved = total = 0
        for i, (vpath, lpath, ib) in enumerate(self._projections(flat_p, flat_l)):
            values, idx = flat_p[vpath], flat_l[lpath]
            if self.grow == "gradient":
                scores = block_norms(flat_g[vpath])  # full view: [ob, in_blocks]
            else:
                scores = jax.random.uniform(jax.random.fold_in(rng, i), (idx.shape[0], ib))
            flat_p[vpath], flat_l[lpath], dropped = drop_grow(values, idx, fraction, scores)
            changed[vpath] = jnp.broadcast_to(dropped[..., None, None], values.shape)
            moved, total = moved + jnp.sum(dropped), total + dropped.size
        params = _unflat(flat_p)
        opt_state = optim.reset_slots(opt_state, params, _unflat(changed))
        metrics = {"sparsity/churn": moved / total}
        return params, opt_state, {**sparsity, LAYOUT: _unflat(flat_l)}, metrics
