"""Training-free activation thresholds inside the model: the hook every projection input and
the MLP gate activation pass through.

A *site* is one place a threshold can act: the input of a projection (`query_in`, `key_in`,
`value_in`, `out_in` in attention; `wi_gate_in`, `wi_up_in`, `wo_in` in a dense MLP) or the
gate activation of a dense MLP (`gate_act`, CATS). When the collection `THRESHOLDS`
('act_sparsity') holds a `Site` under a module's path, entries whose score
|x| * scale is at or below `threshold` are set to exactly zero (scale: ones for TEAL and CATS,
the weight rows' norms for WINA). Without one, nothing changes and nothing costs.

Two more collections, each only when mutable:
* `HISTOGRAMS` ('act_calib'): a histogram of every site's score (calibration), in the fixed
  log-spaced bins of `BIN_EDGES` (bin 0: scores below 1e-10, exact zeros included);
* `MASKED` ('act_masked'): per row, the fraction of the site's entries set to zero.

`Site.capacity` and `Site.max_rows` (static) configure the sparse decode path at that site
(models/sparse_mlp.py, set by sparsejax/infer/sparse_decode.py; capacity 0: decode densely).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

THRESHOLDS = "act_sparsity"
HISTOGRAMS = "act_calib"
MASKED = "act_masked"

# Log-spaced histogram bins: 1e-10 .. 1e4, 256 per decade (relative width 0.9%), plus an
# underflow bin 0 (exact zeros) and an overflow bin at the end.
BINS_PER_DECADE = 256
LOG_LO, LOG_HI = -10, 4
NUM_BINS = (LOG_HI - LOG_LO) * BINS_PER_DECADE + 2
BIN_EDGES = np.concatenate([[0.0], 10.0 ** (LOG_LO + np.arange(NUM_BINS - 1) / BINS_PER_DECADE)]
                           ).astype(np.float32)
# BIN_EDGES[j] (float32) is the lower edge of bin j (bin 0 starts at 0); bin j holds exactly
# the float32 scores in [edge_j, edge_{j+1}).


@dataclasses.dataclass(frozen=True)
class Site:
    """A threshold at one site: keep entries with |x| * scale > threshold."""

    threshold: jax.Array  # [] float32
    scale: jax.Array      # [features] float32
    capacity: int = 0     # static: sparse-decode slots (0: dense decode)
    max_rows: int = 0     # static: the sparse decode path serves steps of at most this many rows


jax.tree_util.register_dataclass(Site, data_fields=["threshold", "scale"],
                                 meta_fields=["capacity", "max_rows"])


def histogram(score: jax.Array) -> jax.Array:
    """Counts of `score` (>= 0) in the bins of BIN_EDGES -> [NUM_BINS] float32."""
    s = score.astype(jnp.float32).reshape(-1)
    pos = jnp.floor((jnp.log10(jnp.maximum(s, 1e-30)) - LOG_LO) * BINS_PER_DECADE) + 1
    idx = jnp.clip(pos, 1, NUM_BINS - 1).astype(jnp.int32)
    edges = jnp.asarray(BIN_EDGES)
    upper = jnp.asarray(np.append(BIN_EDGES[1:], np.inf).astype(np.float32))
    # log10 rounds: move scores next to an edge into the bin the edges say (exact bins)
    idx = idx - (s < edges[idx]).astype(jnp.int32)
    idx = idx + ((s >= upper[idx]) & (idx < NUM_BINS - 1)).astype(jnp.int32)
    idx = jnp.where(s < edges[1], 0, idx)
    return jax.ops.segment_sum(jnp.ones_like(s), idx, NUM_BINS)


def site(module: nn.Module, name: str) -> Site | None:
    """The Site at `module`'s path called `name`, or None."""
    if module.has_variable(THRESHOLDS, name):
        value = module.get_variable(THRESHOLDS, name)
        if not isinstance(value, Site):
            raise ValueError(f"'{THRESHOLDS}' entry {name!r} of {module.name} is a "
                             f"{type(value).__name__}, not a Site")
        return value
    return None


def keep_mask(s: Site, x: jax.Array) -> jax.Array:
    """Bool mask of the entries of x [..., features] that the site keeps."""
    score = jnp.abs(x.astype(jnp.float32)) * s.scale.astype(jnp.float32)
    return score > s.threshold


def apply_site(module: nn.Module, name: str, x: jax.Array
               ) -> tuple[jax.Array, jax.Array | None]:
    """(x [rows, features] with the site's threshold applied, the keep mask) — (x, None)
    without a Site; sows its histogram / masked fractions when those collections are mutable."""
    s = site(module, name)
    if s is None:
        return x, None
    if x.shape[-1] != s.scale.shape[-1]:
        raise ValueError(f"site {name} of {module.name}: scale has {s.scale.shape[-1]} entries "
                         f"for inputs of {x.shape[-1]} features")
    initializing = module.is_initializing()
    if module.is_mutable_collection(HISTOGRAMS) and not initializing:
        score = jnp.abs(x.astype(jnp.float32)) * s.scale.astype(jnp.float32)
        module.sow(HISTOGRAMS, name, histogram(score))
    keep = keep_mask(s, x)
    if module.is_mutable_collection(MASKED) and not initializing:
        module.sow(MASKED, name, 1.0 - jnp.mean(keep.astype(jnp.float32), axis=-1).reshape(-1))
    return jnp.where(keep, x, jnp.zeros_like(x)), keep
