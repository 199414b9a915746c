"""Activation-sparsity metrics of the eval sample, per MLP and overall.

For the intermediate h = act(gate(x)) * up(x) that enters each MLP's down projection, over
real tokens (routed experts: over computed assignments):

* `act/zero_fraction`: entries exactly zero (what a ReLU-family MLP can skip exactly);
* `act/below_<t>`: entries with |h| < t, for each t in `ActivationMetrics.thresholds`;
* `act/chunk<k>_zero_fraction` (BlockFFN's chunk-level sparsity): the fraction of neurons
  inactive (h == 0) on all of k consecutive tokens of a row, over the chunks whose tokens are
  all real (a row's last partial chunk is left out). Dense MLPs and shared experts only:
  routed experts see different tokens per expert.

Each has a per-MLP entry (`act/zero_fraction/layer_0/mlp`); the overall value pools every
MLP's entries (a routed-expert layer counts k assignments per token). PPL-p% sparsity is
computed by `sparsejax eval` (ppl_sparsity.py).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.sparsity.activation.records import layer_records


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ActivationMetrics:
    """Which activation-sparsity metrics every eval logs (`enabled=False`: none)."""

    enabled: bool = True
    thresholds: tuple = (0.01, 0.1)
    chunk_sizes: tuple = (8,)

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise ValueError(f"ActivationMetrics.enabled={self.enabled!r} must be True or False")
        for t in self.thresholds:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
                raise ValueError(f"ActivationMetrics.thresholds={self.thresholds!r}: each must be "
                                 f"a number > 0")
        for k in self.chunk_sizes:
            if isinstance(k, bool) or not isinstance(k, int) or k < 2:
                raise ValueError(f"ActivationMetrics.chunk_sizes={self.chunk_sizes!r}: each must "
                                 f"be an int >= 2")


def batch_sums(stats: Any, segment_ids: jax.Array, settings: ActivationMetrics
               ) -> dict[str, dict[str, jax.Array]]:
    """Counts of one batch (jittable): {mlp path: {'entries', 'zeros', 'below' [n_thr],
    'chunk_entries' [n_chunk], 'chunk_zeros' [n_chunk]}} (float32)."""
    b, s = segment_ids.shape
    out = {}
    for path, rec in layer_records(stats, segment_ids).items():
        h = jnp.abs(rec.h.astype(jnp.float32))
        w = rec.valid.astype(jnp.float32)[:, None]
        f = h.shape[-1]
        sums = {"entries": jnp.sum(w) * f, "zeros": jnp.sum((h == 0) * w),
                "below": jnp.stack([jnp.sum((h < t) * w) for t in settings.thresholds])
                if settings.thresholds else jnp.zeros((0,), jnp.float32)}
        c_ent, c_zero = [], []
        for k in settings.chunk_sizes:
            if rec.routed or s < k:
                c_ent.append(jnp.zeros((), jnp.float32))
                c_zero.append(jnp.zeros((), jnp.float32))
                continue
            n = s // k
            active = (h != 0).reshape(b, s, f)[:, :n * k].reshape(b, n, k, f).any(axis=2)
            ok = rec.valid.reshape(b, s)[:, :n * k].reshape(b, n, k).all(axis=2)
            okf = ok.astype(jnp.float32)[..., None]
            c_ent.append(jnp.sum(okf) * f)
            c_zero.append(jnp.sum((~active) * okf))
        sums["chunk_entries"] = jnp.stack(c_ent) if c_ent else jnp.zeros((0,), jnp.float32)
        sums["chunk_zeros"] = jnp.stack(c_zero) if c_zero else jnp.zeros((0,), jnp.float32)
        out[path] = sums
    return out


def add_sums(a: dict | None, b: dict) -> dict:
    """Adds the counts of two batches (host side, NumPy)."""
    b = jax.tree.map(lambda x: np.asarray(x, np.float64), b)
    return b if a is None else jax.tree.map(np.add, a, b)


def _fmt(t: float) -> str:
    return np.format_float_positional(float(t), trim="-")


def summarize(sums: dict | None, settings: ActivationMetrics) -> dict[str, float]:
    """Fractions per MLP and overall from the summed counts."""
    if not sums:
        return {}
    out: dict[str, float] = {}
    keys = [("zero_fraction", "zeros", "entries", None)]
    keys += [(f"below_{_fmt(t)}", "below", "entries", i) for i, t in enumerate(settings.thresholds)]
    keys += [(f"chunk{k}_zero_fraction", "chunk_zeros", "chunk_entries", i)
             for i, k in enumerate(settings.chunk_sizes)]
    for name, num_key, den_key, i in keys:
        num_total = den_total = 0.0
        for path, c in sums.items():
            num = c[num_key] if i is None else c[num_key][i]
            den = c["entries"] if den_key == "entries" else c[den_key][i]
            if den > 0:
                out[f"act/{name}/{path}"] = float(num / den)
                num_total, den_total = num_total + float(num), den_total + float(den)
        if den_total > 0:
            out[f"act/{name}"] = num_total / den_total
    return out
