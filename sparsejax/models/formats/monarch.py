"""The Monarch format (Dao et al., ICML 2022): W = P L Pᵀ R, R and L block-diagonal.

A projection x [tokens, in] -> [tokens, out] with b = `Monarch.nblocks` blocks (b divides
in and out) and middle width m = min(in, out) (as fly's MonarchLinear: the smaller side sets
the width, so rectangular projections store the fewest params) keeps two float params:

  blkdiag1  R  [b, in/b, m/b]    applied first: block k maps input slice k (entries
                                 k * in/b ...) to middle slice k (entries k * m/b ...)
  blkdiag2  L  [b, m/b, out/b]   applied second: block l maps middle entries l, l + b, ...
                                 to output columns l, l + b, ...

P is the permutation that reads a length-n vector as [b, n/b] and transposes it: Pᵀ deals
the middle vector out to L's blocks with stride b, so every L block reads every R block
(when b^2 <= m), and the final P interleaves L's outputs (output column s * b + l is entry
s of L block l). Both multiplies are batched matmuls over the block
axis, which carries the logical axis 'out_blocks' (FSDP and tensor parallelism split it).
Params and FLOPs scale with (in + out) * m / b instead of in * out.

Init: every factor is the dense layer's variance_scaling(1, 'fan_in') over its own block
(Var R = b / in, Var L = b / m). An entry of W sums the products along the c middle entries
joining its R block and its L block, c = m / b^2 when b^2 divides m, so Var W_ij =
c * (b / in) * (b / m) = 1 / in: the dense layer's variance (on average over the entries when
b^2 does not divide m; entries whose blocks share no middle entry are then structurally 0).
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.models.formats import WEIGHT_FORMATS, WeightFormat, module_path
from sparsejax.parallel.rules import LOGICAL_RULES

# fan-in over the block's input axis; axis 0 (the blocks) is a batch of independent layers
FACTOR_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2,
                                               out_axis=-1, batch_axis=(0,))
BLOCK_AXES = ("out_blocks", None, None)


def monarch_matmul(x: jax.Array, right: jax.Array, left: jax.Array,
                   precision: Any = None) -> jax.Array:
    """x [..., in] @ W for W = P L Pᵀ R with factors R = right [b, in/b, m/b] and
    L = left [b, m/b, out/b]."""
    b, p, q = right.shape
    s = left.shape[-1]
    lead = x.shape[:-1]
    xb = x.reshape(-1, b, p)                                              # [t, b, in/b]
    h = jnp.einsum("tkp,kpq->tkq", xb, right, precision=precision)            # [t, b, m/b]
    h = h.reshape(-1, q, b).swapaxes(1, 2)                                # Pᵀ: [t, b, m/b]
    z = jnp.einsum("tlr,lrs->tls", h, left, precision=precision)             # [t, b, out/b]
    return z.swapaxes(1, 2).reshape(*lead, s * b)                         # P: [..., out]


def middle_index(m: int, nblocks: int) -> dict[str, np.ndarray]:
    """For each middle entry h < m (the m-vector between R and L): the R block `k` and R
    column `j` that write it, the L block `l` and L row `r` that read it, and its rank `t`
    among the middle entries joining the same (k, l) pair. Each entry joins exactly one
    pair, so the factors split into independent per-pair low-rank factors."""
    q = m // nblocks
    h = np.arange(m)
    k, j, lb, r = h // q, h % q, h % nblocks, h // nblocks
    t = (j - (lb - k * q) % nblocks) // nblocks
    return {"k": k, "j": j, "l": lb, "r": r, "t": t}


@gin.configurable
@WEIGHT_FORMATS.register("monarch")
class Monarch(WeightFormat):
    """Monarch weights W = P L Pᵀ R: 'blkdiag1' (R) [b, in/b, m/b], 'blkdiag2' (L)
    [b, m/b, out/b], b = nblocks, m = min(in, out)."""

    param_names = ("blkdiag1", "blkdiag2")

    def __init__(self, nblocks: int = 4):
        if isinstance(nblocks, bool) or not isinstance(nblocks, int) or nblocks < 1:
            raise ValueError(f"Monarch.nblocks={nblocks!r} must be a positive int")
        self.nblocks = nblocks

    def shapes(self, in_features: int, features: int,
               where: str = "") -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """(R shape, L shape) of a [in_features, features] projection; a ValueError when
        nblocks does not divide both."""
        b = self.nblocks
        if in_features % b or features % b:
            at = f" at {where!r}" if where else ""
            raise ValueError(f"Monarch.nblocks={b} must divide the projection{at}: "
                             f"in_features={in_features} and features={features}; use a "
                             f"common divisor of both")
        m = min(in_features, features)
        return (b, in_features // b, m // b), (b, m // b, features // b)

    def check_mesh(self, mesh_shape: Mapping[str, int]) -> None:
        """The block axis ('out_blocks') is split over the mesh axes of its rule: their
        product must divide nblocks."""
        axes = dict(LOGICAL_RULES)[BLOCK_AXES[0]]
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        split = int(np.prod([mesh_shape.get(a, 1) for a in axes]))
        if self.nblocks % split:
            raise ValueError(f"Monarch.nblocks={self.nblocks} must be a multiple of the mesh "
                             f"axes {'*'.join(axes)}={split} that split its block axis (mesh "
                             f"{dict(mesh_shape)}); use a multiple of {split}")

    def draw(self, key: jax.Array, in_features: int, features: int, dtype: Any,
             real_features: int | None) -> tuple[jax.Array, jax.Array]:
        """(R, L) at init; L's entries that feed the padded output columns (>= real_features)
        are zero, so those columns of W are zero (and their gradient stays zero)."""
        r_shape, l_shape = self.shapes(in_features, features)
        r_key, l_key = jax.random.split(key)
        right, left = FACTOR_INIT(r_key, r_shape, dtype), FACTOR_INIT(l_key, l_shape, dtype)
        if real_features is not None:
            b, _, s = l_shape
            column = jnp.arange(s)[None, :] * b + jnp.arange(b)[:, None]  # [b, out/b]
            left = jnp.where((column < real_features)[:, None, :], left, jnp.zeros_like(left))
        return right, left

    def __call__(self, module, x, *, features, axes, dtype, param_dtype, real_features):
        self.shapes(x.shape[-1], features, module_path(module))
        drawn = (self.draw(module.make_rng("params"), x.shape[-1], features, param_dtype,
                           real_features) if module.is_initializing() else (None, None))
        right = module.param("blkdiag1", nn.with_logical_partitioning(lambda _: drawn[0],
                                                                      BLOCK_AXES))
        left = module.param("blkdiag2", nn.with_logical_partitioning(lambda _: drawn[1],
                                                                     BLOCK_AXES))
        return monarch_matmul(x.astype(dtype), right.astype(dtype), left.astype(dtype))

    def to_dense(self, params: Mapping[str, jax.Array], in_features: int) -> jax.Array:
        """W [in, out] = the layer applied to the identity (float32 products at full
        precision)."""
        right, left = params["blkdiag1"], params["blkdiag2"]
        return monarch_matmul(jnp.eye(in_features, dtype=right.dtype), right, left,
                              precision=jax.lax.Precision.HIGHEST)

    def from_dense(self, kernel: jax.Array, **kwargs: Any) -> dict[str, jax.Array]:
        """The Monarch params nearest to `kernel` [in, out] in Frobenius norm (exact when the
        kernel is Monarch). W's block (input block k, output columns l, l + b, ...) depends
        only on the c middle entries joining R block k and L block l, so the projection
        splits into b^2 independent best rank-c approximations (truncated SVD, singular
        values split evenly between the factors): the paper's rank-1 projection when
        in = out = n and b = sqrt(n), rank m / b^2 in general (fly's blockdiag_butterfly_
        project for its block sizes). Runs on the host in float64."""
        dtype = jnp.asarray(kernel).dtype
        w = np.asarray(kernel).astype(np.float64)
        (b, p, q), (_, _, s) = self.shapes(*w.shape)
        blocks = w.reshape(b, p, s, b).transpose(0, 3, 1, 2)  # [k, l, in/b, out/b]
        u, sv, vt = np.linalg.svd(blocks, full_matrices=False)  # u [k, l, in/b, c_max]
        root = np.sqrt(sv)                                      # [k, l, c_max]
        ix = middle_index(b * q, b)
        k, j, lb, r, t = ix["k"], ix["j"], ix["l"], ix["r"], ix["t"]
        rf, lf = np.zeros((b, p, q)), np.zeros((b, q, s))
        rf[k, :, j] = u[k, lb, :, t] * root[k, lb, t][:, None]   # [m, in/b]
        lf[lb, r, :] = vt[k, lb, t, :] * root[k, lb, t][:, None]  # [m, out/b]
        return {"blkdiag1": jnp.asarray(rf, dtype), "blkdiag2": jnp.asarray(lf, dtype)}
