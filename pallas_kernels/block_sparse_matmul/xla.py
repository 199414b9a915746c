"""The block-sparse matmul in plain XLA, the CPU path (see reference.py for the definition).

Activations are laid out block-major ([blocks, tokens, block]) inside the op, so the stored
blocks' inputs are gathered as whole contiguous slabs and every product is one batched
matmul over the stored blocks: FLOPs and weight bytes scale with the density.

* forward:      y[o]     = sum_j x[idx[o, j]] @ values[o, j]
* grad_values:  dv[o, j] = x[idx[o, j]]ᵀ @ dy[o]
* grad_input:   dx[i]    = sum_{(o, j): idx[o, j] = i} dy[o] @ values[o, j]ᵀ
                (the batched products, then a scatter-add of whole [tokens, block] slabs)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse_matmul.metadata import TransposedLayout


def _blocks(a: jax.Array, block: int) -> jax.Array:
    """[tokens, blocks * block] -> [blocks, tokens, block]."""
    return a.reshape(a.shape[0], -1, block).transpose(1, 0, 2)


def _unblocks(a: jax.Array) -> jax.Array:
    """[blocks, tokens, block] -> [tokens, blocks * block]."""
    return a.transpose(1, 0, 2).reshape(a.shape[1], -1)


# Up to this many tokens (a decode step) the forward gathers x's blocks token-major and
# skips the block-major layout: measured 4.56x dense decode at batch 1 against 4.12-4.22x
# with the block-major path (embed 1024, mlp 4096, 4 layers, density 0.1, 128-blocks).
FEW_TOKENS = 16


# Up to this fan-in the forward sums one batched product per slot j instead of one product
# over all k gathered slabs: measured 1.46x faster at 32-blocks k=3, 1.25x at 64-blocks
# k=2, 1.15x at 128-blocks k=2, and 0.56-0.94x at k = 4-16 (1024 -> 4096 on 4096 tokens,
# float32, this project's 2-core CPU with huge pages: sparsejax/hugepages.py).
SLOT_SUM_MAX_K = 3


def forward(x: jax.Array, values: jax.Array, indices: jax.Array, *, out_dtype) -> jax.Array:
    """x [tokens, in] -> [tokens, out_blocks * block_out]."""
    ob, k, bi, bo = values.shape
    if x.shape[0] <= FEW_TOKENS:  # (in float32: XLA:CPU has no bf16 x bf16 -> f32 here)
        xg = x.reshape(x.shape[0], -1, bi)[:, indices].reshape(x.shape[0], ob, k * bi)
        y = jnp.einsum("toc,ocd->tod", xg.astype(jnp.float32),
                       values.reshape(ob, k * bi, bo).astype(jnp.float32))
        return y.reshape(x.shape[0], ob * bo).astype(out_dtype)
    xb = _blocks(x, bi)  # [ib, tokens, bi]
    v = values.astype(x.dtype)
    if k <= SLOT_SUM_MAX_K:
        y = sum(jnp.einsum("otb,obd->otd", xb[indices[:, j]], v[:, j],
                           preferred_element_type=jnp.float32) for j in range(k))
    else:
        y = jnp.einsum("oktb,okbd->otd", xb[indices], v, preferred_element_type=jnp.float32)
    return _unblocks(y.astype(out_dtype))


def grad_values(x: jax.Array, dy: jax.Array, indices: jax.Array, block_in: int, *,
                out_dtype) -> jax.Array:
    """[out_blocks, k, block_in, block_out]: each stored block's gradient, one batched
    product per slot j (measured 1.8-2.6x faster on CPU than one product over a gathered
    [out_blocks, k, tokens, block_in] tensor, which XLA transposes first)."""
    ob = indices.shape[0]
    xt = _blocks(x, block_in)  # [ib, tokens, bi]
    dyt = _blocks(dy, dy.shape[1] // ob).astype(x.dtype)  # [ob, tokens, bo]
    dv = [jnp.einsum("otb,otd->obd", xt[indices[:, j]], dyt, preferred_element_type=jnp.float32)
          for j in range(indices.shape[1])]
    return jnp.stack(dv, axis=1).astype(out_dtype)


def grad_input(dy: jax.Array, values: jax.Array, indices: jax.Array, layout: TransposedLayout,
               in_blocks: int, *, out_dtype) -> jax.Array:
    """[tokens, in_blocks * block_in]: dy @ Wᵀ, one batched product and one scatter-add of
    whole [tokens, block_in] slabs per slot j (measured 1.2-1.8x faster on CPU than a single
    scatter of every slot's products). (`layout` is unused: the scatter-add takes the stored
    order directly.)"""
    del layout
    ob, k, bi, bo = values.shape
    dyt = _blocks(dy, bo)  # [ob, tokens, bo]
    dx = jnp.zeros((in_blocks, dy.shape[0], bi), jnp.float32)
    for j in range(k):
        dxj = jnp.einsum("otd,obd->otb", dyt, values[:, j].astype(dy.dtype),
                         preferred_element_type=jnp.float32)  # [ob, tokens, bi]
        dx = dx.at[indices[:, j]].add(dxj)
    return _unblocks(dx).astype(out_dtype)
