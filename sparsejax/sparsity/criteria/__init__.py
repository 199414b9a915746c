"""Pruning and growth criteria, registered by name in `CRITERIA` (see base.py for the
protocol). Importing this package registers the built-in ones."""
from sparsejax.sparsity.criteria import gblm, gradient, magnitude, movement, random, snip, wanda  # noqa: F401
from sparsejax.sparsity.criteria.base import CRITERIA, CalibratedCriterion, Criterion
from sparsejax.sparsity.criteria.random import uniform_scores

__all__ = ["CRITERIA", "CalibratedCriterion", "Criterion", "uniform_scores"]
