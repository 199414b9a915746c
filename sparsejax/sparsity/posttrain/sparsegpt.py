"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning with optimal-brain-surgeon updates.

For a linear layer y = x W (flax kernel W [in, out]), each output unit's weights w (a row of
Wᵀ, indexed by input j) are pruned to minimise ‖(w - w') X‖² over the calibration inputs X.
With H = XᵀX + λI (λ = `dampening` x mean(diag(XᵀX))) and U the upper Cholesky factor of
H⁻¹ (H⁻¹ = UᵀU), the columns (inputs) are visited left to right; pruning w_j costs
w_j² / U_jj² and its error (w_j - q_j) / U_jj is spread over the not-yet-visited inputs
along row j of U. Columns go in blocks of `block_size`: inside a block updates are applied
column by column, the rest of the layer gets one batched (lazy) update per block. Which
weights a block prunes is chosen when the block starts, from the updated weights:

* unstructured: the (1 - density) fraction of the block's [out, block] weights with the
  smallest w² / U_jj², jointly over all output units;
* N:M: in every group of M consecutive inputs of every output unit, the M - N smallest;
* a fixed mask: given (the solver then only re-fits the kept weights).

Everything is jittable and batched over rows, so a layer's solve splits over devices by
output units (rows) when W is sharded that way; `solve` takes a leading expert axis too.
"""
from __future__ import annotations

from typing import Any

import gin
import jax
import jax.numpy as jnp

PyTree = Any


def hessian_inverse_factor(hessian: jax.Array, dampening: float) -> jax.Array:
    """U, the upper Cholesky factor of (H + λI)⁻¹ (λ = dampening * mean diag H; inputs
    never seen in calibration, H_jj = 0, get H_jj = 1). hessian: [in, in] -> [in, in].

    With J the reversal permutation and JHJ = LLᵀ, H = ŨŨᵀ for the upper triangular
    Ũ = JLJ, so H⁻¹ = Ũ⁻ᵀŨ⁻¹ and U = Ũ⁻¹: one Cholesky and one triangular inverse (the
    reference code's Cholesky, inverse and second Cholesky give the same U)."""
    h = hessian.astype(jnp.float32)
    n = h.shape[-1]
    diag = jnp.diagonal(h)
    h = h + jnp.diag(jnp.where(diag == 0, 1.0, 0.0))
    damp = dampening * jnp.mean(jnp.diagonal(h))
    h = h + damp * jnp.eye(n, dtype=h.dtype)
    flip = lambda a: jnp.flip(a, (0, 1))
    upper = flip(jnp.linalg.cholesky(flip(h)))
    return jax.scipy.linalg.solve_triangular(upper, jnp.eye(n, dtype=h.dtype), lower=False)


def _block_scores(w1: jax.Array, u1: jax.Array) -> jax.Array:
    return w1 ** 2 / jnp.diagonal(u1)[None, :] ** 2


def _rank_lowest(scores: jax.Array, k: jax.Array) -> jax.Array:
    """Bool mask of the k lowest entries of `scores` (any shape; ties by flat index)."""
    flat = scores.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    return jnp.zeros(flat.size, bool).at[order].set(jnp.arange(flat.size) < k).reshape(
        scores.shape)


def _nm_prune(scores: jax.Array, n: int, m: int) -> jax.Array:
    """[rows, m] scores -> bool mask pruning the m - n lowest of each row."""
    order = jnp.argsort(scores, axis=-1, stable=True)
    ranks = jnp.argsort(order, axis=-1)
    return ranks < (m - n)


def solve_rows(w: jax.Array, u: jax.Array, *, sparsity: jax.Array | float = 0.5,
               n: int = 0, m: int = 0, block_size: int = 128,
               keep: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The SparseGPT solve of one layer in row layout.

    w: [rows (outputs), cols (inputs)]; u: `hessian_inverse_factor` [cols, cols];
    sparsity: pruned fraction of each block (unstructured; may be traced); n, m > 0: N:M
    along the inputs instead; keep: a fixed bool mask [rows, cols] (True = kept) instead.
    Returns (pruned weights [rows, cols] float32 with exact zeros, keep mask)."""
    rows, cols = w.shape
    bsz = min(int(block_size), cols)
    if n:
        if cols % m or bsz % m:
            raise ValueError(f"SparseGPT N:M: M={m} must divide the input dim {cols} and the "
                             f"block size {bsz}")
    pad = (-cols) % bsz
    w = jnp.pad(w.astype(jnp.float32), ((0, 0), (0, pad)))
    u = jnp.pad(u.astype(jnp.float32), ((0, pad), (0, pad)))
    if pad:
        u = u + jnp.diag(jnp.concatenate([jnp.zeros(cols), jnp.ones(pad)]))
    real = jnp.arange(cols + pad) < cols
    fixed = None if keep is None else jnp.pad(keep, ((0, 0), (0, pad)), constant_values=True)
    nblocks = (cols + pad) // bsz
    sparsity = jnp.asarray(sparsity, jnp.float32)
    col_ids = jnp.arange(cols + pad)

    def block(carry, b):
        wcur, prune_all = carry
        i1 = b * bsz
        w1 = jax.lax.dynamic_slice(wcur, (0, i1), (rows, bsz))
        u1 = jax.lax.dynamic_slice(u, (i1, i1), (bsz, bsz))
        real1 = jax.lax.dynamic_slice(real, (i1,), (bsz,))
        if fixed is not None:
            prune1 = ~jax.lax.dynamic_slice(fixed, (0, i1), (rows, bsz))
        elif n:
            prune1 = jnp.zeros((rows, bsz), bool)
        else:
            scores = jnp.where(real1[None, :], _block_scores(w1, u1), jnp.inf)
            k = jnp.round(sparsity * rows * jnp.sum(real1)).astype(jnp.int32)
            prune1 = _rank_lowest(scores, k)

        def column(i, c):
            w1, prune1, err1 = c
            if n and fixed is None:
                def choose(p):
                    grp = jax.lax.dynamic_slice(w1, (0, i), (rows, m))
                    ug = jax.lax.dynamic_slice(jnp.diagonal(u1), (i,), (m,))
                    return jax.lax.dynamic_update_slice(
                        p, _nm_prune(grp ** 2 / ug[None, :] ** 2, n, m), (0, i))
                prune1 = jax.lax.cond(i % m == 0, choose, lambda p: p, prune1)
            col = jax.lax.dynamic_slice(w1, (0, i), (rows, 1))[:, 0]
            d = u1[i, i]
            q = jnp.where(jax.lax.dynamic_slice(prune1, (0, i), (rows, 1))[:, 0], 0.0, col)
            e = (col - q) / d
            w1 = w1 - e[:, None] * u1[i][None, :]
            err1 = jax.lax.dynamic_update_slice(err1, e[:, None], (0, i))
            return w1, prune1, err1

        w1, prune1, err1 = jax.lax.fori_loop(
            0, bsz, column, (w1, prune1, jnp.zeros((rows, bsz), jnp.float32)))
        q1 = jnp.where(prune1, 0.0, w1)
        urows = jax.lax.dynamic_slice(u, (i1, 0), (bsz, cols + pad))
        later = col_ids >= i1 + bsz
        wcur = wcur - jnp.where(later[None, :], err1 @ urows, 0.0)
        wcur = jax.lax.dynamic_update_slice(wcur, q1, (0, i1))
        prune_all = jax.lax.dynamic_update_slice(prune_all, prune1, (0, i1))
        return (wcur, prune_all), None

    (w, prune), _ = jax.lax.scan(block, (w, jnp.zeros(w.shape, bool)), jnp.arange(nblocks))
    w, keep_out = w[:, :cols], ~prune[:, :cols]
    return jnp.where(keep_out, w, 0.0), keep_out


@gin.configurable
class SparseGPTSettings:
    """SparseGPT's settings: `dampening` (λ as a fraction of mean diag(XᵀX), the paper's 1%)
    and `block_size` (columns per lazy-update block, 128)."""

    def __init__(self, dampening: float = 0.01, block_size: int = 128):
        if not 0 <= float(dampening) < 10:
            raise ValueError(f"SparseGPTSettings.dampening={dampening!r} must be in [0, 10) "
                             f"(a fraction of the mean diagonal of XᵀX; the paper uses 0.01)")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"SparseGPTSettings.block_size={block_size!r} must be an int >= 1")
        self.dampening, self.block_size = float(dampening), int(block_size)


def solve_kernel(kernel: jax.Array, hessian: jax.Array, *, dampening: float, block_size: int,
                 sparsity: jax.Array | float = 0.5, n: int = 0, m: int = 0,
                 keep: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """SparseGPT on a flax kernel [in, out] (or stacked experts [E, in, out] with hessians
    [E, in, in]); keep: a fixed mask in the kernel's layout. Returns (kernel, keep mask)."""
    if kernel.ndim == 3:
        fn = lambda k, h, kp: solve_kernel(k, h, dampening=dampening, block_size=block_size,
                                           sparsity=sparsity, n=n, m=m, keep=kp)
        return jax.vmap(fn)(kernel, hessian, keep) if keep is not None else \
            jax.vmap(lambda k, h: fn(k, h, None))(kernel, hessian)
    u = hessian_inverse_factor(hessian, dampening)
    w, kp = solve_rows(kernel.T, u, sparsity=sparsity, n=n, m=m, block_size=block_size,
                       keep=None if keep is None else keep.T)
    return w.T.astype(kernel.dtype), kp.T
