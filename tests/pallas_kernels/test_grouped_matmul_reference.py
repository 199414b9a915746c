"""The jnp reference, the group-size clipping rule and the on-device tile schedule."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.grouped_matmul import metadata, reference


def test_reference_matches_hand_computed():
    lhs = jnp.arange(12, dtype=jnp.float32).reshape(6, 2)  # rows 0..5
    rhs = jnp.stack([jnp.eye(2), 2 * jnp.eye(2), -jnp.eye(2)])  # [3, 2, 2]
    gs = jnp.array([2, 0, 3], jnp.int32)  # rows 0-1 -> 0, none -> 1, rows 2-4 -> 2, row 5 -> none
    out = reference.gmm_reference(lhs, rhs, gs)
    want = np.array(lhs)
    want[2:5] *= -1
    want[5] = 0
    np.testing.assert_array_equal(out, want)

    grad = jnp.ones((6, 2), jnp.float32)
    t = reference.tgmm_reference(lhs, grad, gs)  # [3, 2, 2]
    np.testing.assert_array_equal(t[0], np.outer(np.array(lhs[:2]).sum(0), [1, 1]))
    np.testing.assert_array_equal(t[1], 0)
    np.testing.assert_array_equal(t[2], np.outer(np.array(lhs[2:5]).sum(0), [1, 1]))


def test_effective_group_sizes_clip_negative_and_overflow():
    gs = jnp.array([3, -2, 4, 10, 5], jnp.int32)
    np.testing.assert_array_equal(reference.effective_group_sizes(gs, 10), [3, 0, 4, 3, 0])
    np.testing.assert_array_equal(reference.row_group_ids(gs, 10), [0] * 3 + [2] * 4 + [3] * 3)


@settings(max_examples=25, deadline=None)
@given(
    m=st.sampled_from([13, 64]),  # few distinct shapes keep compile time low
    sizes=st.lists(st.integers(-3, 40), min_size=6, max_size=6),
    tm=st.sampled_from([4, 8]),
    visit_empty=st.booleans(),
    trailing=st.booleans(),
)
def test_tile_schedule_covers_each_group_row_exactly_once(m, sizes, tm, visit_empty, trailing):
    gs = jnp.asarray(sizes, jnp.int32)
    tiles_m = -(-m // tm)
    starts, ends = metadata.group_bounds(gs, m, rows=m, trailing_group=trailing)
    s = metadata.make_tile_schedule(starts, ends, tm=tm, tiles_m=tiles_m, visit_empty_groups=visit_empty)
    gid, tid = np.asarray(s.group_ids), np.asarray(s.tile_ids)
    starts, ends = np.asarray(starts), np.asarray(ends)
    total = int(s.num_active[0])
    assert len(gid) == metadata.num_work_items(tiles_m, len(starts))
    assert total <= len(gid)
    # Row tiles never go backwards (TPU output blocks are revisited consecutively).
    assert np.all(np.diff(tid) >= 0) and np.all(np.diff(gid) >= 0)
    covered = np.zeros(m, int)
    for w in range(total):
        rows = np.arange(tid[w] * tm, min((tid[w] + 1) * tm, m))
        mine = rows[(rows >= starts[gid[w]]) & (rows < ends[gid[w]])]
        covered[mine] += 1
        assert mine.size > 0 or starts[gid[w]] == ends[gid[w]]  # only empty groups visit idle tiles
    in_group = reference.row_group_ids(gs, m) < len(sizes)
    want = np.where(in_group | trailing, 1, 0)
    np.testing.assert_array_equal(covered, want)
    empties = int(np.sum(ends == starts))
    assert total == len(set(zip(gid[:total], tid[:total])))
    if visit_empty:
        assert len(set(gid[:total])) == len(starts)
    else:
        assert len(set(gid[:total])) == len(starts) - empties


@settings(max_examples=10, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 20), min_size=5, max_size=5),
    seed=st.integers(0, 2**16),
)
def test_reference_matches_ragged_dot(sizes, seed):
    m = 37
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    lhs = jax.random.normal(k1, (m, 5))
    rhs = jax.random.normal(k2, (len(sizes), 5, 3))
    gs = reference.effective_group_sizes(jnp.asarray(sizes, jnp.int32), m)
    want = jax.lax.ragged_dot(lhs, rhs, gs, precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(reference.gmm_reference(lhs, rhs, gs), want, rtol=1e-5, atol=1e-5)
