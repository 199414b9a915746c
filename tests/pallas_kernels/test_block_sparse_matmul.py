"""Block-sparse weight matmul: the XLA path against the reference (values and gradients),
the transposed layout, and the refusals of ops.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse_matmul import block_sparse_matmul, check_indices
from pallas_kernels.block_sparse_matmul.metadata import transpose_layout
from pallas_kernels.block_sparse_matmul.reference import block_sparse_matmul_reference, to_dense

# float32: the XLA path sums the same products in another order than the reference's dense
# matmul at HIGHEST precision: relative Frobenius error ~1e-7 seen. bfloat16 operands with
# float32 accumulation: ~3e-3 seen.
RTOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}

CASES = [
    # tokens, in_blocks, out_blocks, k, block_in, block_out
    (24, 5, 3, 2, 8, 16),
    (7, 4, 6, 1, 16, 16),   # input blocks read by no output block
    (33, 3, 8, 3, 16, 8),   # k = in_blocks: dense
    (16, 8, 2, 4, 32, 64),
    (64, 4, 4, 2, 64, 32),
    (40, 6, 3, 5, 8, 8),    # k above xla.SLOT_SUM_MAX_K: one product over all slots
]


def relerr(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def layout(seed, ib, ob, k):
    rng = np.random.default_rng(seed)
    return jnp.asarray(np.stack([rng.choice(ib, k, replace=False) for _ in range(ob)]), jnp.int32)


def inputs(case, dtype, seed=0):
    t, ib, ob, k, bi, bo = case
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k1, (t, ib * bi)).astype(dtype)
    v = (jax.random.normal(k2, (ob, k, bi, bo)) / np.sqrt(k * bi)).astype(dtype)
    dy = jax.random.normal(k3, (t, ob * bo))
    return x, v, layout(seed, ib, ob, k), dy


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_xla_matches_reference_forward_and_grads(case, dtype):
    x, v, idx, dy = inputs(case, dtype)
    y = jax.jit(lambda x, v, i: block_sparse_matmul(x, v, i, backend="xla"))(x, v, idx)
    assert y.dtype == dtype and y.shape == (x.shape[0], v.shape[0] * v.shape[3])
    assert relerr(y, block_sparse_matmul_reference(x, v, idx)) < RTOL[dtype]
    got = jax.vjp(lambda x, v: block_sparse_matmul(x, v, idx, backend="xla"), x, v)[1](
        dy.astype(dtype))
    want = jax.vjp(lambda x, v: block_sparse_matmul_reference(x, v, idx), x, v)[1](dy)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        assert relerr(g, w) < RTOL[dtype]


def test_to_dense_places_each_block_and_zeros_elsewhere():
    idx = jnp.array([[2, 0], [1, 2]], jnp.int32)
    v = jnp.arange(2 * 2 * 2 * 3, dtype=jnp.float32).reshape(2, 2, 2, 3) + 1
    w = np.asarray(to_dense(v, idx, 3))
    assert w.shape == (6, 6)
    np.testing.assert_array_equal(w[4:6, 0:3], v[0, 0])
    np.testing.assert_array_equal(w[0:2, 0:3], v[0, 1])
    np.testing.assert_array_equal(w[2:4, 3:6], v[1, 0])
    np.testing.assert_array_equal(w[4:6, 3:6], v[1, 1])
    assert np.count_nonzero(w) == v.size


def test_transpose_layout_lists_every_stored_block_by_input_block():
    idx = layout(3, 6, 5, 3)
    t = jax.device_get(transpose_layout(idx, 6))
    assert np.all(np.diff(t.in_block) >= 0)
    real = [(int(o), int(j)) for o, j, ok in zip(t.out_block, t.slot, t.valid) if ok]
    assert sorted(real) == [(o, j) for o in range(5) for j in range(3)]
    for o, j, i, ok in zip(t.out_block, t.slot, t.in_block, t.valid):
        if ok:
            assert idx[o, j] == i
    for i in range(6):  # CSR: the stored blocks of input block i, then its placeholder
        lo, hi = t.offsets[i], t.offsets[i + 1]
        assert np.all(t.in_block[lo:hi] == i) and t.valid[hi - 1] == 0
        assert np.sum(t.valid[lo:hi]) == np.sum(np.asarray(idx) == i)


@pytest.mark.parametrize("bad, match", [
    (lambda x, v, i: (x[:, :-1], v, i), "not a multiple of block_in"),
    (lambda x, v, i: (x, v[:, :1], i), "does not match values"),
    (lambda x, v, i: (x, v, i.astype(jnp.int64 if jax.config.x64_enabled else jnp.int16)),
     "int32"),
    (lambda x, v, i: (x, v, i.at[0, 0].set(99)), "outside"),
    (lambda x, v, i: (x, v, i.at[1, 1].set(i[1, 0])), "repeat an input block"),
    (lambda x, v, i: (x.astype(jnp.int32), v, i), "dtype"),
    (lambda x, v, i: (x[None], v, i), "2-D"),
])
def test_bad_inputs_are_refused_with_their_names(bad, match):
    x, v, idx, _ = inputs(CASES[0], jnp.float32)
    with pytest.raises(ValueError, match=match):
        block_sparse_matmul(*bad(x, v, idx))


def test_bad_backend_is_refused():
    x, v, idx, _ = inputs(CASES[0], jnp.float32)
    with pytest.raises(ValueError, match="backend='cuda'"):
        block_sparse_matmul(x, v, idx, backend="cuda")


def test_check_indices_names_the_setting():
    with pytest.raises(ValueError, match="my_layout"):
        check_indices(np.array([[0, 4]]), 4, name="my_layout")
