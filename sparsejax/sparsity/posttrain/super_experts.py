"""Super experts: the few experts whose down-projection outputs carry a MoE model's massive
activations (Su et al. 2025, "Unveiling Super Experts in Mixture-of-Experts Large Language
Models": pruning them collapses the model, pruning as many other experts barely matters).

An expert's statistic is the largest |activation| of its down projection's output over the
calibration tokens routed to it (`stats.expert_outputs`, 'output_max'). Per layer, an expert
is a candidate when that value exceeds `SuperExperts.multiple` times the median over the
layer's experts that calibration reaches. Expert reduction keeps the candidates by default
(`PruneConfig.protect_super_experts`), and `sparsejax moe-report` lists them.
"""
from __future__ import annotations

import dataclasses
import math

import gin
import numpy as np


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SuperExperts:
    """multiple: an expert is a super-expert candidate when its max |down-projection output|
    exceeds `multiple` x the median of its layer's routed experts' (must be > 1)."""

    multiple: float = 10.0

    def __post_init__(self):
        m = float(self.multiple)
        if math.isnan(m) or m <= 1.0:
            raise ValueError(f"SuperExperts.multiple={self.multiple!r} must be > 1: a candidate's "
                             f"max |output| is that many times its layer's median")

    def find(self, output_max: np.ndarray, counts: np.ndarray | None = None) -> list[int]:
        """Candidates of one layer from its experts' max |output| [E] (and routed-token counts
        [E]: experts no calibration token reaches are left out of the median)."""
        peak = np.asarray(output_max, np.float64)
        routed = peak if counts is None else peak[np.asarray(counts) > 0]
        if routed.size == 0:
            return []
        median = float(np.median(routed))
        return [int(e) for e in np.flatnonzero(peak > self.multiple * median)]

    def describe(self, output_max: np.ndarray, counts: np.ndarray | None = None) -> dict:
        """The layer's statistics and candidates as JSON-able data."""
        peak = np.asarray(output_max, np.float64)
        routed = peak if counts is None else peak[np.asarray(counts) > 0]
        median = float(np.median(routed)) if routed.size else 0.0
        return {"output_max": [float(v) for v in peak], "median": median,
                "ratio_to_median": [float(v / median) if median > 0 else None for v in peak],
                "multiple": float(self.multiple), "candidates": self.find(peak, counts)}
