"""Dynamic prefill masks (MInference, FlexPrefill, XAttention): each layout equals a NumPy
reference of the method's scoring rule written from the papers' definitions (loops over
heads, rows, diagonals and sorted blocks) on random inputs; the op's output over the layout
equals dense attention restricted to it; `max_blocks` caps every row; bad settings are one
line."""
import math

import jax
import numpy as np
import pytest

from pallas_kernels.block_sparse_attention import block_sparse_attention, make_mask
from pallas_kernels.block_sparse_attention import minference, vertical_slash

B, S, H, KVH, D = 16, 128, 4, 2, 8
QB = S // B


def inputs(seed, batch=2):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, S, H, D)).astype(np.float32) * 2.0
    k = rng.standard_normal((batch, S, KVH, D)).astype(np.float32) * 2.0
    v = rng.standard_normal((batch, S, KVH, D)).astype(np.float32)
    return q, k, v


def kv_head(h):
    return h // (H // KVH)


def softmax(x):
    x = x - np.max(x, -1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def mandatory(sink, local):
    out = np.zeros((QB, QB), bool)
    for r in range(QB):
        for c in range(r + 1):
            out[r, c] = c < sink or r - c < local
    return out


def ref_xattention(q, k, threshold, stride, sink=1, local=1):
    b = q.shape[0]
    n = S // stride
    out = np.zeros((b, H, QB, QB), bool)
    for bi in range(b):
        for h in range(H):
            logits = q[bi, :, h] @ k[bi, :, kv_head(h)].T / math.sqrt(D)
            anti = np.zeros((n, n))
            for i in range(n):
                for j in range(n):
                    anti[i, j] = sum(logits[i * stride + stride - 1 - s, j * stride + s]
                                     for s in range(stride)) / stride
            anti = np.where(np.tril(np.ones((n, n), bool)), anti, -np.inf)
            p = softmax(anti)
            m = B // stride
            mass = p.reshape(QB, m, QB, m).sum((1, 3))
            keep = mandatory(sink, local)
            for r in range(QB):
                total = mass[r, :r + 1].sum()
                kept = mass[r, keep[r]].sum()
                row = keep[r].copy()
                for c in sorted((c for c in range(r + 1) if not keep[r, c]),
                                key=lambda c: -mass[r, c]):
                    if kept < threshold * total:
                        row[c] = True
                    kept += mass[r, c]
                out[bi, h, r] = row
    return out


def ref_last_attention(q, k, bi, h, n):
    """The last n queries' causal attention [n, S], its column sums and its sums along each
    offset q - k."""
    pos = np.arange(S - n, S)
    logits = q[bi, S - n:, h] @ k[bi, :, kv_head(h)].T / math.sqrt(D)
    a = softmax(np.where(np.arange(S)[None] <= pos[:, None], logits, -np.inf))
    slash = np.zeros(S)
    for i in range(n):
        for j in range(pos[i] + 1):
            slash[pos[i] - j] += a[i, j]
    return a, a.sum(0), slash


def ref_flexprefill(q, k, gamma, tau, min_budget=1, sink=1, local=1):
    b = q.shape[0]
    out = np.zeros((b, H, QB, QB), bool)
    for bi in range(b):
        for h in range(H):
            _, vertical, slash = ref_last_attention(q, k, bi, h, B)
            vertical, slash = vertical / B, slash / B

            def blocks_for(x):
                cum = np.cumsum(np.sort(x)[::-1])
                return min(max((int((cum <= gamma).sum()) + 1) // B + 1, min_budget), QB)
            vb, sb = vertical.reshape(QB, B).sum(1), slash.reshape(QB, B).sum(1)
            kp = k[bi, :, kv_head(h)].reshape(QB, B, D).mean(1)
            qs = q[bi, :, h] / math.sqrt(D)
            est = softmax(qs[S - B:].mean(0) @ kp.T)
            mid = (est + vb) / 2
            jsd = math.sqrt(0.5 * np.sum(est * np.log(est / mid))
                            + 0.5 * np.sum(vb * np.log(vb / mid)))
            aware = jsd < tau
            nv = min_budget if aware else blocks_for(vertical)
            ns = min_budget if aware else blocks_for(slash)
            vkey, skey = vb.copy(), sb.copy()
            vkey[0] = skey[0] = np.inf
            cols = np.argsort(-vkey, kind="stable")[:nv]
            dists = np.argsort(-skey, kind="stable")[:ns]
            lay = mandatory(sink, local)
            for r in range(QB):
                for c in range(r + 1):
                    lay[r, c] |= c in cols or (r - c) in dists
            if aware:
                pooled = np.full((QB, QB), 0.0)
                qp = qs.reshape(QB, B, D).mean(1)
                for r in range(QB):
                    pooled[r, :r + 1] = softmax(qp[r] @ kp[:r + 1].T)
                flat = pooled.ravel()
                order = np.argsort(-flat, kind="stable")
                covered = np.cumsum(flat[order]) <= gamma * QB
                extra = np.zeros(QB * QB, bool)
                extra[order[covered]] = True
                lay |= extra.reshape(QB, QB) & np.tril(np.ones((QB, QB), bool))
            out[bi, h] = lay
    return out


def ref_minference_vs(q, k, vertical_size, slash_size, keep_global, keep_local, last_q=32,
                      sink=1, local=1):
    b = q.shape[0]
    out = np.zeros((b, H, QB, QB), bool)
    for bi in range(b):
        for h in range(H):
            _, vertical, slash = ref_last_attention(q, k, bi, h, last_q)
            vertical[:keep_global] = np.inf
            slash[:keep_local] = np.inf
            cols = set(np.argsort(-vertical, kind="stable")[:max(vertical_size, keep_global)])
            offs = set(np.argsort(-slash, kind="stable")[:max(slash_size, keep_local)])
            lay = mandatory(sink, local)
            for i in range(S):  # a tile is kept when it holds a kept token pair
                for j in range(i + 1):
                    if j in cols or (i - j) in offs:
                        lay[i // B, j // B] = True
            out[bi, h] = lay
    return out


def layout(mask, q, k):
    return np.asarray(jax.jit(lambda a, b: mask.block_layout_dynamic(a, b, B, B))(q, k))


@pytest.mark.parametrize("threshold,stride,seed", [(0.6, 4, 0), (0.9, 8, 1), (0.3, 2, 2)])
def test_xattention_layout_equals_numpy_reference(threshold, stride, seed):
    q, k, _ = inputs(seed)
    got = layout(make_mask(kind="xattention", threshold=threshold, stride=stride), q, k)
    want = ref_xattention(q, k, threshold, stride)
    np.testing.assert_array_equal(got, want)
    assert 0 < got.sum() < np.tril(np.ones((QB, QB))).sum() * 2 * H  # neither empty nor dense


@pytest.mark.parametrize("gamma,tau,seed", [(0.5, 0.0, 0), (0.9, 1.0, 1), (0.7, 0.3, 2)])
def test_flexprefill_layout_equals_numpy_reference(gamma, tau, seed):
    q, k, _ = inputs(seed)
    got = layout(make_mask(kind="flexprefill", gamma=gamma, tau=tau), q, k)
    np.testing.assert_array_equal(got, ref_flexprefill(q, k, gamma, tau))


@pytest.mark.parametrize("sizes,seed", [((8, 16, 4, 8), 0), ((20, 4, 2, 3), 1)])
def test_minference_vertical_slash_equals_token_pattern_cover(sizes, seed):
    q, k, _ = inputs(seed)
    v, s, g, loc = sizes
    mask = make_mask(kind="minference", vertical_size=v, slash_size=s, keep_global=g,
                     keep_local=loc, last_q=32)
    np.testing.assert_array_equal(layout(mask, q, k),
                                  ref_minference_vs(q, k, v, s, g, loc))


def test_minference_per_head_patterns():
    q, k, _ = inputs(3)
    mask = make_mask(kind="minference", pattern=("a_shape", "block_sparse", "a_shape",
                                                 "vertical_slash"), top_k=2, a_shape_blocks=2,
                     vertical_size=8, slash_size=8, keep_global=4, keep_local=4, last_q=32)
    got = layout(mask, q, k)
    np.testing.assert_array_equal(got[:, 0], np.broadcast_to(mandatory(1, 2), (2, QB, QB)))
    np.testing.assert_array_equal(got[:, 2], got[:, 0])
    np.testing.assert_array_equal(got[:, 3], ref_minference_vs(q, k, 8, 8, 4, 4)[:, 3])
    for bi in range(2):  # block_sparse: the top-2 causal blocks by pooled scores + mandatory
        qp = q[bi, :, 1].reshape(QB, B, D).mean(1)
        kp = k[bi, :, kv_head(1)].reshape(QB, B, D).mean(1)
        want = mandatory(1, 1)
        for r in range(QB):
            sc = qp[r] @ kp[:r + 1].T
            want[r, np.argsort(-sc, kind="stable")[:2]] = True
        np.testing.assert_array_equal(got[bi, 1], want)


@pytest.mark.parametrize("spec", [dict(kind="xattention", threshold=0.95, stride=4),
                                  dict(kind="flexprefill", gamma=0.95, tau=0.2),
                                  dict(kind="minference", vertical_size=32, slash_size=32)])
def test_op_over_the_layout_equals_masked_dense_attention(spec):
    q, k, v = inputs(4)
    mask = make_mask(max_blocks=4, **spec)
    lay = layout(mask, q, k)
    assert lay.sum(-1).max() <= 4 and (lay.sum(-1) >= np.minimum(np.arange(QB) + 1, 2)).all()
    out = jax.jit(lambda a, b, c: block_sparse_attention(a, b, c, mask, block_q=B,
                                                         block_k=B))(q, k, v)
    tok = np.repeat(np.repeat(lay, B, 2), B, 3) & np.tril(np.ones((S, S), bool))
    ke, ve = (np.repeat(x, H // KVH, 2) for x in (k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, ke) / math.sqrt(D)
    ref = np.einsum("bhqk,bkhd->bqhd", softmax(np.where(tok, logits, -np.inf)), ve)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", [dict(kind="xattention", threshold=1.0, stride=4),
                                  dict(kind="flexprefill", min_budget=QB),
                                  dict(kind="minference", vertical_size=S, slash_size=S)])
def test_full_budget_is_dense_causal_attention(spec):
    q, k, v = inputs(5)
    mask = make_mask(**spec)
    np.testing.assert_array_equal(layout(mask, q, k),
                                  np.broadcast_to(np.tril(np.ones((QB, QB), bool)),
                                                  (2, H, QB, QB)))
    out = jax.jit(lambda a, b, c: block_sparse_attention(a, b, c, mask, block_q=B,
                                                         block_k=B))(q, k, v)
    dense = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(dense), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("spec,needle", [
    (dict(kind="xattention", threshold=0.0), "threshold=0.0"),
    (dict(kind="xattention", threshold=1.5), "threshold=1.5"),
    (dict(kind="xattention", stride=0), "stride=0"),
    (dict(kind="flexprefill", gamma=0), "gamma=0"),
    (dict(kind="flexprefill", tau=2.0), "tau=2.0"),
    (dict(kind="flexprefill", min_budget=4, max_budget=2), "max_budget=2"),
    (dict(kind="minference", pattern="diagonal"), "pattern 'diagonal'"),
    (dict(kind="minference", vertical_size=0), "vertical_size=0"),
    (dict(kind="minference", max_blocks=1, local_blocks=2), "max_blocks=1"),
])
def test_bad_settings_are_one_line(spec, needle):
    with pytest.raises(ValueError) as e:
        make_mask(**spec)
    assert needle in str(e.value).splitlines()[0]  # (gin adds its call chain below)


def test_stride_must_divide_the_block():
    q, k, _ = inputs(0)
    with pytest.raises(ValueError, match="stride=3 must divide the block size 16"):
        make_mask(kind="xattention", stride=3).block_layout_dynamic(q, k, B, B)


@pytest.mark.parametrize("chunk", [32, 128])
def test_token_vertical_slash_equals_dense_attention_on_the_token_pattern(chunk):
    q, k, v = inputs(6)
    mask = make_mask(kind="minference", vertical_size=12, slash_size=20, keep_global=4,
                     keep_local=6, last_q=32)
    cols, offs, _, _ = minference.vertical_slash_indices(q, k, S, mask)
    out = jax.jit(lambda a, b, c: vertical_slash.vertical_slash_attention(
        a, b, c, cols, offs, chunk=chunk))(q, k, v)
    i, j = np.arange(S)[:, None], np.arange(S)[None, :]
    want = np.zeros_like(q)
    for bi in range(2):
        for h in range(H):
            c, o = set(np.asarray(cols[bi, h])), set(np.asarray(offs[bi, h]))
            assert len(c) == 12 and len(o) == 20  # distinct
            vis = (j <= i) & (np.isin(j, list(c)) | np.isin(i - j, list(o)))
            logits = q[bi, :, h] @ k[bi, :, kv_head(h)].T / math.sqrt(D)
            want[bi, :, h] = softmax(np.where(vis, logits, -np.inf)) @ v[bi, :, kv_head(h)]
    np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=1e-5)
