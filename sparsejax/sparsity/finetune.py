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

from sparsejax.sparsity import criteria
from sparsejax.sparsity import distributions as dist_lib
from sparsejax.sparsity import masks as masks_lib
from sparsejax.sparsity import optim
from sparsejax.sparsity import paths as paths_lib
from sparsejax.sparsity.method import SparsityMethod, density_metrics, new_stats_state, with_masks

PyTree = Any
SparseDiff = dict[str, dict[str, np.ndarray]]  # {param path: {"indices": int32[k], "values": [k]}}
MODES = ("lt_sft", "spiel")


def most_changed_masks(base: PyTree, tuned: PyTree, masks: PyTree, density: float) -> PyTree:
    """Masks keeping the ``density`` fraction of masked entries with the largest |tuned - base|
    (one global ranking over all masked params)."""
    density = dist_lib.check_density(density)
    delta = masks_lib.map_masked(lambda t, _, b: jnp.abs(t - b), masks, tuned, base)
    k = int(round(density * masks_lib.num_masked(masks)))
    return criteria.global_topk(criteria.masked_subtree(delta, masks), masks, k, alive_only=False)


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
class SparseFinetuneMethod(SparsityMethod):
    """LT-SFT or SpIEL-style sparse fine-tuning through the trainer protocol.

    After training, :meth:`export_diff` gives the sparse difference to the base.
    """

    def __init__(self, mode: str = "lt_sft", density: float = 0.05, select_step: int = 100,
                 frequency: int = 50, end: int = 1000, drop_fraction: float = 0.1,
                 include: Sequence[str] = (), exclude: Sequence[str] = (), freeze_others: bool = True):
        if mode not in MODES:
            raise ValueError(f"mode: {mode!r} is not one of {MODES}")
        self.density = dist_lib.check_density(density)
        if select_step < 1:
            raise ValueError(f"select_step: {select_step!r} must be >= 1")
        if frequency < 1:
            raise ValueError(f"frequency: {frequency!r} must be >= 1")
        if end <= frequency:
            raise ValueError(f"end: {end!r} precedes the first update at step {frequency}")
        if not 0.0 < drop_fraction <= 1.0:
            raise ValueError(f"drop_fraction: {drop_fraction!r} is outside (0, 1]")
        self.mode, self.select_step, self.frequency, self.end = mode, int(select_step), int(frequency), int(end)
        self.drop_fraction, self.freeze_others = float(drop_fraction), bool(freeze_others)
        self.include, self.exclude = tuple(include), tuple(exclude)

    @property
    def needs_dense_grads(self) -> bool:
        return self.mode == "spiel"

    def init(self, params, rng):
        prunable = paths_lib.prunable_tree(params, self.include, self.exclude)
        masks = masks_lib.ones_masks(params, prunable)
        if self.mode == "spiel":
            counts = criteria.density_counts(masks, {p: self.density for p, _ in paths_lib.named_leaves(masks)}, 1.0)
            scores = criteria.scores_for("random", params, masks, rng=rng)
            masks = criteria.layerwise_topk(scores, masks, counts, alive_only=False)
        base = criteria.masked_subtree(params, masks)
        return params, new_stats_state(masks, base=base)

    def wrap_optimizer(self, tx: optax.GradientTransformation, sparsity: PyTree) -> optax.GradientTransformation:
        wrapped = optim.masked_optimizer(tx, sparsity["masks"])
        if not self.freeze_others:
            return wrapped
        frozen = jax.tree.map(lambda m: m is None, sparsity["masks"], is_leaf=masks_lib.is_none)
        return optax.chain(wrapped, optax.masked(optax.set_to_zero(), frozen))

    def is_update_step(self, step: int) -> bool:
        if self.mode == "lt_sft":
            return int(step) == self.select_step
        return 0 < int(step) < self.end and int(step) % self.frequency == 0

    def update(self, params, opt_state, sparsity, *, step, rng=None, grads=None):
        old, base = sparsity["masks"], sparsity["base"]
        if self.mode == "lt_sft":
            new = most_changed_masks(base, params, old, self.density)
            params = masks_lib.map_masked(lambda p, _, b: b, old, params, base)  # rewind to the base
            changed = jax.tree.map(lambda m: jnp.ones_like(m), old)  # fresh optimizer for the sparse phase
        else:
            delta = masks_lib.map_masked(lambda p, _, b: p - b, old, params, base)
            new = criteria.drop_grow(old, delta, self.drop_fraction, criteria.grow_scores_for("gradient", old, rng, grads))
            params = masks_lib.map_masked(lambda p, m, b: jnp.where(m, p, b), new, params, base)
            changed = jax.tree.map(lambda a, b: a != b, old, new)
        opt_state = optim.set_masks(optim.reset_slots(opt_state, params, changed), new)
        metrics = density_metrics(new)
        metrics["sparsity/churn"] = masks_lib.mask_churn(old, new)
        return params, opt_state, with_masks(sparsity, new), metrics

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
