"""Layer-wise sparsity allocation for post-training pruning: how the target density is spread
over the blocks. Registered by name in `ALLOCATIONS` (`PruneConfig.allocation = 'owl'`).

* ``uniform``: every block at the target density;
* ``owl`` (Yin et al. 2023, "Outlier Weighed Layerwise sparsity"): a block's outlier ratio
  D_l is the fraction of its weights whose score (Wanda's |w|·‖X_j‖₂ by default, on the
  dense model) exceeds `outlier_multiple` x the block's mean score; densities are
  D_l min-max scaled to [0, 2·lam], shifted so that their parameter-weighted mean is the
  target. Blocks with more outliers keep more weights.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import gin
import jax.numpy as jnp
import numpy as np

from sparsejax.registry import Registry
from sparsejax.sparsity.posttrain.solvers import PRUNERS


class Allocation:
    """Base: per-block densities whose parameter-weighted mean is the target."""

    needs_outliers: bool = False

    def densities(self, sizes: Mapping[int, int], density: float,
                  outlier_ratios: Mapping[int, float] | None = None) -> dict[int, float]:
        raise NotImplementedError


ALLOCATIONS: Registry[type[Allocation]] = Registry("sparsity allocation")


@ALLOCATIONS.register("uniform")
class Uniform(Allocation):
    """Every block at the target density."""

    def densities(self, sizes, density, outlier_ratios=None):
        return {b: float(density) for b in sizes}


def outlier_ratio(scores: Sequence, multiple: float) -> float:
    """Fraction of all entries of `scores` (one block's layers) above `multiple` x their mean."""
    flat = jnp.concatenate([jnp.ravel(s).astype(jnp.float32) for s in scores])
    return float(jnp.mean(flat > multiple * jnp.mean(flat)))


@gin.configurable
@ALLOCATIONS.register("owl")
class OWL(Allocation):
    """Outlier-weighted layer-wise densities (OWL), mean density = the target."""

    needs_outliers = True

    def __init__(self, lam: float = 0.08, outlier_multiple: float = 5.0, score: str = "wanda"):
        if not 0 <= float(lam) < 0.5:
            raise ValueError(f"OWL.lam={lam!r} must be in [0, 0.5): the largest deviation of a "
                             f"block's density from the target (the paper uses 0.08)")
        if not float(outlier_multiple) > 0:
            raise ValueError(f"OWL.outlier_multiple={outlier_multiple!r} must be > 0 (the "
                             f"paper's M, 5 for LLaMA)")
        PRUNERS.get(score, "OWL.score")
        self.lam, self.outlier_multiple, self.score = float(lam), float(outlier_multiple), score

    def densities(self, sizes, density, outlier_ratios=None):
        if outlier_ratios is None:
            raise ValueError("OWL needs the blocks' outlier ratios")
        blocks = list(sizes)
        r = np.array([outlier_ratios[b] for b in blocks], np.float64)
        w = np.array([sizes[b] for b in blocks], np.float64)
        span = r.max() - r.min()
        a = np.zeros_like(r) if span <= 0 else (r - r.min()) / span * 2 * self.lam
        d = a - np.sum(a * w) / np.sum(w) + float(density)
        if d.min() <= 0 or d.max() > 1:
            raise ValueError(f"OWL.lam={self.lam}: block densities {np.round(d, 4).tolist()} "
                             f"leave (0, 1] at target density {density}; use a smaller lam")
        return {b: float(x) for b, x in zip(blocks, d)}
