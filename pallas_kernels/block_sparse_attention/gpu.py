"""Block-sparse flash attention for GPU (Pallas, Triton backend).

Each program owns one (query block, batch, head) and loops only over the kv
blocks listed for its row (forward, dq) or one (kv block, batch, head) looping
over the query blocks that see it (dk/dv). Online softmax in the log2 domain
with float32 accumulation; the log-sum-exp (base 2) is saved for the backward.

Block lists arrive packed as ``[B', H', rows, W]`` int32 with the count in
column 0 and the block indices after it (``W`` a power of two), so one small
row block per program carries everything.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

NEG = -1e30
BIG = 1e30
LOG2E = math.log2(math.e)


def pack_lists(idx: jax.Array, cnt: jax.Array) -> jax.Array:
    """(indices ``[B', H', rows, n]``, counts ``[B', H', rows]``) -> packed ``[B', H', rows, W]``."""
    n = idx.shape[-1]
    width = int(pl.next_power_of_2(n + 1))
    packed = jnp.concatenate([cnt[..., None].astype(jnp.int32), idx.astype(jnp.int32)], axis=-1)
    return jnp.pad(packed, [(0, 0)] * 3 + [(0, width - n - 1)])


def _list_spec(packed: jax.Array):
    """BlockSpec for one packed row; broadcasts over batch/heads where the list does."""
    nb, nh, _, width = packed.shape

    def index_map(r, b, h):
        return (b if nb > 1 else 0, h if nh > 1 else 0, r, 0)

    return pl.BlockSpec((None, None, None, width), index_map)


def _dot(a, b, *, trans_a=False, trans_b=False):
    """2-D matmul with optional transposes, float32 result."""
    prec = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


def _visibility(rule, q_pos, k_pos, q_seg, k_seg):
    vis = None
    if rule is not None:
        vis = rule(q_pos[:, None], k_pos[None, :])
    if q_seg is not None:
        same = q_seg[:, None] == k_seg[None, :]
        vis = same if vis is None else vis & same
    return vis


def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, list_ref, o_ref, lse_ref, *,
                rule, scale, block_q, block_k):
    qi = pl.program_id(0)
    q = q_ref[...]  # [bq, d]
    d = q.shape[-1]
    q_pos = qi * block_q + jnp.arange(block_q)
    q_seg = None if qseg_ref is None else qseg_ref[...]
    count = list_ref[0]

    def body(j, carry):
        acc, m, l = carry
        start = pl.multiple_of(list_ref[j + 1] * block_k, block_k)
        kblk = k_ref[pl.ds(start, block_k), :]
        vblk = v_ref[pl.ds(start, block_k), :]
        s = _dot(q, kblk, trans_b=True) * (scale * LOG2E)  # [bq, bk], log2 domain
        k_seg = None if kseg_ref is None else kseg_ref[pl.ds(start, block_k)]
        vis = _visibility(rule, q_pos, start + jnp.arange(block_k), q_seg, k_seg)
        if vis is not None:
            s = jnp.where(vis, s, NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        corr = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = corr * l + jnp.sum(p, axis=-1)
        acc = corr[:, None] * acc + _dot(p.astype(vblk.dtype), vblk)
        return acc, m_new, l

    init = (jnp.zeros((block_q, d), jnp.float32), jnp.full((block_q,), NEG, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(0, count, body, init)
    # Rows whose max is still NEG saw no key: garbage from all-masked tiles is
    # wiped by the correction factor as soon as a real logit arrives.
    ok = m > 0.5 * NEG
    l_safe = jnp.where(ok, l, 1.0)
    o_ref[...] = jnp.where(ok[:, None], acc / l_safe[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(ok, m + jnp.log2(l_safe), BIG)


def _qkv_specs(block_q, seq_k, d, groups):
    q_spec = pl.BlockSpec((None, block_q, None, d), lambda r, b, h: (b, r, h, 0))
    kv_spec = pl.BlockSpec((None, seq_k, None, d), lambda r, b, h: (b, 0, h // groups, 0))
    return q_spec, kv_spec


def _seg_specs(seg, block, seq):
    if seg is None:
        return [None, None]
    return [pl.BlockSpec((None, block), lambda r, b, h: (b, r)),
            pl.BlockSpec((None, seq), lambda r, b, h: (b, 0))]


def _params(d, block_a, block_b):
    warps = 4 if d <= 64 and block_a * block_b <= 64 * 64 else 8
    return plgpu.CompilerParams(num_warps=warps, num_stages=2)


@functools.partial(jax.jit, static_argnames=("rule", "scale", "block_q", "block_k", "interpret"))
def fwd(q, k, v, seg, kv_idx, kv_cnt, *, rule, scale, block_q, block_k, interpret=False):
    """o ``[b, sq, h, d]`` and lse ``[b, h, sq]`` (float32, base-2 log-sum-exp)."""
    b, sq, h, d = q.shape
    sk, kvh = k.shape[1], k.shape[2]
    packed = pack_lists(kv_idx, kv_cnt)
    q_spec, kv_spec = _qkv_specs(block_q, sk, d, h // kvh)
    kernel = functools.partial(_fwd_kernel, rule=rule, scale=scale, block_q=block_q,
                               block_k=block_k)
    return pl.pallas_call(
        kernel,
        grid=(sq // block_q, b, h),
        in_specs=[q_spec, kv_spec, kv_spec, *_seg_specs(seg, block_q, sk), _list_spec(packed)],
        out_specs=[q_spec, pl.BlockSpec((None, None, block_q), lambda r, b, h: (b, h, r))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, sq), jnp.float32)],
        compiler_params=_params(d, block_q, block_k),
        interpret=interpret,
        name="bsa_fwd",
    )(q, k, v, seg, seg, packed)


def _dq_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, list_ref, do_ref, lse_ref, delta_ref,
               dq_ref, *, rule, scale, block_q, block_k):
    qi = pl.program_id(0)
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    q_pos = qi * block_q + jnp.arange(block_q)
    q_seg = None if qseg_ref is None else qseg_ref[...]

    def body(j, dq):
        start = pl.multiple_of(list_ref[j + 1] * block_k, block_k)
        kblk = k_ref[pl.ds(start, block_k), :]
        vblk = v_ref[pl.ds(start, block_k), :]
        s = _dot(q, kblk, trans_b=True) * (scale * LOG2E)
        k_seg = None if kseg_ref is None else kseg_ref[pl.ds(start, block_k)]
        vis = _visibility(rule, q_pos, start + jnp.arange(block_k), q_seg, k_seg)
        if vis is not None:
            s = jnp.where(vis, s, NEG)
        p = jnp.exp2(s - lse[:, None])
        dp = _dot(do, vblk, trans_b=True)
        ds = p * (dp - delta[:, None])
        return dq + _dot(ds.astype(kblk.dtype), kblk)

    dq = jax.lax.fori_loop(0, list_ref[0], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(k_ref, v_ref, q_ref, kseg_ref, qseg_ref, list_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, *, rule, scale, block_q, block_k):
    ki = pl.program_id(0)
    kblk = k_ref[...]
    vblk = v_ref[...]
    k_pos = ki * block_k + jnp.arange(block_k)
    k_seg = None if kseg_ref is None else kseg_ref[...]

    def body(j, carry):
        dk, dv = carry
        start = pl.multiple_of(list_ref[j + 1] * block_q, block_q)
        q = q_ref[pl.ds(start, block_q), :]
        do = do_ref[pl.ds(start, block_q), :]
        lse = lse_ref[pl.ds(start, block_q)]
        delta = delta_ref[pl.ds(start, block_q)]
        s = _dot(q, kblk, trans_b=True) * (scale * LOG2E)
        q_seg = None if qseg_ref is None else qseg_ref[pl.ds(start, block_q)]
        vis = _visibility(rule, start + jnp.arange(block_q), k_pos, q_seg, k_seg)
        if vis is not None:
            s = jnp.where(vis, s, NEG)
        p = jnp.exp2(s - lse[:, None])  # [bq, bk]
        dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
        dp = _dot(do, vblk, trans_b=True)
        ds = p * (dp - delta[:, None])
        dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    zeros = jnp.zeros(kblk.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, list_ref[0], body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


@functools.partial(jax.jit, static_argnames=("rule", "scale", "block_q", "block_k", "interpret"))
def bwd(q, k, v, seg, o, lse, do, kv_idx, kv_cnt, q_idx, q_cnt, *, rule, scale, block_q,
        block_k, interpret=False):
    """(dq, dk, dv); dk/dv are computed per query head and summed over each GQA group."""
    b, sq, h, d = q.shape
    sk, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    delta = jnp.einsum("bshd,bshd->bhs", o.astype(jnp.float32), do.astype(jnp.float32))
    kw = dict(rule=rule, scale=scale, block_q=block_q, block_k=block_k)
    row_packed = pack_lists(kv_idx, kv_cnt)
    q_spec, kv_full = _qkv_specs(block_q, sk, d, g)
    row_vec = pl.BlockSpec((None, None, block_q), lambda r, b, h: (b, h, r))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **kw),
        grid=(sq // block_q, b, h),
        in_specs=[q_spec, kv_full, kv_full, *_seg_specs(seg, block_q, sk), _list_spec(row_packed),
                  q_spec, row_vec, row_vec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(d, block_q, block_k),
        interpret=interpret,
        name="bsa_dq",
    )(q, k, v, seg, seg, row_packed, do, lse, delta)

    col_packed = pack_lists(q_idx, q_cnt)
    k_spec = pl.BlockSpec((None, block_k, None, d), lambda r, b, h: (b, r, h // g, 0))
    q_full = pl.BlockSpec((None, sq, None, d), lambda r, b, h: (b, 0, h, 0))
    vec_full = pl.BlockSpec((None, None, sq), lambda r, b, h: (b, h, 0))
    out_dtype = jnp.float32 if g > 1 else k.dtype
    dkv_spec = pl.BlockSpec((None, block_k, None, d), lambda r, b, h: (b, r, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, **kw),
        grid=(sk // block_k, b, h),
        in_specs=[k_spec, k_spec, q_full, *_seg_specs(seg, block_k, sq), _list_spec(col_packed),
                  q_full, vec_full, vec_full],
        out_specs=[dkv_spec, dkv_spec],
        out_shape=[jax.ShapeDtypeStruct((b, sk, h, d), out_dtype)] * 2,
        compiler_params=_params(d, block_q, block_k),
        interpret=interpret,
        name="bsa_dkv",
    )(k, v, q, seg, seg, col_packed, do, lse, delta)
    if g > 1:
        dk = dk.reshape(b, sk, kvh, g, d).sum(3).astype(k.dtype)
        dv = dv.reshape(b, sk, kvh, g, d).sum(3).astype(v.dtype)
    return dq, dk, dv
