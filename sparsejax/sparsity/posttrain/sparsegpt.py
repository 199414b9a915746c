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

Dead inputs (H_jj = 0: a dead ReLU unit feeding a down projection, a feature the tokens
routed to an expert never carry) are handled as the reference code handles them: H_jj = 1
and their weights zeroed before the solve, so they are pruned (first, at no cost) and count
toward the block's pruned fraction; with N:M their zero scores put them first among the
M - N pruned of their group.

The solve is a scan over blocks; a block's columns go in nested chunks (16, then 4: the
in-block updates of a chunk are one matmul) and the lazy update touches only the columns
after the block, so the work is the reference's. The unstructured selection finds the
block's k-th lowest score by bisection on its float bits (no sort). Everything is jittable
and batched over output units, so a layer's solve splits over devices by output units when
W is sharded that way; `solve_kernel` takes a leading expert axis too.
"""
from __future__ import annotations

import math
from typing import Any

import gin
import jax
import jax.numpy as jnp

PyTree = Any
# float32 matmuls in full precision on every backend (no TF32 or bf16 passes on GPU / TPU), as
# the reference code runs with TF32 off
HIGHEST = jax.lax.Precision.HIGHEST


def dead_inputs(hessian: jax.Array) -> jax.Array:
    """Inputs calibration never saw (H_jj = 0: a dead ReLU unit, an expert no token reached
    with that feature): [..., in, in] -> bool [..., in]."""
    return jnp.diagonal(hessian, axis1=-2, axis2=-1) == 0


def hessian_inverse_factor(hessian: jax.Array, dampening: float) -> jax.Array:
    """U, the upper Cholesky factor of (H + λI)⁻¹ (λ = dampening * mean diag H; dead inputs,
    H_jj = 0, get H_jj = 1 first, as the reference code does). hessian: [in, in] -> [in, in].

    With J the reversal permutation and JHJ = LLᵀ, H = ŨŨᵀ for the upper triangular
    Ũ = JLJ, so H⁻¹ = Ũ⁻ᵀŨ⁻¹ and U = Ũ⁻¹: one Cholesky and one triangular inverse (the
    reference code's Cholesky, inverse and second Cholesky give the same U). U's strictly
    lower triangle is exactly zero (the solve relies on it)."""
    h = hessian.astype(jnp.float32)
    n = h.shape[-1]
    h = h + jnp.diag(jnp.where(dead_inputs(h), 1.0, 0.0))
    damp = dampening * jnp.mean(jnp.diagonal(h))
    h = h + damp * jnp.eye(n, dtype=h.dtype)
    flip = lambda a: jnp.flip(a, (0, 1))
    return _upper_inverse(flip(jnp.linalg.cholesky(flip(h))))


def _upper_inverse(a: jax.Array, base: int = 512) -> jax.Array:
    """The inverse of an upper triangular [n, n] matrix by 2 x 2 blocks down to `base`
    (d³/3 multiply-adds, mostly in matmuls; a triangular solve against I costs d³/2 and
    took 1.8x the time at 2048² on one core), exact zeros below. A smaller base is a little
    faster and compiles slower."""
    n = a.shape[0]
    if n <= base:
        return jax.scipy.linalg.solve_triangular(a, jnp.eye(n, dtype=a.dtype), lower=False)
    h = n // 2
    a11, a22 = _upper_inverse(a[:h, :h], base), _upper_inverse(a[h:, h:], base)
    mm = lambda x, y: jnp.matmul(x, y, precision=HIGHEST)
    a12 = -mm(mm(a11, a[:h, h:]), a22)
    return jnp.block([[a11, a12], [jnp.zeros((n - h, h), a.dtype), a22]])


def _lowest(scores: jax.Array, k: jax.Array) -> jax.Array:
    """Bool mask of the k lowest entries of `scores` [cols, rows] (>= 0; k may be traced),
    ties broken by row then column (a stable sort of the block in row layout). The k-th
    lowest value is found by bisection on its float bits (31 counting passes, no sort);
    only when it is tied does a second bisection pick the tied entries by position."""
    bits = jax.lax.bitcast_convert_type(scores.astype(jnp.float32), jnp.int32)
    cols, rows = scores.shape
    t = _bisect(bits, k, None, 31)
    below, tied = bits < t, bits == t
    need = k - _count(below)

    def by_position(_):
        order = jnp.arange(rows)[None, :] * cols + jnp.arange(cols)[:, None]
        last = _bisect(order, need, tied, max(1, (rows * cols - 1).bit_length()))
        return tied & (order <= last) & (need > 0)

    return below | jax.lax.cond(_count(tied) == need, lambda _: tied, by_position, None)


def _count(mask: jax.Array) -> jax.Array:
    """True entries of a [cols, rows] mask (float partial sums per row: vectorized)."""
    return jnp.sum(jnp.sum(mask.astype(jnp.float32), 0).astype(jnp.int32))


def _bisect(key: jax.Array, need: jax.Array, within: jax.Array | None, nbits: int
            ) -> jax.Array:
    """The largest t < 2**nbits with fewer than `need` entries (of `within`) below t (key:
    int32 >= 0): the need-th smallest key there, bit by bit from the top."""
    def step(b, t):
        trial = t | jnp.left_shift(jnp.int32(1), nbits - 1 - b)
        below = key < trial
        return jnp.where(_count(below if within is None else below & within) < need, trial, t)

    return jax.lax.fori_loop(0, nbits, step, jnp.int32(0))


def _nm_prune(scores: jax.Array, n: int, m: int) -> jax.Array:
    """[m, rows] scores -> bool mask pruning the m - n lowest of each column (ties by
    position, as a stable sort)."""
    rank = [sum(((scores[j] < scores[i]) | ((scores[j] == scores[i]) & (j < i)))
                .astype(jnp.int32) for j in range(m) if j != i) for i in range(m)]
    return jnp.stack([jnp.asarray(r) < (m - n) for r in rank])


def _columns(wg, ug, prune, n, m):
    """A few columns visited one by one (the OBS step of each, unrolled). wg [g, rows]: their
    weights with every earlier update applied; ug: U's [g, g] diagonal block; prune [g, rows]
    or None (N:M: chosen per group of m from the updated weights). Returns (errors
    (w_j - q_j) / U_jj [g, rows], prune)."""
    g = wg.shape[0]
    d = jnp.diagonal(ug)
    cur = [wg[i] for i in range(g)]
    errs, masks = [], []
    for i in range(g):
        if prune is None and i % m == 0:
            masks.append(_nm_prune(jnp.stack(cur[i:i + m]) ** 2 / d[i:i + m, None] ** 2, n, m))
        p = prune[i] if prune is not None else masks[-1][i % m]
        e = jnp.where(p, cur[i], 0.0) / d[i]
        for r in range(i + 1, g):
            cur[r] = cur[r] - ug[i, r] * e
        errs.append(e)
    return jnp.stack(errs), prune if prune is not None else jnp.concatenate(masks)


def _dot_t(a: jax.Array, b: jax.Array) -> jax.Array:
    """aᵀ b for a [k, p], b [k, q]."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=HIGHEST)


def _span(w, u, prune, sizes, n, m):
    """Columns [c, rows] in chunks of sizes[0] (a loop): each chunk solved recursively with
    sizes[1:] (the last level column by column), then one lazy update (a matmul) of the
    whole span by the chunk's errors. U is upper triangular with exact zeros below, so the
    columns before the chunk are untouched and the chunk's own rows become its
    updated weights (pruned ones ~0, zeroed by the caller). Returns (w, errors, prune)."""
    if not sizes:
        e, prune = _columns(w, u, prune, n, m)
        return w - _dot_t(u, e), e, prune
    c, rows = w.shape
    s = sizes[0]

    def body(j, carry):
        w, err, pr = carry
        i = j * s
        ws = jax.lax.dynamic_slice(w, (i, 0), (s, rows))
        us = jax.lax.dynamic_slice(u, (i, i), (s, s))
        ps = None if prune is None else jax.lax.dynamic_slice(prune, (i, 0), (s, rows))
        _, e, ps = _span(ws, us, ps, sizes[1:], n, m)
        w = w - _dot_t(jax.lax.dynamic_slice(u, (i, 0), (s, c)), e)
        return (w, jax.lax.dynamic_update_slice(err, e, (i, 0)),
                jax.lax.dynamic_update_slice(pr, ps, (i, 0)))

    return jax.lax.fori_loop(0, c // s, body,
                             (w, jnp.zeros_like(w), jnp.zeros(w.shape, bool)))


def _levels(bsz: int, m: int, sizes: tuple[int, ...]) -> tuple[int, ...]:
    """The in-block chunk sizes: each divides the one above (the block first) and, with
    N:M, is a multiple of M (groups never straddle chunks); 1-column levels dropped."""
    out, top = [], bsz
    for s in sizes:
        s = math.gcd(top, -(-s // m) * m if m else s)
        if 1 < s < top and s >= m:
            out.append(s)
            top = s
    return tuple(out)


def solve(w: jax.Array, u: jax.Array, *, sparsity: jax.Array | float = 0.5, n: int = 0,
          m: int = 0, block_size: int = 128, keep: jax.Array | None = None,
          dead: jax.Array | None = None, chunks: tuple[int, ...] = (16, 4)
          ) -> tuple[jax.Array, jax.Array]:
    """The SparseGPT solve of one layer in the kernel's layout.

    w: [in, out]; u: `hessian_inverse_factor` [in, in] (upper triangular, exact zeros
    below: the chunked updates rely on them); sparsity: pruned fraction of each
    block (unstructured; may be traced); n, m > 0: N:M along the inputs instead; keep: a
    fixed bool mask [in, out] (True = kept) instead; dead: bool [in], inputs whose weights
    are zero and always pruned (unstructured; with N:M their zero scores put them first in
    their group). Returns (pruned weights [in, out] float32 with exact zeros, keep mask).

    A scan over column blocks: the mask of the block (unstructured), its columns in nested
    chunks of `chunks` sizes (the in-block updates as matmuls, so the column-by-column steps
    touch a few rows), then the lazy update of the columns after the block only (a loop
    over the remaining blocks: the reference's work, no more). The order of the updates is
    the reference's up to float rounding."""
    cols, rows = w.shape
    bsz = min(int(block_size), cols)
    if n and (cols % m or bsz % m):
        raise ValueError(f"SparseGPT N:M: M={m} must divide the input dim {cols} and the "
                         f"block size {bsz}")
    pad = (-cols) % bsz
    w = jnp.pad(w.astype(jnp.float32), ((0, pad), (0, 0)))
    u = jnp.pad(u.astype(jnp.float32), ((0, pad), (0, pad)))
    if pad:
        u = u + jnp.diag(jnp.concatenate([jnp.zeros(cols), jnp.ones(pad)]))
    nblocks = (cols + pad) // bsz
    real = jnp.arange(cols + pad) < cols
    fixed = None if keep is None else jnp.pad(~keep, ((0, pad), (0, 0)))
    dead = None if dead is None else jnp.pad(dead, (0, pad))
    sparsity = jnp.asarray(sparsity, jnp.float32)
    sizes = _levels(bsz, m if n else 0, chunks)

    def block(carry, b):
        wcur, prune_all = carry
        i1 = b * bsz
        w1 = jax.lax.dynamic_slice(wcur, (i1, 0), (bsz, rows))
        u1 = jax.lax.dynamic_slice(u, (i1, i1), (bsz, bsz))
        if fixed is not None:
            prune1 = jax.lax.dynamic_slice(fixed, (i1, 0), (bsz, rows))
        elif n:
            prune1 = None
        else:
            real1 = jax.lax.dynamic_slice(real, (i1,), (bsz,))
            scores = jnp.where(real1[:, None], w1 ** 2 / jnp.diagonal(u1)[:, None] ** 2,
                               jnp.inf)
            prune1 = _lowest(scores, jnp.round(sparsity * rows * jnp.sum(real1))
                             .astype(jnp.int32))
            if dead is not None:
                prune1 = prune1 | jax.lax.dynamic_slice(dead, (i1,), (bsz,))[:, None]
        q1, err1, prune1 = _span(w1, u1, prune1, sizes, n, m)
        wcur = jax.lax.dynamic_update_slice(wcur, jnp.where(prune1, 0.0, q1), (i1, 0))

        def later(j, wcur):  # the lazy update, one later block at a time
            i = j * bsz
            wj = jax.lax.dynamic_slice(wcur, (i, 0), (bsz, rows))
            uj = jax.lax.dynamic_slice(u, (i1, i), (bsz, bsz))
            return jax.lax.dynamic_update_slice(wcur, wj - _dot_t(uj, err1), (i, 0))

        wcur = jax.lax.fori_loop(b + 1, nblocks, later, wcur)
        return (wcur, jax.lax.dynamic_update_slice(prune_all, prune1, (i1, 0))), None

    (w, prune), _ = jax.lax.scan(block, (w, jnp.zeros(w.shape, bool)), jnp.arange(nblocks))
    keep_out = ~prune[:cols]
    return jnp.where(keep_out, w[:cols], 0.0), keep_out


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
    dead = dead_inputs(hessian)
    u = hessian_inverse_factor(hessian, dampening)
    w = jnp.where(dead[:, None], 0.0, kernel.astype(jnp.float32))
    w, kp = solve(w, u, sparsity=sparsity, n=n, m=m, block_size=block_size, keep=keep,
                  dead=dead)
    return w.astype(kernel.dtype), kp
