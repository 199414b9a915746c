"""Sparse recovery fine-tuning: training a pruned model with its masks fixed.

`sparsejax prune` writes its output workdir with `make_method.name = 'fixed_masks'` and the
pruned masks in the checkpoint's sparsity state, so `sparsejax train --workdir=DST` trains
the kept weights only (the masked optimizer holds the pruned ones at exactly zero) and
never changes the masks.
"""
from __future__ import annotations

from typing import Sequence

import gin
import optax

from sparsejax.sparsity import masks as masks_lib
from sparsejax.sparsity import optim
from sparsejax.sparsity import paths as paths_lib
from sparsejax.sparsity.method import METHODS, SparsityMethod, new_stats_state


@gin.configurable
@METHODS.register("fixed_masks")
class FixedMasksMethod(SparsityMethod):
    """Masks fixed for the whole run (sparse recovery fine-tuning after `sparsejax prune`).

    A run restored from a pruned workdir's checkpoint keeps the masks stored there. Started
    from params alone (e.g. an imported, already sparse model), the masks are the nonzero
    entries of the prunable params (`include` / `exclude` as in MaskedPruningMethod)."""

    def __init__(self, include: Sequence[str] = (), exclude: Sequence[str] = ()):
        self.include, self.exclude = tuple(include), tuple(exclude)

    def init(self, params, rng):
        self.require_bound()
        prunable = paths_lib.prunable_tree(params, self.include, self.exclude)
        masks = masks_lib.ones_masks(params, prunable, self.valid)
        masks = masks_lib.map_on_masks(lambda p, m: m & (p != 0), masks, params)
        return params, new_stats_state(masks, self.valid)

    def wrap_optimizer(self, tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
        return optim.masked_optimizer(tx)

