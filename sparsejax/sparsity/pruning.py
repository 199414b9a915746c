"""Mask-based sparse training composed from registered parts: a distribution (per-layer
densities), a schedule (when masks change and how sparse), criteria (how entries are
scored when pruning, dropping, growing or choosing the initial mask) and a structure
(unstructured, global, per-output, N:M, block).

Static random, one-shot, gradual (GMP), SNIP, movement, SET, RigL, SPDF and magnitude N:M
are presets of this one class: gin files under configs/sparsity/ that bind its parts.

Pruned weights are exactly zero in the params and held there by
:func:`sparsejax.sparsity.optim.masked_optimizer`; the forward pass uses the params as
they are (pruned entries are zero), so the gradient is the dense gradient RigL/SNIP need.

A part that the chosen schedule never uses may not be bound: ``grow`` without a drop/grow
schedule, ``criterion`` with a schedule whose updates never prune, ``init_criterion``
with one that starts dense, and a ``density`` or ``distribution`` that the structure or
schedule fixes are refused with a message naming both settings.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import gin
import jax
import optax

from sparsejax.sparsity import distributions as dist_lib
from sparsejax.sparsity import masks as masks_lib
from sparsejax.sparsity import optim
from sparsejax.sparsity import paths as paths_lib
from sparsejax.sparsity import schedules as sched_lib
from sparsejax.sparsity import select
from sparsejax.sparsity import structures as struct_lib
from sparsejax.sparsity.criteria import CRITERIA, Criterion
from sparsejax.sparsity.method import (METHODS, Metrics, RunInfo, SparsityMethod,
                                       density_metrics, new_stats_state, track_density,
                                       with_masks)

PyTree = Any
DEFAULT_DENSITY = 0.1


def _part(registry, value, setting: str):
    """A registered part by name (built with its gin bindings), or the object as given."""
    return registry.get(value, setting)() if isinstance(value, str) else value


@gin.configurable
@METHODS.register("masked_pruning")
class MaskedPruningMethod(SparsityMethod):
    """Masks chosen by criteria on the steps of a schedule, with a structure.

    Args:
      density: final kept fraction of the prunable params (default 0.1; fixed by an N:M
        structure or by a schedule that solves for it, e.g. 'average_density').
      distribution: a registered distribution of per-layer densities ('erk' by default).
      overrides: regex on param paths -> density for matched layers.
      include / exclude: regexes forcing params into / out of pruning.
      schedule: a registered schedule ('constant': static sparsity) or a Schedule.
      criterion: scores at pruning updates, and the drop scores of drop/grow schedules
        (default 'magnitude').
      init_criterion: scores choosing the initial mask of runs that start sparse (default
        'random').
      grow: scores choosing the entries grown by drop/grow schedules (default 'gradient').
      structure: a registered structure ('unstructured' by default) or a Structure.
    """

    def __init__(self, density: float | None = None, distribution: str | None = None,
                 overrides: Mapping[str, float] | None = None, include: Sequence[str] = (),
                 exclude: Sequence[str] = (), schedule: str | sched_lib.Schedule = "constant",
                 criterion: str | Criterion | None = None,
                 init_criterion: str | Criterion | None = None,
                 grow: str | Criterion | None = None,
                 structure: str | struct_lib.Structure = "unstructured"):
        P = "MaskedPruningMethod"
        self.schedule = _part(sched_lib.SCHEDULES, schedule, f"{P}.schedule")
        self.structure = _part(struct_lib.STRUCTURES, structure, f"{P}.structure")
        sname = type(self.schedule).__name__
        drop_grow = self.schedule.kind == "drop_grow"
        uses = {"criterion": drop_grow or self.schedule.prunes,
                "init_criterion": self.schedule.init_scale > 0, "grow": drop_grow}
        given = {"criterion": criterion, "init_criterion": init_criterion, "grow": grow}
        for name, value in given.items():
            if value is not None and not uses[name]:
                raise ValueError(f"{P}.{name}={value!r} has no effect with {P}.schedule="
                                 f"{schedule!r} ({sname}): " + {
                                     "criterion": "its updates never prune",
                                     "init_criterion": "the run starts dense",
                                     "grow": "only drop/grow schedules grow"}[name])
        self.criterion = self._criterion(criterion, "magnitude", f"{P}.criterion") \
            if uses["criterion"] else None
        self.init_criterion = self._criterion(init_criterion, "random", f"{P}.init_criterion") \
            if uses["init_criterion"] else None
        self.grow = self._criterion(grow, "gradient", f"{P}.grow") if drop_grow else None
        if self.init_criterion is not None and (self.init_criterion.needs_grads or
                                                self.init_criterion.init_state(None) is not None):
            raise ValueError(f"{P}.init_criterion={init_criterion!r} needs gradients or "
                             f"accumulated state, which do not exist when the initial mask is "
                             f"chosen; use a one-shot schedule at step 0 (SNIP) instead")
        fixed = self.structure.fixed_density
        if fixed is not None:
            stype = type(self.structure).__name__
            if density is not None and abs(float(density) - fixed) > 1e-9:
                raise ValueError(f"{P}.density={density!r} conflicts with {P}.structure="
                                 f"{structure!r} ({stype}), which keeps a fixed {fixed:g}")
            if distribution is not None or overrides:
                raise ValueError(f"{P}.distribution / overrides have no effect with {P}."
                                 f"structure={structure!r}: every layer keeps {fixed:g}")
            if (drop_grow and not self.structure.supports_drop_grow) or \
                    isinstance(self.schedule, sched_lib.PolynomialSchedule):
                raise ValueError(f"{P}.structure={structure!r} fixes the density, so it needs "
                                 f"a static, one-shot or sparse-then-dense schedule, not {sname}")
        elif drop_grow and not self.structure.supports_drop_grow:
            raise ValueError(f"{P}.structure={structure!r} does not support drop/grow "
                             f"schedules ({sname})")
        self._given_density = None if density is None else dist_lib.check_density(
            density, f"{P}.density")
        self.density = fixed if fixed is not None else (self._given_density or DEFAULT_DENSITY)
        self.distribution = distribution or "erk"
        dist_lib.DISTRIBUTIONS.get(self.distribution, f"{P}.distribution")
        self.overrides = dict(overrides or {})
        self.include, self.exclude = tuple(include), tuple(exclude)

    @staticmethod
    def _criterion(value, default: str, setting: str) -> Criterion:
        return _part(CRITERIA, default if value is None else value, setting)

    def bind(self, run: RunInfo) -> "MaskedPruningMethod":
        super().bind(run)
        self.schedule.bind(run.num_steps)
        final = self.schedule.final_density
        if final is not None:
            if self._given_density is not None:
                raise ValueError(f"MaskedPruningMethod.density={self._given_density!r} conflicts "
                                 f"with {type(self.schedule).__name__}, which solves the final "
                                 f"density ({final:.4f}) itself")
            self.density = dist_lib.check_density(final, "final density")
        return self

    @property
    def needs_dense_grads(self) -> bool:
        return any(c is not None and c.needs_grads for c in
                   ((self.criterion, self.grow) if self.schedule.kind == "drop_grow"
                    else (self.criterion,)))

    # --- host-side helpers ---------------------------------------------------------

    def layer_targets(self, masks: PyTree) -> dict[str, float]:
        """{path: final density} from the real (unpadded) mask shapes."""
        shapes = {}
        for path, m in paths_lib.named_leaves(masks):
            shape = list(m.shape)
            if path in self.valid:
                axis, length = self.valid[path]
                shape[axis] = min(length, shape[axis])
            shapes[path] = tuple(shape)
        if self.structure.fixed_density is not None:
            return {p: self.density for p in shapes}
        return dist_lib.layer_densities(shapes, self.density, self.distribution, self.overrides)

    def _select(self, params: PyTree, masks: PyTree, scale, criterion: Criterion, rng=None,
                grads=None, state=None, alive_only: bool = True) -> PyTree:
        w = masks_lib.select_masked(params, masks)
        g = None if grads is None else masks_lib.select_masked(grads, masks)
        scores = criterion.scores(w, grads=g, rng=rng, state=state)
        counts = select.density_counts(masks, self.layer_targets(masks), scale,
                                       masks_lib.real_sizes(masks, self.valid))
        return self.structure.select(scores, masks, counts, scale=scale, alive_only=alive_only,
                                     valid=self.valid_masks(masks))

    # --- protocol ------------------------------------------------------------------

    def init(self, params: PyTree, rng: jax.Array) -> tuple[PyTree, PyTree]:
        self.require_bound()
        prunable = paths_lib.prunable_tree(params, self.include, self.exclude)
        masks = masks_lib.ones_masks(params, prunable, self.valid)
        for path, m in paths_lib.named_leaves(masks):
            self.structure.check(path, m.shape)
        self.layer_targets(masks)  # validates overrides against the param paths
        if self.schedule.init_scale > 0:
            masks = self._select(params, masks, self.schedule.init_scale, self.init_criterion,
                                 rng=rng, alive_only=False)
        params = masks_lib.apply_masks(params, masks)
        crit_state = None if self.criterion is None else self.criterion.init_state(masks)
        return params, new_stats_state(masks, self.valid, criterion_state=crit_state)

    def wrap_optimizer(self, tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
        return optim.masked_optimizer(tx)

    def on_grads(self, params, sparsity, grads, *, step=0):
        if sparsity.get("criterion_state") is not None:
            masks = sparsity["masks"]
            state = self.criterion.accumulate(sparsity["criterion_state"],
                                              masks_lib.select_masked(params, masks),
                                              masks_lib.select_masked(grads, masks))
            sparsity = {**sparsity, "criterion_state": state}
        return grads, track_density(sparsity)

    def is_update_step(self, step: int) -> bool:
        return self.schedule.is_update_step(step)

    def update(self, params, opt_state, sparsity, *, step, rng=None, grads=None):
        old, state = sparsity["masks"], sparsity.get("criterion_state")
        if self.schedule.kind == "drop_grow":
            w = masks_lib.select_masked(params, old)
            g = None if grads is None else masks_lib.select_masked(grads, old)
            drop_rng, grow_rng = (None, None) if rng is None else jax.random.split(rng)
            drop = self.criterion.scores(w, grads=g, rng=drop_rng, state=state)
            grow = self.grow.scores(w, grads=g, rng=grow_rng, state=state)
            new = select.drop_grow(old, drop, self.schedule.update_fraction(step), grow,
                                   self.valid_masks(old))
        else:
            # A schedule whose updates never prune (sparse-then-dense) only widens the masks to
            # the scheduled count, so any criterion picks the same entries.
            criterion = self.criterion or CRITERIA.get("magnitude")()
            new = self._select(params, old, self.schedule.scale(step), criterion, rng=rng,
                               grads=grads, state=state)
        return apply_mask_change(params, opt_state, sparsity, old, new, self.valid)


def apply_mask_change(params: PyTree, opt_state: PyTree, sparsity: PyTree, old: PyTree,
                      new: PyTree, valid: Mapping | None = None
                      ) -> tuple[PyTree, PyTree, PyTree, Metrics]:
    """Zeroes pruned and grown weights, resets their optimizer slots, stores the new masks."""
    params = select.update_params_for_masks(params, old, new)
    changed = jax.tree.map(lambda a, b: a != b, old, new)
    opt_state = optim.reset_slots(opt_state, params, changed)
    metrics = density_metrics(new, valid)
    metrics["sparsity/churn"] = masks_lib.mask_churn(old, new, valid)
    return params, opt_state, with_masks(sparsity, new, valid), metrics
