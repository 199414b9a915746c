"""DSnoT (Zhang et al. 2024, "Dynamic Sparse No Training"): training-free prune-and-grow on top
of any mask, one output unit (row) at a time, keeping each row's number of kept weights.

Per row, with δ = w_dense - w_sparse (the weights the mask removed or the solver moved) and
the calibration input means μ_j and variances σ²_j, the expected output error is
ε = Σ_j δ_j μ_j. Every cycle a row proposes one swap, as the paper does:

* grow the pruned weight i whose restoration moves ε towards zero the most, ranked by
  sign(ε) · δ_i μ_i / σ_i^(2·pow_of_var) (the restored weight takes its dense value; a
  weight of a dead input, ‖X_i‖ = 0, is never grown: it cannot change the output);
* prune the kept weight p with the smallest Wanda score |w_p|·‖X_p‖₂ whose contribution
  w_p μ_p has the sign opposite to ε (any kept weight if none has); with N:M, p is the
  kept weight of i's group with the smallest score, so the N:M pattern stays exact.

A swap is accepted only if |ε| > `update_threshold` and it lowers the row's exact
reconstruction error ‖δX‖² = δᵀHδ (H = XᵀX), computed in O(in) from g = Hδ; a row whose
proposal is refused stops (as the paper's rows stop). So DSnoT never increases the
reconstruction error of any row. `same_sign=True` also refuses swaps that flip the sign of
ε (the paper's code ships with that check off).
"""
from __future__ import annotations

import functools
from typing import Any

import gin
import jax
import jax.numpy as jnp

_NEG = -jnp.inf


@gin.configurable
class DSnoT:
    """DSnoT's settings: cycles per layer, the |ε| threshold, the variance power of the
    growth ranking, and the optional sign check (paper defaults: 50, 0.1, 1, off)."""

    def __init__(self, max_cycles: int = 50, update_threshold: float = 0.1,
                 pow_of_var: float = 1.0, same_sign: bool = False):
        if isinstance(max_cycles, bool) or not isinstance(max_cycles, int) or max_cycles < 1:
            raise ValueError(f"DSnoT.max_cycles={max_cycles!r} must be an int >= 1")
        if not float(update_threshold) >= 0:
            raise ValueError(f"DSnoT.update_threshold={update_threshold!r} must be >= 0")
        self.max_cycles, self.update_threshold = max_cycles, float(update_threshold)
        self.pow_of_var, self.same_sign = float(pow_of_var), bool(same_sign)

    def refine(self, dense: jax.Array, pruned: jax.Array, keep: jax.Array, calib: Any,
               nm: tuple[int, int] | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """dense, pruned, keep: one kernel [in, out] before pruning, after it, and its mask;
        calib: its LayerCalibration. Returns (kernel, keep, accepted swaps per output unit)."""
        s = calib.stats
        w, k, swaps = _refine(dense.T.astype(jnp.float32), pruned.T.astype(jnp.float32),
                              keep.T, s.hessian, s.mean, s.var, max_cycles=self.max_cycles,
                              threshold=self.update_threshold, pow_of_var=self.pow_of_var,
                              same_sign=self.same_sign, m=0 if nm is None else nm[1])
        return w.T.astype(pruned.dtype), k.T, swaps


def row_errors(delta: jax.Array, hessian: jax.Array) -> jax.Array:
    """δᵀHδ of every row of delta [rows, in]."""
    return jnp.sum((delta @ hessian) * delta, axis=-1)


@functools.partial(jax.jit, static_argnames=("max_cycles", "threshold", "pow_of_var",
                                             "same_sign", "m"))
def _refine(w, wt, keep, h, mu, var, *, max_cycles, threshold, pow_of_var, same_sign, m):
    """Row layout: w (dense), wt (sparse) [rows, in]; keep [rows, in]; h [in, in]."""
    rows, cols = w.shape
    h = h.astype(jnp.float32)
    hd = jnp.diagonal(h)
    norms = jnp.sqrt(hd)
    dead = hd == 0  # inputs calibration never saw: their weights are never grown
    inv_var = 1.0 / jnp.maximum(var, 1e-12) ** pow_of_var
    ridx = jnp.arange(rows)
    delta = w - wt
    eps0 = delta @ mu
    state = (wt, keep, delta @ h, eps0, jnp.ones(rows, bool), jnp.zeros(rows, jnp.int32),
             jnp.int32(0))

    def cond(st):
        return jnp.any(st[4]) & (st[6] < max_cycles)

    def body(st):
        wt, keep, g, eps, active, swaps, cyc = st
        delta = w - wt
        sgn = jnp.where(eps >= 0, 1.0, -1.0)[:, None]
        grow_rank = jnp.where(keep | dead[None, :], _NEG,
                              sgn * delta * mu[None, :] * inv_var[None, :])
        i = jnp.argmax(grow_rank, axis=-1)
        has_grow = jnp.isfinite(jnp.max(grow_rank, axis=-1))
        wanda = jnp.abs(wt) * norms[None, :]
        kept = keep & (jnp.arange(cols)[None, :] != i[:, None])
        if m:
            group = (jnp.arange(cols)[None, :] // m) == (i[:, None] // m)
            cand = kept & group
        else:
            opposite = (wt * mu[None, :]) * sgn <= 0
            cand = jnp.where(jnp.any(kept & opposite, -1, keepdims=True), kept & opposite, kept)
        prune_rank = jnp.where(cand, -wanda, _NEG)
        p = jnp.argmax(prune_rank, axis=-1)
        has_prune = jnp.isfinite(jnp.max(prune_rank, axis=-1))
        di, wp = delta[ridx, i], wt[ridx, p]
        d_err = (2.0 * (-di * g[ridx, i] + wp * g[ridx, p]) + di ** 2 * hd[i] + wp ** 2 * hd[p]
                 - 2.0 * di * wp * h[i, p])
        eps_new = eps - di * mu[i] + wp * mu[p]
        ok = active & has_grow & has_prune & (jnp.abs(eps) > threshold) & (d_err < 0)
        if same_sign:
            ok = ok & (jnp.sign(eps_new) == jnp.sign(eps0))
        wt = wt.at[ridx, i].set(jnp.where(ok, w[ridx, i], wt[ridx, i]))
        wt = wt.at[ridx, p].set(jnp.where(ok, 0.0, wt[ridx, p]))
        keep = keep.at[ridx, i].set(keep[ridx, i] | ok)
        keep = keep.at[ridx, p].set(keep[ridx, p] & ~ok)
        g = g + jnp.where(ok[:, None], -di[:, None] * h[i] + wp[:, None] * h[p], 0.0)
        eps = jnp.where(ok, eps_new, eps)
        return wt, keep, g, eps, ok, swaps + ok.astype(jnp.int32), cyc + 1

    wt, keep, _, _, _, swaps, _ = jax.lax.while_loop(cond, body, state)
    return jnp.where(keep, wt, 0.0), keep, swaps
