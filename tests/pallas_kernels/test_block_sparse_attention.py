"""Masks, compression, validation and the top-k gate of block-sparse attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.block_sparse_attention import masks as masks_lib
from pallas_kernels.block_sparse_attention import kinds, ops, reference, topk


def _token_layout(mask, seq, bq, bk, reduce="any"):
    """Layout from the dense token rule, evaluated naively: tiles with any visible pair,
    or with all pairs visible (``reduce="all"``)."""
    pos = np.arange(seq)
    vis = np.broadcast_to(np.asarray(mask.token_mask(pos[:, None], pos[None, :]), bool),
                          (seq, seq))
    return getattr(vis.reshape(seq // bq, bq, seq // bk, bk), reduce)(axis=(1, 3))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.sampled_from(["causal", "sliding_window", "global_local", "strided", "chunked"]),
       st.sampled_from([8, 16]), st.sampled_from([8, 16, 32]), st.integers(1, 40))
def test_static_layouts_match_token_rule(kind, bq, bk, param):
    kwargs = {"causal": {}, "sliding_window": {"window": param},
              "global_local": {"window": param, "num_global": param % 5},
              "strided": {"stride": param % 7 + 1, "local_window": param},
              "chunked": {"chunk_size": param}}[kind]
    mask = kinds.make_mask(kind, seq_len=64, block_size=8, **kwargs)
    layout = mask.block_layout(64, 64, bq, bk)
    assert layout.shape == (1, 64 // bq, 64 // bk)
    np.testing.assert_array_equal(layout[0], _token_layout(mask, 64, bq, bk))
    full = mask.full_layout(64, 64, bq, bk)
    assert full.shape == layout.shape
    np.testing.assert_array_equal(full[0], _token_layout(mask, 64, bq, bk, "all"))


def test_full_first_reorders_lists_and_counts_full_blocks():
    rng = np.random.default_rng(1)
    layout = rng.random((2, 6, 9)) < 0.5
    layout[1, 3] = False  # an empty row
    full = rng.random((6, 9)) < 0.5
    idx, cnt = masks_lib.compress(layout)
    new_idx, nfull = masks_lib.full_first(idx, cnt, full)
    np.testing.assert_array_equal(nfull, (layout & full).sum(-1))
    for h, r in np.ndindex(cnt.shape):
        listed, n, c = new_idx[h, r], nfull[h, r], cnt[h, r]
        assert sorted(listed[:c]) == sorted(idx[h, r, :c])  # same blocks, reordered
        assert full[r, listed[:n]].all() and not full[r, listed[n:c]].any()
        assert np.all(np.diff(listed[:n]) > 0) and np.all(np.diff(listed[n:c]) > 0)
        np.testing.assert_array_equal(listed[c:], idx[h, r, c:])  # padding kept
    d_idx, d_nfull = masks_lib.full_first(jnp.asarray(idx), jnp.asarray(cnt), full)
    np.testing.assert_array_equal(d_idx, new_idx)
    np.testing.assert_array_equal(d_nfull, nfull)


def test_compress_round_trip_and_transpose():
    rng = np.random.default_rng(0)
    layout = rng.random((2, 5, 7)) < 0.4
    layout[0, 2] = False
    idx, cnt = masks_lib.compress(layout)
    assert idx.dtype == cnt.dtype == np.int32
    np.testing.assert_array_equal(cnt, layout.sum(-1))
    rebuilt = np.zeros_like(layout)
    for h, r in np.ndindex(cnt.shape):
        cols = idx[h, r, :cnt[h, r]]
        assert np.all(np.diff(cols) > 0)
        rebuilt[h, r, cols] = True
    np.testing.assert_array_equal(rebuilt, layout)
    assert np.all(idx[0, 2] == 0)  # empty row padded with 0
    d_idx, d_cnt = masks_lib.compress_dynamic(jnp.asarray(layout), idx.shape[-1])
    np.testing.assert_array_equal(d_idx, idx)
    np.testing.assert_array_equal(d_cnt, cnt)
    t_idx, t_cnt = masks_lib.compress(np.swapaxes(layout, -1, -2))
    np.testing.assert_array_equal(t_cnt, layout.sum(-2))


def test_empty_rows_are_zero_without_nan():
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 32, 2, 16))
    layout = np.zeros((1, 2, 2), bool)
    layout[0, 1, 0] = True  # query block 0 sees nothing
    mask = masks_lib.BlockLayoutMask(layout)
    for backend in ("xla",):
        f = lambda q: ops.block_sparse_attention(q, q, q, mask, backend=backend)
        out = f(q)
        assert np.all(np.asarray(out[:, :16]) == 0.0)
        g = jax.grad(lambda q: f(q).sum())(q)
        assert np.all(np.isfinite(g))
    ref = reference.reference_attention(q, q, q, mask, block_q=16, block_k=16)
    assert np.all(np.asarray(ref[:, :16]) == 0.0)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_reference_matches_dot_product_attention():
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    q = jax.random.normal(keys[0], (2, 32, 4, 16))
    k, v = (jax.random.normal(kk, (2, 32, 2, 16)) for kk in keys[1:])
    ours = reference.reference_attention(q, k, v, masks_lib.CausalMask(), block_q=16, block_k=8)
    theirs = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(q_shape=(1, 30, 2, 16), block_q=16), "block_q"),
    (dict(k_shape=(1, 32, 3, 16)), "kv heads"),
    (dict(dtype_k=jnp.bfloat16), "dtypes"),
    (dict(k_shape=(1, 32, 2, 8)), "head_dim"),
    (dict(layout=np.ones((1, 3, 2), bool)), "BlockLayoutMask"),
    (dict(layout=np.ones((3, 2, 2), bool)), "block layout shape"),
    (dict(segment_ids=np.zeros((1, 31), np.int32)), "segment_ids"),
    (dict(backend="cuda"), "backend"),
    (dict(q_shape=(1, 24, 2, 16), block_q=8, backend="gpu"), "power of two"),
])
def test_bad_input_raises_value_error(kwargs, match):
    q = jnp.zeros(kwargs.get("q_shape", (1, 32, 2, 16)))
    k = jnp.zeros(kwargs.get("k_shape", (1, 32, 2, 16)), kwargs.get("dtype_k", jnp.float32))
    mask = masks_lib.CausalMask()
    if "layout" in kwargs:
        mask = masks_lib.BlockLayoutMask(kwargs["layout"])
    with pytest.raises(ValueError, match=match):
        ops.block_sparse_attention(q, k, k, mask, segment_ids=kwargs.get("segment_ids"),
                                   block_q=kwargs.get("block_q"), block_k=None,
                                   backend=kwargs.get("backend", "xla"))


def test_make_mask_rejects_unknown():
    with pytest.raises(ValueError, match="kind"):
        kinds.make_mask("nope")
    with pytest.raises(ValueError, match="unknown arguments"):
        kinds.make_mask("sliding_window", widow=3)
    with pytest.raises(ValueError, match="window"):
        kinds.make_mask("sliding_window", window=0)
    assert isinstance(kinds.make_mask("top_k", top_k=2), topk.TopKBlockMask)


def test_topk_layout_keeps_k_plus_diagonal_within_causal():
    keys = jax.random.split(jax.random.PRNGKey(2), 3)
    q = jax.random.normal(keys[0], (2, 64, 2, 16))
    k = jax.random.normal(keys[1], (2, 64, 1, 16))
    params = topk.init_gate_params(keys[2], 2, 1, 16, gate_dim=8)
    mask = topk.TopKBlockMask(top_k=2, causal=True, gate_params=params)
    layout = np.asarray(mask.block_layout_dynamic(q, k, 16, 16))
    assert layout.shape == (2, 2, 4, 4)
    assert not np.any(np.triu(np.ones((4, 4), bool), 1) & layout)  # causal
    assert np.all(np.diagonal(layout, axis1=-2, axis2=-1))  # diagonal kept
    counts, allowed = layout.sum(-1), np.arange(4) + 1  # causal: row i may see i + 1 blocks
    assert np.all(counts >= np.minimum(allowed, 2)) and np.all(counts <= np.minimum(allowed, 3))


def test_topk_distillation_loss_trains_gate():
    """The KL loss is >= 0, has gradient only for the gate, and SGD on it decreases it."""
    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    q = jax.random.normal(keys[0], (1, 64, 2, 16))
    k = jax.random.normal(keys[1], (1, 64, 2, 16))
    params = topk.init_gate_params(keys[2], 2, 2, 16, gate_dim=8)
    base = topk.TopKBlockMask(top_k=1, causal=True)

    @jax.jit
    def loss(p):
        return topk.topk_gate_distillation_loss(q, k, base.with_params(p), block_q=16, block_k=16)

    l0, g = jax.value_and_grad(loss)(params)
    assert float(l0) >= 0.0
    assert float(jnp.abs(g["wq"]).sum()) > 0
    p = params
    for _ in range(30):
        p = jax.tree.map(lambda w, gw: w - 5.0 * gw, p, jax.grad(loss)(p))
    assert float(loss(p)) < 0.5 * float(l0)
