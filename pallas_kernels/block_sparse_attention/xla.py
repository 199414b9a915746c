"""Block-sparse attention in plain XLA: the CPU path (and a portable fallback).

Each query block gathers only its listed kv blocks, ``[b, h, q_blocks,
max_nnz, block_k, d]``, so compute and memory scale with the number of
nonzero blocks rather than with ``seq_k``. The backward scatters dk/dv back
with ``.at[].add``; padded list entries carry zero probability.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG = -1e30  # finite mask value for logits
BIG = 1e30  # lse stored for rows that see nothing: exp(s - BIG) == 0

_HI = jax.lax.Precision.HIGHEST


def _gathered(q, k, v, seg, kv_idx, kv_cnt, rule, block_q, block_k):
    """Per-entry k/v tiles and the visibility of every (row, key) pair in them."""
    b, sq, h, d = q.shape
    _, sk, kvh, _ = k.shape
    g = h // kvh
    qb, kb = sq // block_q, sk // block_k
    n = kv_idx.shape[-1]
    idx = jnp.broadcast_to(kv_idx, (b, h, qb, n))
    cnt = jnp.broadcast_to(kv_cnt, (b, h, qb))
    bi = jnp.arange(b)[:, None, None, None]
    hk = (jnp.arange(h) // g)[None, :, None, None]
    kbl = k.reshape(b, kb, block_k, kvh, d)
    vbl = v.reshape(b, kb, block_k, kvh, d)
    kg = kbl[bi, idx, :, hk, :].astype(jnp.float32)  # [b, h, qb, n, bk, d]
    vg = vbl[bi, idx, :, hk, :].astype(jnp.float32)
    valid = (jnp.arange(n) < cnt[..., None])[:, :, :, None, :, None]  # [b, h, qb, 1, n, 1]
    vis = jnp.broadcast_to(valid, (b, h, qb, block_q, n, block_k))
    q_pos = (jnp.arange(qb)[:, None] * block_q + jnp.arange(block_q))  # [qb, bq]
    k_pos = idx[..., None] * block_k + jnp.arange(block_k)  # [b, h, qb, n, bk]
    if rule is not None:
        vis = vis & rule(q_pos[None, None, :, :, None, None], k_pos[:, :, :, None, :, :])
    if seg is not None:
        q_seg = seg.reshape(b, qb, block_q)[:, None, :, :, None, None]
        k_seg = seg.reshape(b, kb, block_k)[bi, idx][:, :, :, None, :, :]
        vis = vis & (q_seg == k_seg)
    return idx, hk, bi, kg, vg, vis


def _logits(q, kg, scale, block_q):
    b, sq, h, d = q.shape
    qbl = q.reshape(b, sq // block_q, block_q, h, d).astype(jnp.float32)
    return jnp.einsum("biqhd,bhinkd->bhiqnk", qbl, kg, precision=_HI) * scale, qbl


def fwd(q, k, v, seg, kv_idx, kv_cnt, *, rule, scale, block_q, block_k):
    """Returns ``o: [b, sq, h, d]`` (q.dtype) and ``lse: [b, h, sq]`` (float32, natural log)."""
    b, sq, h, d = q.shape
    _, _, _, kg, vg, vis = _gathered(q, k, v, seg, kv_idx, kv_cnt, rule, block_q, block_k)
    s, _ = _logits(q, kg, scale, block_q)
    s = jnp.where(vis, s, NEG)
    m = jnp.max(s, axis=(-2, -1), keepdims=True)
    p = jnp.where(vis, jnp.exp(s - m), 0.0)
    l = jnp.sum(p, axis=(-2, -1))  # [b, h, qb, bq]
    acc = jnp.einsum("bhiqnk,bhinkd->biqhd", p, vg, precision=_HI)
    l_t = jnp.transpose(l, (0, 2, 3, 1))[..., None]  # [b, qb, bq, h, 1]
    o = jnp.where(l_t > 0, acc / jnp.where(l_t > 0, l_t, 1.0), 0.0)
    lse = jnp.where(l > 0, m[..., 0, 0] + jnp.log(jnp.where(l > 0, l, 1.0)), BIG)
    return o.reshape(b, sq, h, d).astype(q.dtype), lse.reshape(b, h, sq)


def bwd(q, k, v, seg, o, lse, do, kv_idx, kv_cnt, *, rule, scale, block_q, block_k):
    """Gradients (dq, dk, dv) in the input dtypes; dk/dv summed over each GQA group."""
    b, sq, h, d = q.shape
    _, sk, kvh, _ = k.shape
    qb, kb = sq // block_q, sk // block_k
    idx, hk, bi, kg, vg, vis = _gathered(q, k, v, seg, kv_idx, kv_cnt, rule, block_q, block_k)
    s, qbl = _logits(q, kg, scale, block_q)
    lse_b = lse.reshape(b, h, qb, block_q)[..., None, None]
    p = jnp.where(vis, jnp.exp(jnp.where(vis, s, NEG) - lse_b), 0.0)
    dobl = do.reshape(b, qb, block_q, h, d).astype(jnp.float32)
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [b, sq, h]
    delta = jnp.transpose(delta.reshape(b, qb, block_q, h), (0, 3, 1, 2))[..., None, None]
    dv_c = jnp.einsum("bhiqnk,biqhd->bhinkd", p, dobl, precision=_HI)
    dp = jnp.einsum("biqhd,bhinkd->bhiqnk", dobl, vg, precision=_HI)
    ds = p * (dp - delta) * scale
    dq = jnp.einsum("bhiqnk,bhinkd->biqhd", ds, kg, precision=_HI)
    dk_c = jnp.einsum("bhiqnk,biqhd->bhinkd", ds, qbl, precision=_HI)
    zeros = jnp.zeros((b, kb, block_k, kvh, d), jnp.float32)
    dk = zeros.at[bi, idx, :, hk, :].add(dk_c)
    dv = zeros.at[bi, idx, :, hk, :].add(dv_c)
    return (dq.reshape(q.shape).astype(q.dtype), dk.reshape(k.shape).astype(k.dtype),
            dv.reshape(v.shape).astype(v.dtype))
