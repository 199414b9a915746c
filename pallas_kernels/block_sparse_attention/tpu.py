"""Block-sparse flash attention for TPU (Pallas, Mosaic backend).

The block lists are scalar-prefetched into SMEM; the kv (or q) BlockSpec
index_maps read them, so each grid step DMAs exactly one listed tile. The last
grid axis walks a row's list: steps past the row's count repeat the last index
(no new DMA) and skip compute under ``pl.when``. Each list names its full
blocks first (the token rule holds for every pair, see ``masks.full_first``);
a third prefetched array counts them, and those steps compute without the
rule's iota, compare and select. Online softmax runs in VMEM scratch with
float32 accumulation. Works on [b, h, s, d] (heads-major, so the tiled minor
dims are (seq, head_dim)); the wrapper transposes.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

NEG = -1e30
BIG = 1e30
LANES = 128
SUBLANES = 8


def _dot(a, b, *, trans_a=False, trans_b=False):
    """2-D matmul with optional transposes, float32 result."""
    prec = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


def _row(nb, nh, rows):
    """Flat offset of list row (b, h, r) for lists shaped [nb, nh, rows, ...]."""
    return lambda b, h, r: ((b if nb > 1 else 0) * nh + (h if nh > 1 else 0)) * rows + r


def _visibility(rule, q0, k0, shape, qseg_ref, kseg_ref):
    vis = None
    if rule is not None:
        q_pos = q0 + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
        k_pos = k0 + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
        vis = rule(q_pos, k_pos)
    if qseg_ref is not None:
        same = qseg_ref[:, :1] == kseg_ref[:1, :]  # [bq, 1] vs [1, bk]
        vis = same if vis is None else vis & same
    return vis


def _seg_arrays(seg):
    if seg is None:
        return None, None
    b, s = seg.shape
    return (jnp.broadcast_to(seg[:, :, None], (b, s, LANES)),
            jnp.broadcast_to(seg[:, None, :], (b, SUBLANES, s)))


def _seg_specs(seg, q_map, k_map, block_q, block_k):
    """Specs for the lane-replicated q ids and sublane-replicated kv ids."""
    if seg is None:
        return [None, None]
    return [pl.BlockSpec((None, block_q, LANES), lambda *a: q_map(*a)),
            pl.BlockSpec((None, SUBLANES, block_k), lambda *a: k_map(*a))]


def _compiler_params():
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _interp(interpret):
    return pltpu.InterpretParams() if interpret else False


def _when_listed(j, count, nfull, rule, step):
    """Run ``step(rule)`` if list step ``j`` is below the row's ``count``: without the
    rule while ``j`` is among the ``nfull`` leading full blocks."""
    if rule is None:
        pl.when(j < count)(lambda: step(None))
        return
    pl.when(j < nfull)(lambda: step(None))
    pl.when((j >= nfull) & (j < count))(lambda: step(rule))


def _prefetch(idx, cnt, nfull):
    """Flat scalar-prefetch operands: indices, counts, full counts (zeros if None)."""
    nfull = jnp.zeros_like(cnt) if nfull is None else nfull
    return idx.reshape(-1), cnt.reshape(-1), nfull.reshape(-1).astype(jnp.int32)


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(idx_ref, cnt_ref, full_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref,
                lse_ref, acc_sc, m_sc, l_sc, *, rule, scale, block_q, block_k, row):
    b, h, i, j = (pl.program_id(a) for a in range(4))
    n = pl.num_programs(3)
    r = row(b, h, i)

    @pl.when(j == 0)
    def _init():
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)
        m_sc[...] = jnp.full(m_sc.shape, NEG, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)

    def _step(rule):
        kv = idx_ref[r * n + j]
        q = q_ref[...]
        s = _dot(q, k_ref[...], trans_b=True) * scale  # [bq, bk]
        vis = _visibility(rule, i * block_q, kv * block_k, s.shape, qseg_ref, kseg_ref)
        if vis is not None:
            s = jnp.where(vis, s, NEG)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
        corr = jnp.exp(m_prev - m_new)
        p = jnp.exp(s - m_new)
        l_sc[...] = corr * l_sc[...] + jnp.sum(p, axis=-1, keepdims=True)
        v = v_ref[...]
        acc_sc[...] = corr * acc_sc[...] + _dot(p.astype(v.dtype), v)
        m_sc[...] = m_new

    _when_listed(j, cnt_ref[r], full_ref[r], rule, _step)

    @pl.when(j == n - 1)
    def _finish():
        ok = m_sc[...] > 0.5 * NEG  # [bq, 1]; rows still at NEG saw no key
        l = jnp.where(ok, l_sc[...], 1.0)
        o_ref[...] = jnp.where(ok, acc_sc[...] / l, 0.0).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(ok, m_sc[...] + jnp.log(l), BIG)


def _fwd_heads_major(q, k, v, seg, kv_idx, kv_cnt, kv_nfull, *, rule, scale, block_q, block_k,
                     interpret):
    b, h, sq, d = q.shape
    kvh = k.shape[1]
    g = h // kvh
    nb, nh, qb, n = kv_idx.shape
    row = _row(nb, nh, qb)
    q_map = lambda bb, hh, i, j, idx, *_: (bb, hh, i, 0)
    kv_map = lambda bb, hh, i, j, idx, *_: (bb, hh // g, idx[row(bb, hh, i) * n + j], 0)
    qseg, kseg = _seg_arrays(seg)
    seg_specs = _seg_specs(
        seg, lambda bb, hh, i, j, idx, *_: (bb, i, 0),
        lambda bb, hh, i, j, idx, *_: (bb, 0, idx[row(bb, hh, i) * n + j]), block_q, block_k)
    kernel = functools.partial(_fwd_kernel, rule=rule, scale=scale, block_q=block_q,
                               block_k=block_k, row=row)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(b, h, qb, n),
        in_specs=[pl.BlockSpec((None, None, block_q, d), q_map),
                  pl.BlockSpec((None, None, block_k, d), kv_map),
                  pl.BlockSpec((None, None, block_k, d), kv_map), *seg_specs],
        out_specs=[pl.BlockSpec((None, None, block_q, d), q_map),
                   pl.BlockSpec((None, None, block_q, 1), q_map)],
        scratch_shapes=[pltpu.VMEM((block_q, d), jnp.float32),
                        pltpu.VMEM((block_q, 1), jnp.float32),
                        pltpu.VMEM((block_q, 1), jnp.float32)],
    )
    return pl.pallas_call(
        kernel, grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, sq, 1), jnp.float32)],
        compiler_params=_compiler_params(), interpret=_interp(interpret), name="bsa_fwd_tpu",
    )(*_prefetch(kv_idx, kv_cnt, kv_nfull), q, k, v, qseg, kseg)


@functools.partial(jax.jit, static_argnames=("rule", "scale", "block_q", "block_k", "interpret"))
def fwd(q, k, v, seg, kv_idx, kv_cnt, kv_nfull=None, *, rule, scale, block_q, block_k,
        interpret=False):
    """o ``[b, sq, h, d]`` and lse ``[b, h, sq, 1]`` (float32, natural log).

    ``kv_nfull``: per list row, how many leading listed blocks are full (no rule
    needed); ``None`` applies the rule everywhere."""
    t = lambda x: jnp.swapaxes(x, 1, 2)
    o, lse = _fwd_heads_major(t(q), t(k), t(v), seg, kv_idx, kv_cnt, kv_nfull, rule=rule,
                              scale=scale, block_q=block_q, block_k=block_k,
                              interpret=interpret)
    return t(o), lse


# ----------------------------------------------------------------------------- backward


def _dq_kernel(idx_ref, cnt_ref, full_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref,
               lse_ref, delta_ref, dq_ref, dq_sc, *, rule, scale, block_q, block_k, row):
    b, h, i, j = (pl.program_id(a) for a in range(4))
    n = pl.num_programs(3)
    r = row(b, h, i)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    def _step(rule):
        kv = idx_ref[r * n + j]
        k = k_ref[...]
        s = _dot(q_ref[...], k, trans_b=True) * scale
        vis = _visibility(rule, i * block_q, kv * block_k, s.shape, qseg_ref, kseg_ref)
        if vis is not None:
            s = jnp.where(vis, s, NEG)
        p = jnp.exp(s - lse_ref[...])
        dp = _dot(do_ref[...], v_ref[...], trans_b=True)
        ds = p * (dp - delta_ref[...])
        dq_sc[...] += _dot(ds.astype(k.dtype), k)

    _when_listed(j, cnt_ref[r], full_ref[r], rule, _step)

    @pl.when(j == n - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(idx_ref, cnt_ref, full_ref, k_ref, v_ref, q_ref, qseg_ref, kseg_ref, do_ref,
                lse_ref, delta_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, rule, scale, block_q,
                block_k, row):
    b, h, c, j = (pl.program_id(a) for a in range(4))
    n = pl.num_programs(3)
    r = row(b, h, c)

    @pl.when(j == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def _step(rule):
        qi = idx_ref[r * n + j]
        q = q_ref[...]
        do = do_ref[...]
        s = _dot(q, k_ref[...], trans_b=True) * scale  # [bq, bk]
        vis = _visibility(rule, qi * block_q, c * block_k, s.shape, qseg_ref, kseg_ref)
        if vis is not None:
            s = jnp.where(vis, s, NEG)
        p = jnp.exp(s - lse_ref[...])
        dv_sc[...] += _dot(p.astype(do.dtype), do, trans_a=True)
        dp = _dot(do, v_ref[...], trans_b=True)
        ds = p * (dp - delta_ref[...])
        dk_sc[...] += _dot(ds.astype(q.dtype), q, trans_a=True)

    _when_listed(j, cnt_ref[r], full_ref[r], rule, _step)

    @pl.when(j == n - 1)
    def _finish():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


@functools.partial(jax.jit, static_argnames=("rule", "scale", "block_q", "block_k", "interpret"))
def bwd(q, k, v, seg, o, lse, do, kv_idx, kv_cnt, q_idx, q_cnt, kv_nfull=None, q_nfull=None, *,
        rule, scale, block_q, block_k, interpret=False):
    """(dq, dk, dv); dk/dv are computed per query head and summed over each GQA group."""
    t = lambda x: jnp.swapaxes(x, 1, 2)
    qt, kt, vt, dot_ = t(q), t(k), t(v), t(do)
    b, h, sq, d = qt.shape
    kvh, sk = kt.shape[1], kt.shape[2]
    g = h // kvh
    delta = jnp.einsum("bshd,bshd->bhs", o.astype(jnp.float32), do.astype(jnp.float32))[..., None]
    qseg, kseg = _seg_arrays(seg)
    kw = dict(rule=rule, scale=scale, block_q=block_q, block_k=block_k)
    cp, interp = _compiler_params(), _interp(interpret)

    nb, nh, qb, n = kv_idx.shape
    row = _row(nb, nh, qb)
    q_map = lambda bb, hh, i, j, idx, *_: (bb, hh, i, 0)
    kv_map = lambda bb, hh, i, j, idx, *_: (bb, hh // g, idx[row(bb, hh, i) * n + j], 0)
    seg_specs = _seg_specs(
        seg, lambda bb, hh, i, j, idx, *_: (bb, i, 0),
        lambda bb, hh, i, j, idx, *_: (bb, 0, idx[row(bb, hh, i) * n + j]), block_q, block_k)
    q_spec = pl.BlockSpec((None, None, block_q, d), q_map)
    vec_spec = pl.BlockSpec((None, None, block_q, 1), q_map)
    kv_spec = pl.BlockSpec((None, None, block_k, d), kv_map)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, row=row, **kw),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(b, h, qb, n),
            in_specs=[q_spec, kv_spec, kv_spec, *seg_specs, q_spec, vec_spec, vec_spec],
            out_specs=q_spec, scratch_shapes=[pltpu.VMEM((block_q, d), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(qt.shape, q.dtype),
        compiler_params=cp, interpret=interp, name="bsa_dq_tpu",
    )(*_prefetch(kv_idx, kv_cnt, kv_nfull), qt, kt, vt, qseg, kseg, dot_, lse, delta)

    nb, nh, kb, nc = q_idx.shape
    crow = _row(nb, nh, kb)
    k_map = lambda bb, hh, c, j, idx, *_: (bb, hh // g, c, 0)
    dkv_map = lambda bb, hh, c, j, idx, *_: (bb, hh, c, 0)
    qc_map = lambda bb, hh, c, j, idx, *_: (bb, hh, idx[crow(bb, hh, c) * nc + j], 0)
    seg_specs = _seg_specs(
        seg, lambda bb, hh, c, j, idx, *_: (bb, idx[crow(bb, hh, c) * nc + j], 0),
        lambda bb, hh, c, j, idx, *_: (bb, 0, c), block_q, block_k)
    k_spec = pl.BlockSpec((None, None, block_k, d), k_map)
    qc_spec = pl.BlockSpec((None, None, block_q, d), qc_map)
    vecc_spec = pl.BlockSpec((None, None, block_q, 1), qc_map)
    dkv_spec = pl.BlockSpec((None, None, block_k, d), dkv_map)
    out_dtype = jnp.float32 if g > 1 else k.dtype
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, row=crow, **kw),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(b, h, kb, nc),
            in_specs=[k_spec, k_spec, qc_spec, *seg_specs, qc_spec, vecc_spec, vecc_spec],
            out_specs=[dkv_spec, dkv_spec],
            scratch_shapes=[pltpu.VMEM((block_k, d), jnp.float32)] * 2),
        out_shape=[jax.ShapeDtypeStruct((b, h, sk, d), out_dtype)] * 2,
        compiler_params=cp, interpret=interp, name="bsa_dkv_tpu",
    )(*_prefetch(q_idx, q_cnt, q_nfull), kt, vt, qt, qseg, kseg, dot_, lse, delta)
    if g > 1:
        dk = dk.reshape(b, kvh, g, sk, d).sum(2).astype(k.dtype)
        dv = dv.reshape(b, kvh, g, sk, d).sum(2).astype(v.dtype)
    return t(dq), t(dk), t(dv)
