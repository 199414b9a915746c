"""Per-layer target densities: uniform, Erdős–Rényi (ER) and ER-Kernel (ERK).

All functions work on ``{path: shape}`` for the prunable params and return
``{path: density}`` (host floats). Overrides (regex -> density) fix the density
of the layers they match; the distribution then spreads ``density`` over the
remaining layers (as RigL's custom sparsity map does). Distributions are registered by name
in ``DISTRIBUTIONS`` (``MaskedPruningMethod.distribution = 'erk'``): a function
``(shapes, density) -> {path: density}`` whose size-weighted mean is ``density``.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from sparsejax.registry import Registry
from sparsejax.sparsity import paths as paths_lib

Shapes = Mapping[str, Sequence[int]]
DISTRIBUTIONS = Registry("distribution")


def check_density(density: float, arg: str = "density") -> float:
    """Raises ``ValueError`` unless ``0 < density <= 1``."""
    d = float(density)
    if not (0.0 < d <= 1.0) or math.isnan(d):
        raise ValueError(f"{arg}={density!r} is outside (0, 1]; a density is the kept fraction")
    return d


def _raw_erdos_renyi(shape: Sequence[int], kernel: bool, power: float) -> float:
    """ER scale ``(n_in + n_out) / (n_in * n_out)``; ERK uses all dims ``sum / prod``."""
    dims = list(shape) if kernel or len(shape) < 2 else list(shape[-2:])
    return (float(np.sum(dims)) / float(np.prod(dims))) ** power


def erdos_renyi_densities(
    shapes: Shapes, density: float, kernel: bool = True, power: float = 1.0
) -> dict[str, float]:
    """ER/ERK densities whose param-weighted mean is exactly ``density``.

    Layers whose density would exceed 1 become dense and the rest is rescaled,
    iterating until every density is <= 1 (as in the RigL code).
    """
    density = check_density(density)
    sizes = {k: float(np.prod(s)) for k, s in shapes.items()}
    raw = {k: _raw_erdos_renyi(s, kernel, power) for k, s in shapes.items()}
    dense: set[str] = set()
    while True:
        # Kept entries the free layers must hold: target minus those of dense layers.
        rhs = density * sum(sizes.values()) - sum(sizes[k] for k in dense)
        divisor = sum(raw[k] * sizes[k] for k in shapes if k not in dense)
        if divisor == 0:
            break
        eps = rhs / divisor
        free = [k for k in shapes if k not in dense]
        max_raw = max(raw[k] for k in free)
        if max_raw * eps > 1.0:
            dense.update(k for k in free if raw[k] == max_raw)
            continue
        break
    return {k: (1.0 if k in dense else float(eps * raw[k])) for k in shapes}


@DISTRIBUTIONS.register("uniform")
def uniform(shapes: Shapes, density: float) -> dict[str, float]:
    """Every layer at the same density."""
    return {k: density for k in shapes}


@DISTRIBUTIONS.register("erdos_renyi")
def erdos_renyi(shapes: Shapes, density: float) -> dict[str, float]:
    """Erdős–Rényi: density proportional to (n_in + n_out) / (n_in * n_out)."""
    return erdos_renyi_densities(shapes, density, kernel=False)


@DISTRIBUTIONS.register("erk")
def erk(shapes: Shapes, density: float) -> dict[str, float]:
    """Erdős–Rényi-Kernel: density proportional to sum(shape) / prod(shape) (RigL's default)."""
    return erdos_renyi_densities(shapes, density, kernel=True)


def layer_densities(
    shapes: Shapes,
    density: float,
    distribution: str = "uniform",
    overrides: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """{path: density}. ``overrides`` (regex -> density) fix matched layers first."""
    density = check_density(density)
    spread = DISTRIBUTIONS.get(distribution, "distribution")
    overrides = dict(overrides or {})
    paths_lib.check_patterns_match(list(overrides), list(shapes), "overrides")
    fixed = {}
    for path in shapes:
        d = paths_lib.regex_lookup(overrides, path)
        if d is not None:
            fixed[path] = check_density(d, f"overrides[{path!r}]")
    free = {k: s for k, s in shapes.items() if k not in fixed}
    out = spread(free, density) if free else {}
    out.update(fixed)
    return {k: out[k] for k in shapes}


def mean_density(shapes: Shapes, densities: Mapping[str, float]) -> float:
    """Param-weighted mean density."""
    sizes = {k: float(np.prod(s)) for k, s in shapes.items()}
    return sum(densities[k] * sizes[k] for k in shapes) / sum(sizes.values())
