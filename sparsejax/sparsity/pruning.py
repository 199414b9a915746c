"""Mask-based sparse training: static, one-shot, gradual (GMP, movement), SNIP,
drop/grow (SET, RigL), sparse-then-dense (SPDF) and magnitude N:M.

Pruned weights are exactly zero in the params and held there by
:func:`sparsejax.sparsity.optim.masked_optimizer`; the forward pass masks with a
straight-through gradient so the dense gradient is available (RigL, SNIP).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import gin
import jax
import jax.numpy as jnp
import optax

from sparsejax.sparsity import criteria
from sparsejax.sparsity import distributions as dist_lib
from sparsejax.sparsity import masks as masks_lib
from sparsejax.sparsity import nm as nm_lib
from sparsejax.sparsity import optim
from sparsejax.sparsity import paths as paths_lib
from sparsejax.sparsity import schedules as sched_lib
from sparsejax.sparsity.method import (Metrics, SparsityMethod, density_metrics, new_stats_state,
                                       track_density, with_masks)

PyTree = Any
INIT_CRITERIA = ("random", "magnitude")


@gin.configurable
class MaskedPruningMethod(SparsityMethod):
    """Masks chosen by ``criterion`` (or drop/grow) on the steps of ``schedule``.

    Args:
      density: final kept fraction of the prunable params (a schedule with its own
        ``final_density``, e.g. AverageDensitySchedule, takes precedence).
      distribution: 'uniform', 'erdos_renyi' or 'erk' (per-layer densities).
      overrides: regex on param paths -> density for matched layers.
      include / exclude: regexes forcing params into / out of pruning.
      schedule: a ``schedules.Schedule`` (default: static sparsity).
      criterion: prune criterion at update steps: 'magnitude', 'global_magnitude',
        'random', 'snip' or 'movement'.
      init_criterion: how the initial sparse mask is chosen: 'random' or 'magnitude'.
      grow: for drop/grow schedules: 'random' (SET) or 'gradient' (RigL).
      nm: (N, M) for N:M masks by magnitude along ``nm_axis`` (density = N/M).
    """

    def __init__(self, density: float = 0.1, distribution: str = "erk",
                 overrides: Mapping[str, float] | None = None, include: Sequence[str] = (),
                 exclude: Sequence[str] = (), schedule: sched_lib.Schedule | None = None,
                 criterion: str = "magnitude", init_criterion: str = "random", grow: str = "gradient",
                 nm: tuple[int, int] | None = None, nm_axis: int = -2):
        self.schedule = schedule if schedule is not None else sched_lib.ConstantSchedule()
        final = self.schedule.final_density
        self.density = dist_lib.check_density(final if final is not None else density)
        if distribution not in dist_lib.DISTRIBUTIONS:
            raise ValueError(f"distribution: {distribution!r} is not one of {dist_lib.DISTRIBUTIONS}")
        if criterion not in criteria.CRITERIA:
            raise ValueError(f"criterion: {criterion!r} is not one of {criteria.CRITERIA}")
        if init_criterion not in INIT_CRITERIA:
            raise ValueError(f"init_criterion: {init_criterion!r} is not one of {INIT_CRITERIA}")
        if grow not in criteria.GROW:
            raise ValueError(f"grow: {grow!r} is not one of {criteria.GROW}")
        if nm is not None:
            nm_lib.check_nm(*nm)
            if self.schedule.kind == "drop_grow" or isinstance(self.schedule, sched_lib.PolynomialSchedule):
                raise ValueError(f"nm: N:M masks need a static, one-shot or sparse-then-dense schedule, "
                                 f"not {type(self.schedule).__name__}")
            self.density = nm[0] / nm[1]
        self.distribution, self.overrides = distribution, dict(overrides or {})
        self.include, self.exclude = tuple(include), tuple(exclude)
        self.criterion, self.init_criterion, self.grow = criterion, init_criterion, grow
        self.nm, self.nm_axis = (tuple(nm) if nm is not None else None), nm_axis

    @property
    def needs_dense_grads(self) -> bool:
        if self.schedule.kind == "drop_grow":
            return self.grow == "gradient"
        return self.criterion == "snip"

    # --- host-side helpers ---------------------------------------------------------

    def layer_targets(self, masks: PyTree) -> dict[str, float]:
        """{path: final density} from the mask shapes (pure function of the shapes)."""
        shapes = {p: m.shape for p, m in paths_lib.named_leaves(masks)}
        if self.nm is not None:
            return {p: self.density for p in shapes}
        return dist_lib.layer_densities(shapes, self.density, self.distribution, self.overrides)

    def _select(self, params: PyTree, masks: PyTree, scale, criterion: str, rng=None, grads=None,
                movement=None, alive_only: bool = True) -> PyTree:
        if self.nm is not None:
            n, m = self.nm
            nm_masks = jax.tree.map(lambda w, _: nm_lib.nm_mask(w, n, m, self.nm_axis),
                                    criteria.masked_subtree(params, masks), masks)
            return jax.tree.map(lambda a: jnp.where(jnp.asarray(scale) > 0, a, True), nm_masks)
        scores = criteria.scores_for(criterion, params, masks, rng=rng, grads=grads, movement=movement)
        counts = criteria.density_counts(masks, self.layer_targets(masks), scale)
        if criterion == "global_magnitude":
            total = sum(counts.values())
            return criteria.global_topk(scores, masks, total, alive_only)
        return criteria.layerwise_topk(scores, masks, counts, alive_only)

    # --- protocol ------------------------------------------------------------------

    def init(self, params: PyTree, rng: jax.Array) -> tuple[PyTree, PyTree]:
        prunable = paths_lib.prunable_tree(params, self.include, self.exclude)
        masks = masks_lib.ones_masks(params, prunable)
        if self.nm is not None:
            for path, m in paths_lib.named_leaves(masks):
                nm_lib.check_groupable(m.shape, self.nm[1], self.nm_axis, f"params[{path!r}]")
        self.layer_targets(masks)  # validates overrides against the param paths
        if self.schedule.init_scale > 0:
            masks = self._select(params, masks, self.schedule.init_scale, self.init_criterion, rng=rng,
                                 alive_only=False)
        params = masks_lib.apply_masks(params, masks)
        movement = jax.tree.map(lambda m: jnp.zeros(m.shape, jnp.float32), masks) \
            if self.criterion == "movement" else None
        return params, new_stats_state(masks, movement=movement)

    def wrap_optimizer(self, tx: optax.GradientTransformation, sparsity: PyTree) -> optax.GradientTransformation:
        return optim.masked_optimizer(tx, sparsity["masks"])

    def forward_params(self, params, sparsity, *, step=0, rng=None):
        # Pruned weights are exactly zero in `params` (mask updates zero them and the masked
        # optimizer never moves them), so the masked forward equals `params`, and the gradient
        # w.r.t. pruned entries is the dense gradient RigL/SNIP need (what ste_masks computes).
        return params

    def on_grads(self, params, sparsity, grads, *, step=0):
        if sparsity.get("movement") is not None:
            masks = sparsity["masks"]
            w = criteria.masked_subtree(params, masks)
            g = criteria.masked_subtree(grads, masks)
            movement = jax.tree.map(lambda s, w_, g_: s - (w_ * g_).astype(jnp.float32),
                                    sparsity["movement"], w, g)
            sparsity = {**sparsity, "movement": movement}
        return grads, track_density(sparsity)

    def is_update_step(self, step: int) -> bool:
        return self.schedule.is_update_step(step)

    def update(self, params, opt_state, sparsity, *, step, rng=None, grads=None):
        old = sparsity["masks"]
        if self.schedule.kind == "drop_grow":
            frac = self.schedule.update_fraction(step)
            grow_scores = criteria.grow_scores_for(self.grow, old, rng, grads)
            new = criteria.drop_grow(old, params, frac, grow_scores)
        else:
            new = self._select(params, old, self.schedule.scale(step), self.criterion, rng=rng,
                               grads=grads, movement=sparsity.get("movement"))
        return apply_mask_change(params, opt_state, sparsity, old, new)


def apply_mask_change(params: PyTree, opt_state: PyTree, sparsity: PyTree, old: PyTree,
                      new: PyTree) -> tuple[PyTree, PyTree, PyTree, Metrics]:
    """Zeroes pruned and grown weights, resets their optimizer slots, stores the new masks."""
    params = criteria.update_params_for_masks(params, old, new)
    changed = jax.tree.map(lambda a, b: a != b, old, new)
    opt_state = optim.set_masks(optim.reset_slots(opt_state, params, changed), new)
    metrics = density_metrics(new)
    metrics["sparsity/churn"] = masks_lib.mask_churn(old, new)
    return params, opt_state, with_masks(sparsity, new), metrics

