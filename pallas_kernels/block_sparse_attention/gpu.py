"""Block-sparse flash attention for GPU (Pallas, Triton backend).

Each program owns one tile of rows: query rows for the forward and dq passes,
key rows for the dk/dv pass. It loops only over the blocks its mask block row
lists (kv blocks for forward/dq, query blocks for dk/dv), in steps of a
sub-tile. Program tiles and loop steps are tuned per pass and may be smaller
than the mask's blocks (see :mod:`gpu_config`); the mask decides what is
skipped, the tiles decide how the kept work is cut. Online softmax in the log2
domain with float32 accumulation; the log-sum-exp (base 2) is saved for the
gpu_backward. This module holds the forward and picks the backward
(:mod:`gpu_backward`); :mod:`gpu_common` holds the packed block lists and the
pieces every pass shares.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.block_sparse_attention import gpu_backward
from pallas_kernels.block_sparse_attention import gpu_common as common


def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, list_ref, o_ref, lse_ref, *,
                rule, scale, rows, cols, block_k):
    q = q_ref[...]  # [rows, d]
    d = q.shape[-1]
    q_pos = pl.program_id(0) * rows + jnp.arange(rows)
    q_seg = None if qseg_ref is None else qseg_ref[...]

    def body(j, carry, rule):
        acc, m, l = carry
        start = common.step_start(list_ref, j, block_k, cols)
        kblk = k_ref[pl.ds(start, cols), :]
        vblk = v_ref[pl.ds(start, cols), :]
        s = common.dot(q, kblk, trans_b=True) * (scale * common.LOG2E)  # [rows, cols], log2
        k_seg = None if kseg_ref is None else kseg_ref[pl.ds(start, cols)]
        vis = common.visibility(rule, q_pos, start + jnp.arange(cols), q_seg, k_seg)
        if vis is not None:
            s = jnp.where(vis, s, common.NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        corr = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = corr * l + jnp.sum(p, axis=-1)
        acc = corr[:, None] * acc + common.dot(p.astype(vblk.dtype), vblk)
        return acc, m_new, l

    init = (jnp.zeros((rows, d), jnp.float32), jnp.full((rows,), common.NEG, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    acc, m, l = common.list_loop(list_ref, block_k, cols, rule, body, init)
    # Rows whose max is still NEG saw no key: garbage from all-masked tiles is
    # wiped by the correction factor as soon as a real logit arrives.
    ok = m > 0.5 * common.NEG
    l_safe = jnp.where(ok, l, 1.0)
    o_ref[...] = jnp.where(ok[:, None], acc / l_safe[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(ok, m + jnp.log2(l_safe), common.BIG)


@functools.partial(jax.jit, static_argnames=common.STATIC)
def fwd(q, k, v, seg, kv_idx, kv_cnt, kv_nfull=None, *, rule, scale, block_q, block_k,
        interpret=False, config=None):
    """o ``[b, sq, h, d]`` and lse ``[b, h, sq]`` (float32, base-2 log-sum-exp).

    ``kv_nfull``: per list row, how many leading listed blocks are full (no rule
    needed); ``None`` applies the rule everywhere."""
    b, sq, h, _ = q.shape
    pc = common.resolve(config, q, block_q, block_k, "fwd")
    grid, in_specs, q_spec, packed = common.query_row_call(q, k, seg, (kv_idx, kv_cnt, kv_nfull),
                                                           pc, block_q)
    kernel = functools.partial(_fwd_kernel, rule=rule, scale=scale, rows=pc.rows, cols=pc.cols,
                               block_k=block_k)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=[q_spec, common.vec_spec(pc.rows)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, sq), jnp.float32)],
        compiler_params=common.params(pc),
        interpret=interpret,
        name="bsa_fwd",
    )(q, k, v, seg, seg, packed)


@functools.partial(jax.jit, static_argnames=common.STATIC)
def bwd(q, k, v, seg, o, lse, do, kv_idx, kv_cnt, q_idx, q_cnt, kv_nfull=None, q_nfull=None, *,
        rule, scale, block_q, block_k, interpret=False, config=None):
    """(dq, dk, dv)."""
    kw = dict(rule=rule, scale=scale, block_q=block_q, block_k=block_k, interpret=interpret,
              config=config)
    delta = gpu_backward.delta_of(o, do)
    cfg = common.or_default(config, q)
    if cfg.backward == "fused":
        return gpu_backward.fused_bwd_pass(q, k, v, seg, do, lse, delta, q_idx, q_cnt, q_nfull,
                                           **kw)
    if (cfg.backward == "cached"
            and gpu_backward.ds_store_bytes(q, kv_idx, block_q, block_k) <= cfg.ds_cache_max_bytes):
        dk, dv, store = gpu_backward.dkv_store_pass(q, k, v, seg, do, lse, delta, kv_idx, kv_cnt,
                                                    q_idx, q_cnt, q_nfull, **kw)
        return gpu_backward.dq_cached_pass(q, k, store, kv_idx, kv_cnt, **kw), dk, dv
    dq = gpu_backward.dq_pass(q, k, v, seg, do, lse, delta, kv_idx, kv_cnt, kv_nfull, **kw)
    dk, dv = gpu_backward.dkv_pass(q, k, v, seg, do, lse, delta, q_idx, q_cnt, q_nfull, **kw)
    return dq, dk, dv
