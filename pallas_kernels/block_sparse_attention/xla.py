"""Block-sparse attention in plain XLA: the CPU path (and a portable fallback).

Each query block gathers only its listed kv blocks into one flat key axis,
``[b, h, rows, max_nnz * block_k, d]``, so compute and memory scale with the number of
listed blocks rather than with ``seq_k``. Query blocks are grouped into a few buckets of
similar list length (:func:`plan_rows`), each padded only to its own longest list, so a
causal mask costs about half of dense rather than all of it. The backward scatters dk/dv
back with ``.at[].add``; padded list entries carry zero probability.
"""
from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp

NEG = -1e30  # finite mask value for logits
BIG = 1e30  # lse stored for rows that see nothing: exp(s - BIG) == 0

_F32 = jnp.float32
_HI = jax.lax.Precision.HIGHEST  # full float32 matmuls also where this runs off CPU
MAX_BUCKETS = 4
SLACK = 1.1  # stop adding buckets once padded work is within 10% of the listed work


def plan_rows(counts: np.ndarray, max_buckets: int = MAX_BUCKETS, exact: bool = True) -> tuple:
    """Group query blocks by list length: ``((rows, n, full), ...)``.

    ``counts`` ``[..., q_blocks]`` are the static list lengths (any leading batch / head
    dims). Each bucket holds the query blocks ``rows`` (a tuple), padded to ``n`` list
    entries; ``full`` says every row of it lists exactly ``n`` blocks in every batch and
    head (no padding to mask). Buckets are contiguous runs of the rows sorted by length,
    chosen to minimise padded work; the fewest buckets whose work is within ``SLACK`` of
    the listed work are used. ``exact=False``: ``counts`` are upper bounds (a dynamic
    layout's), so no bucket is ``full``.
    """
    counts = np.asarray(counts).reshape(-1, np.shape(counts)[-1])
    per_row = counts.max(axis=0)
    order = np.argsort(per_row, kind="stable")
    lens = per_row[order]
    qb = len(lens)
    listed = max(int(lens.sum()), 1)
    # best[k][i]: least padded work covering the i shortest rows with k buckets; cut: where
    # the last of those buckets starts.
    best = np.full((max_buckets + 1, qb + 1), np.inf)
    cut = np.zeros((max_buckets + 1, qb + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for k in range(1, max_buckets + 1):
        for i in range(1, qb + 1):
            starts = np.arange(i)
            costs = best[k - 1, starts] + (i - starts) * int(lens[i - 1])
            j = int(np.argmin(costs))
            best[k, i], cut[k, i] = costs[j], j
    k = next((k for k in range(1, max_buckets + 1) if best[k, qb] <= SLACK * listed),
             int(np.argmin(best[1:, qb])) + 1)
    buckets, end = [], qb
    while end > 0:
        start = int(cut[k, end])
        if start < end:
            rows = np.sort(order[start:end])
            n = max(int(lens[end - 1]), 1)
            full = exact and bool(np.all(counts[:, rows] == n))
            buckets.append((tuple(int(r) for r in rows), n, full))
        end, k = start, k - 1
    return tuple(reversed(buckets))


def _one_bucket(kv_idx) -> tuple:
    return ((tuple(range(kv_idx.shape[-2])), kv_idx.shape[-1], False),)


def _heads_first(x, blocks, block):
    """``[b, s, heads, d]`` -> ``[b, heads, s // block, block, d]``."""
    b, _, h, d = x.shape
    return jnp.transpose(x.reshape(b, blocks, block, h, d), (0, 3, 1, 2, 4))


class _Bucket:
    """One bucket's gathered operands and the visibility of its (row, key) pairs."""

    def __init__(self, q_t, k_t, v_t, seg, kv_idx, kv_cnt, rows, n, full, rule, block_q,
                 block_k):
        b, h, _, _, d = q_t.shape
        r = np.asarray(rows)
        idx = kv_idx[..., r, :n]  # [b or 1, h or 1, R, n]
        self.rows, self.idx = r, idx
        m = n * block_k
        self.q = q_t[:, :, r].astype(_F32)  # [b, h, R, bq, d]
        self.k = self.gather(k_t).reshape(b, h, len(r), m, d).astype(_F32)
        self.v = self.gather(v_t).reshape(b, h, len(r), m, d).astype(_F32)
        vis = None
        if not full:
            valid = jnp.arange(n) < kv_cnt[..., r, None]  # [b?, h?, R, n]
            vis = jnp.repeat(valid, block_k, axis=-1)[..., None, :]  # [b?, h?, R, 1, m]
        if rule is not None or seg is not None:
            k_pos = (idx[..., None] * block_k + jnp.arange(block_k)).reshape(
                *idx.shape[:-1], 1, m)
        if rule is not None:
            q_pos = (r[:, None] * block_q + np.arange(block_q))[..., None]  # [R, bq, 1]
            vis = _and(vis, rule(q_pos, k_pos))
        if seg is not None:
            q_seg = seg.reshape(b, -1, block_q)[:, r][:, None, :, :, None]  # [b, 1, R, bq, 1]
            k_seg = seg[jnp.arange(b).reshape(b, 1, 1, 1, 1), k_pos]  # [b, h?, R, 1, m]
            vis = _and(vis, q_seg == k_seg)
        self.vis = vis

    def _listed(self, x):
        """Index of the bucket's listed tiles in ``x`` ``[b, h, kv_blocks, ...]``."""
        if self.idx.shape[:2] == (1, 1):  # one list for every batch and head
            return slice(None), slice(None), self.idx[0, 0]
        b, h = x.shape[:2]
        return jnp.arange(b)[:, None, None, None], jnp.arange(h)[None, :, None, None], self.idx

    def gather(self, x_t):
        """``[b, h, kv_blocks, bk, d]`` -> this bucket's ``[b, h, R, n, bk, d]``."""
        return x_t[self._listed(x_t)]

    def scatter_add(self, acc, contrib):
        """Adds ``contrib`` ``[b, h, R, n, bk, d]`` into ``acc`` ``[b, h, kv_blocks, bk, d]``
        at the bucket's listed tiles."""
        return acc.at[self._listed(acc)].add(contrib)

    def masked(self, x, fill):
        return x if self.vis is None else jnp.where(self.vis, x, fill)

    def logits(self, scale):
        return _dot("bhiqd,bhimd->bhiqm", self.q, self.k) * scale  # [b, h, R, bq, m]


def _dot(spec, a, b):
    return jnp.einsum(spec, a, b, precision=_HI)


def _and(a, b):
    return b if a is None else a & b


def _buckets(q, k, v, seg, kv_idx, kv_cnt, rows, rule, block_q, block_k):
    b, sq, h, d = q.shape
    g = h // k.shape[2]
    q_t = _heads_first(q, sq // block_q, block_q)
    k_t, v_t = (jnp.repeat(_heads_first(x, x.shape[1] // block_k, block_k), g, axis=1)
                for x in (k, v))
    for r, n, full in rows or _one_bucket(kv_idx):
        yield _Bucket(q_t, k_t, v_t, seg, kv_idx, kv_cnt, r, n, full, rule, block_q, block_k)


def _unbucket(parts, rows_list, blocks):
    """Per-bucket ``[b, h, R, ...]`` -> ``[b, h, blocks, ...]`` in query-block order."""
    order = np.concatenate(rows_list)
    if len(order) != blocks:
        raise AssertionError(f"row buckets cover {len(order)} of {blocks} query blocks")
    out = jnp.concatenate(parts, axis=2) if len(parts) > 1 else parts[0]
    if np.array_equal(order, np.arange(blocks)):
        return out
    return jnp.take(out, np.argsort(order), axis=2)


def _tokens_last(x, dtype):
    """``[b, h, blocks, block, d]`` -> ``[b, blocks * block, h, d]``."""
    b, h, nb, blk, d = x.shape
    return jnp.transpose(x, (0, 2, 3, 1, 4)).reshape(b, nb * blk, h, d).astype(dtype)


def fwd(q, k, v, seg, kv_idx, kv_cnt, *, rule, scale, block_q, block_k, rows=None):
    """Returns ``o: [b, sq, h, d]`` (q.dtype) and ``lse: [b, h, sq]`` (float32, natural log).

    ``rows``: the bucket plan from :func:`plan_rows` (default: one bucket of all rows)."""
    b, sq, h, d = q.shape
    outs, lses, rows_list = [], [], []
    for bk in _buckets(q, k, v, seg, kv_idx, kv_cnt, rows, rule, block_q, block_k):
        s = bk.masked(bk.logits(scale), NEG)
        m = jnp.max(s, axis=-1, keepdims=True)
        p = bk.masked(jnp.exp(s - m), 0.0)
        l = jnp.sum(p, axis=-1, keepdims=True)  # [b, h, R, bq, 1]
        acc = _dot("bhiqm,bhimd->bhiqd", p, bk.v)
        seen = l > 0
        outs.append(jnp.where(seen, acc / jnp.where(seen, l, 1.0), 0.0))
        lses.append(jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), BIG)[..., 0])
        rows_list.append(bk.rows)
    qb = sq // block_q
    o = _tokens_last(_unbucket(outs, rows_list, qb), q.dtype)
    lse = _unbucket(lses, rows_list, qb).reshape(b, h, sq)
    return o, lse


def bwd(q, k, v, seg, o, lse, do, kv_idx, kv_cnt, *, rule, scale, block_q, block_k, rows=None):
    """Gradients (dq, dk, dv) in the input dtypes; dk/dv summed over each GQA group."""
    b, sq, h, d = q.shape
    _, sk, kvh, _ = k.shape
    qb, kb = sq // block_q, sk // block_k
    lse_t = lse.reshape(b, h, qb, block_q, 1)
    do_t = _heads_first(do, qb, block_q).astype(_F32)
    delta = jnp.sum(o.astype(_F32) * do.astype(_F32), axis=-1)  # [b, sq, h]
    delta_t = jnp.transpose(delta, (0, 2, 1)).reshape(b, h, qb, block_q, 1)
    dk = jnp.zeros((b, h, kb, block_k, d), _F32)
    dv = jnp.zeros((b, h, kb, block_k, d), _F32)
    dqs, rows_list = [], []
    for bk in _buckets(q, k, v, seg, kv_idx, kv_cnt, rows, rule, block_q, block_k):
        r = bk.rows
        p = bk.masked(jnp.exp(bk.masked(bk.logits(scale), NEG) - lse_t[:, :, r]), 0.0)
        do_r = do_t[:, :, r]
        dp = _dot("bhiqd,bhimd->bhiqm", do_r, bk.v)
        ds = p * (dp - delta_t[:, :, r]) * scale
        dqs.append(_dot("bhiqm,bhimd->bhiqd", ds, bk.k))
        rows_list.append(r)
        n = bk.idx.shape[-1]
        dk_c = _dot("bhiqm,bhiqd->bhimd", ds, bk.q).reshape(b, h, len(r), n, block_k, d)
        dv_c = _dot("bhiqm,bhiqd->bhimd", p, do_r).reshape(b, h, len(r), n, block_k, d)
        dk, dv = bk.scatter_add(dk, dk_c), bk.scatter_add(dv, dv_c)
    dq = _tokens_last(_unbucket(dqs, rows_list, qb), q.dtype)
    g = h // kvh
    dk, dv = (x.reshape(b, kvh, g, kb, block_k, d).sum(axis=2) for x in (dk, dv))
    return dq, _tokens_last(dk, k.dtype), _tokens_last(dv, v.dtype)

