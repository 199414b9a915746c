"""Sparse fine-tuning: train a subset of the params of a base model, store the
result as a sparse difference, and compose several differences onto one base.

* LT-SFT (lottery-ticket sparse fine-tuning): fine-tune fully until
  ``select_step``, keep the ``density`` fraction of entries that changed most,
  rewind everything to the base and train only those.
* SpIEL-style fixed budget: a ``density`` fraction is trainable from the start;
  every ``frequency`` steps the trainable entries whose difference from the base
  is smallest are reset to the base and dropped, and as many untrained entries
  with the largest dense-gradient magnitude are grown.

Here the masks mean "trainable"; untrainable entries keep their base value
(params are *not* zeroed) and params outside the candidate set are frozen.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax.config import check_step_spec, run_step
from sparsejax.sparsity import distributions as dist_lib
from sparsejax.sparsity import masks as masks_lib
from sparsejax.sparsity import optim
from sparsejax.sparsity import paths as paths_lib
from sparsejax.sparsity import select
from sparsejax.sparsity.criteria import uniform_scores
from sparsejax.sparsity.method import (METHODS, SparsityMethod, density_metrics,
                                       new_stats_state, with_masks)

PyTree = Any
SparseDiff = dict[str, dict[str, np.ndarray]]  # {param path: {"indices": int32[k], "values": [k]}}
MODES = ("lt_sft", "spiel")


def most_changed_masks(base: PyTree, tuned: PyTree, masks: PyTree, density: float,
                       valid=None) -> PyTree:
    """Masks keeping the ``density`` fraction of masked entries with the largest |tuned - base|
    (one global ranking over all masked params)."""
    density = dist_lib.check_density(density)
    delta = masks_lib.map_masked(lambda t, _, b: jnp.abs(t - b), masks, tuned, base)
    k = int(round(density * masks_lib.num_masked(masks, valid)))
    return select.global_topk(masks_lib.select_masked(delta, masks), masks, k, alive_only=False,
                              valid=masks_lib.valid_tree(masks, valid))


def sparse_diff(base: PyTree, tuned: PyTree, masks: PyTree | None = None) -> SparseDiff:
    """Host-side sparse difference: entries where ``masks`` is True (or, without masks, where
    ``tuned != base``), as flat indices and ``tuned - base`` values per param path."""
    named_t = dict(paths_lib.named_leaves(tuned))
    named_m = {} if masks is None else dict(paths_lib.named_leaves(masks))
    out: SparseDiff = {}
    for path, b in paths_lib.named_leaves(base):
        t = np.asarray(named_t[path]).reshape(-1)
        b = np.asarray(b).reshape(-1)
        sel = np.asarray(named_m[path]).reshape(-1) if path in named_m else (t != b)
        idx = np.nonzero(sel)[0].astype(np.int32)
        if idx.size:
            out[path] = {"indices": idx, "values": (t[idx] - b[idx]).astype(t.dtype)}
    return out


def apply_diffs(base: PyTree, diffs: Sequence[SparseDiff], scales: Sequence[float] | None = None) -> PyTree:
    """``base + sum_i scales[i] * diffs[i]`` (composition of sparse fine-tunings)."""
    scales = [1.0] * len(diffs) if scales is None else list(scales)
    if len(scales) != len(diffs):
        raise ValueError(f"scales: {len(scales)} values for {len(diffs)} diffs")
    named = dict(paths_lib.named_leaves(base))
    for i, d in enumerate(diffs):
        for path, entry in d.items():
            if path not in named:
                raise ValueError(f"diffs[{i}]: path {path!r} is not a param; params are {sorted(named)}")
            size = int(np.prod(np.shape(named[path])))
            idx = np.asarray(entry["indices"])
            if idx.size and (idx.min() < 0 or idx.max() >= size):
                raise ValueError(f"diffs[{i}][{path!r}]: indices outside [0, {size})")

    def add(path: str, x: jax.Array) -> jax.Array:
        flat = jnp.asarray(x).reshape(-1)
        for d, s in zip(diffs, scales):
            if path in d:
                vals = jnp.asarray(d[path]["values"], flat.dtype) * jnp.asarray(s, flat.dtype)
                flat = flat.at[jnp.asarray(d[path]["indices"])].add(vals)
        return flat.reshape(jnp.shape(x))

    return paths_lib.map_with_path(add, base)


@gin.configurable
@METHODS.register("sparse_finetune")
class SparseFinetuneMethod(SparsityMethod):
    """LT-SFT or SpIEL-style sparse fine-tuning through the trainer protocol.

    ``select_step`` (LT-SFT) and ``frequency`` / ``end`` (SpIEL) are absolute steps (ints)
    or fractions of the run (floats in [0, 1]). After training, :meth:`export_diff` gives
    the sparse difference to the base.
    """

    def __init__(self, mode: str = "lt_sft", density: float = 0.05,
                 select_step: int | float | None = None, frequency: int | float | None = None,
                 end: int | float | None = None, drop_fraction: float | None = None,
                 include: Sequence[str] = (), exclude: Sequence[str] = (), freeze_others: bool = True):
        P = "SparseFinetuneMethod"
        if mode not in MODES:
            raise ValueError(f"{P}.mode={mode!r} is not one of {MODES}")
        unused = {"lt_sft": ("frequency", "end", "drop_fraction"), "spiel": ("select_step",)}[mode]
        args = {"select_step": select_step, "frequency": frequency, "end": end,
                "drop_fraction": drop_fraction}
        for name in unused:
            if args[name] is not None:
                raise ValueError(f"{P}.{name}={args[name]!r} has no effect with mode={mode!r}")
        self.density = dist_lib.check_density(density, f"{P}.density")
        self._steps = {"select_step": check_step_spec(0.2 if select_step is None else select_step,
                                                      f"{P}.select_step", 1),
                       "frequency": check_step_spec(0.05 if frequency is None else frequency,
                                                    f"{P}.frequency", 1),
                       "end": check_step_spec(0.75 if end is None else end, f"{P}.end", 1)}
        drop_fraction = 0.1 if drop_fraction is None else drop_fraction
        if not 0.0 < drop_fraction <= 1.0:
            raise ValueError(f"{P}.drop_fraction={drop_fraction!r} is outside (0, 1]")
        self.mode, self.drop_fraction = mode, float(drop_fraction)
        self.freeze_others = bool(freeze_others)
        self.include, self.exclude = tuple(include), tuple(exclude)

    def bind(self, run):
        super().bind(run)
        P = "SparseFinetuneMethod"
        for name, value in self._steps.items():
            setattr(self, name, run_step(value, run.num_steps, f"{P}.{name}", 1))
        if self.mode == "lt_sft" and self.select_step >= run.num_steps:
            raise ValueError(f"{P}.select_step={self.select_step} is not inside the run of "
                             f"{run.num_steps} steps, so no entries would ever be selected")
        if self.mode == "spiel" and self.end <= self.frequency:
            raise ValueError(f"{P}.end={self.end} precedes the first update at step "
                             f"{self.frequency}")
        return self

    @property
    def needs_dense_grads(self) -> bool:
        return self.mode == "spiel"

    def init(self, params, rng):
        self.require_bound()
        prunable = paths_lib.prunable_tree(params, self.include, self.exclude)
        masks = masks_lib.ones_masks(params, prunable, self.valid)
        if self.mode == "spiel":
            counts = select.density_counts(masks, {p: self.density for p, _ in paths_lib.named_leaves(masks)},
                                           1.0, masks_lib.real_sizes(masks, self.valid))
            scores = uniform_scores(masks_lib.select_masked(params, masks), rng)
            masks = select.layerwise_topk(scores, masks, counts, alive_only=False,
                                          valid=masks_lib.valid_tree(masks, self.valid))
        base = masks_lib.select_masked(params, masks)
        return params, new_stats_state(masks, self.valid, base=base)

    def wrap_optimizer(self, tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
        """Masked updates; with ``freeze_others`` also no update to params outside the
        candidate set (which params those are is known after ``init``)."""
        wrapped = optim.masked_optimizer(tx)
        if not self.freeze_others:
            return wrapped

        def update_fn(updates, state, params=None, *, sparsity=None, **extra):
            u, state = wrapped.update(updates, state, params, sparsity=sparsity, **extra)
            frozen = jax.tree.map(lambda m: m is None, sparsity["masks"], is_leaf=masks_lib.is_none)
            return jax.tree.map(lambda f, x: jnp.zeros_like(x) if f else x, frozen, u), state

        return optax.GradientTransformationExtraArgs(wrapped.init, update_fn)

    def is_update_step(self, step: int) -> bool:
        if self.mode == "lt_sft":
            return int(step) == self.select_step
        return 0 < int(step) < self.end and int(step) % self.frequency == 0

    def update(self, params, opt_state, sparsity, *, step, rng=None, grads=None):
        old, base = sparsity["masks"], sparsity["base"]
        if self.mode == "lt_sft":
            new = most_changed_masks(base, params, old, self.density, self.valid)
            params = masks_lib.map_masked(lambda p, _, b: b, old, params, base)  # rewind to the base
            changed = jax.tree.map(lambda m: jnp.ones_like(m), old)  # fresh optimizer for the sparse phase
        else:
            delta = masks_lib.map_masked(lambda p, _, b: p - b, old, params, base)
            if grads is None:
                raise ValueError("SparseFinetuneMethod(mode='spiel') grows by the dense "
                                 "gradient, got grads=None")
            grow = jax.tree.map(jnp.abs, masks_lib.select_masked(grads, old))
            drop = jax.tree.map(jnp.abs, masks_lib.select_masked(delta, old))
            new = select.drop_grow(old, drop, self.drop_fraction, grow,
                                   masks_lib.valid_tree(old, self.valid))
            params = masks_lib.map_masked(lambda p, m, b: jnp.where(m, p, b), new, params, base)
            changed = jax.tree.map(lambda a, b: a != b, old, new)
        opt_state = optim.reset_slots(opt_state, params, changed)
        metrics = density_metrics(new, self.valid)
        metrics["sparsity/churn"] = masks_lib.mask_churn(old, new, self.valid)
        return params, opt_state, with_masks(sparsity, new, self.valid), metrics

    def finalize(self, params, sparsity):
        return params

    def export_diff(self, params: PyTree, sparsity: PyTree) -> SparseDiff:
        """Sparse difference (trainable entries) between the fine-tuned params and the base."""
        base = masks_lib.map_masked(lambda p, _, b: b, sparsity["masks"], params, sparsity["base"])
        return sparse_diff(base, params, sparsity["masks"]) if self.freeze_others else \
            sparse_diff(base, params, None)


def masks_from_diff(params: PyTree, diff: SparseDiff) -> Mapping[str, np.ndarray]:
    """{path: bool mask} of the entries a diff touches (for checks and overlaps)."""
    out = {}
    for path, p in paths_lib.named_leaves(params):
        m = np.zeros(int(np.prod(np.shape(p))), bool)
        if path in diff:
            m[diff[path]["indices"]] = True
        out[path] = m.reshape(np.shape(p))
    return out
