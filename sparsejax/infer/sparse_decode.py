"""Settings of the activation-sparse decode path (models/sparse_mlp.py) for `sparsejax
sample`: which decode steps take it and how many slots each site gets.

A site's capacity is ceil(capacity_factor * (1 - s) * width) slots (at most its width), where
s is the fraction of its scores at or below its threshold on the calibration set: the
expected active entries plus headroom. A step with more active entries than that (the union
over the step's rows) computes that site densely instead, with the same result. A site
whose capacity exceeds `max_density` of its width keeps the masked dense product: near full
density, reading the rows one by one (the XLA path of pallas_kernels/gather_matmul) costs
about what the dense product does (break-even near 90% density at batch 1 on CPU;
benchmarks/activation_sparsity.py). The neuron path of a `gate_act` site (CATS, ReLU zeros:
the gate stays dense, up's columns are gathered) breaks even later, near 55% sparsity, so
it has its own limit, `max_neuron_density`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import gin
import jax.numpy as jnp
import numpy as np

from sparsejax.models.thresholds import BIN_EDGES, Site


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SparseDecode:
    """`enabled`: thresholded decode steps of at most `max_rows` rows (batch x new tokens)
    read only the active weight rows/columns, with `capacity_factor` headroom, at sites
    whose capacity is at most `max_density` (`max_neuron_density` for `gate_act`) of their
    width."""

    enabled: bool = True
    capacity_factor: float = 1.25
    max_rows: int = 4
    max_density: float = 0.9
    max_neuron_density: float = 0.5

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise ValueError(f"SparseDecode.enabled={self.enabled!r} must be True or False")
        if isinstance(self.capacity_factor, bool) or not isinstance(self.capacity_factor, (int, float)) \
                or not self.capacity_factor >= 1:
            raise ValueError(f"SparseDecode.capacity_factor={self.capacity_factor!r} must be a "
                             f"number >= 1 (slots per expected active entry)")
        if isinstance(self.max_rows, bool) or not isinstance(self.max_rows, int) or self.max_rows < 1:
            raise ValueError(f"SparseDecode.max_rows={self.max_rows!r} must be an int >= 1")
        for name in ("max_density", "max_neuron_density"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise ValueError(f"SparseDecode.{name}={v!r} must be in (0, 1]")


def masked_fraction(counts: np.ndarray, threshold: float) -> float:
    """Fraction of a site's histogram at or below `threshold` (a bin edge, or 0: bin 0)."""
    total = max(float(np.sum(counts)), 1.0)
    if threshold <= 0:
        return float(counts[0]) / total if threshold == 0 else 0.0
    j = int(np.searchsorted(BIN_EDGES, np.float32(threshold)))
    return float(np.sum(counts[:j])) / total


def with_capacities(sites: Mapping, histograms: Mapping[str, np.ndarray],
                    settings: SparseDecode) -> dict:
    """`sites` with each Site's capacity and max_rows set for the sparse decode path."""
    out: dict = {}
    for layer, modules in sites.items():
        for module, named in modules.items():
            for name, s in named.items():
                path = f"{layer}/{module}/{name}"
                width = int(s.scale.shape[0])
                frac = masked_fraction(histograms[path], float(s.threshold))
                cap = min(width, max(1, math.ceil(settings.capacity_factor * (1 - frac) * width)))
                limit = settings.max_neuron_density if name == "gate_act" else settings.max_density
                on = settings.enabled and cap <= limit * width
                out.setdefault(layer, {}).setdefault(module, {})[name] = Site(
                    s.threshold, s.scale, cap if on else 0, settings.max_rows if on else 0)
    return out


def decode_summary(sites: Mapping) -> dict[str, int]:
    """How many threshold sites there are and how many take the sparse decode path."""
    caps = [s.capacity for modules in sites.values() for named in modules.values()
            for s in named.values()]
    return {"sites": len(caps), "sparse": sum(c > 0 for c in caps)}


def neuron_major_weights(params: Mapping, sites: Mapping) -> dict:
    """The 'decode_weights' collection: each dense MLP with a sparse `gate_act` site gets its
    up kernel neuron-major (`wi_up_t` [mlp, embed], a copy), so the neuron-sparse decode step
    reads each active neuron's up weights as one contiguous row."""
    out: dict = {}
    for layer, modules in sites.items():
        s = modules.get("mlp", {}).get("gate_act")
        if s is not None and s.capacity > 0:
            k = params[layer]["mlp"]["wi_up"]["kernel"]
            out.setdefault(layer, {})["mlp"] = {"wi_up_t": jnp.asarray(k).T.copy()}
    return out
