"""MInference's offline pattern search (sparsejax/models/prefill_search.py): the recall of each
pattern equals a NumPy computation of the dense causal attention mass inside the pattern's own
layout (packed segments, padding and GQA included); on constructed heads, a purely local one
gets 'a_shape' and one that reads a few fixed key columns gets 'vertical_slash'; ties go to
the pattern that keeps fewer tiles; the result's gin text parses into the spec."""
import gin
import numpy as np
import pytest

from pallas_kernels.block_sparse_attention.minference import PATTERNS, MInferenceMask
from sparsejax.models import prefill_search as ps
from sparsejax.models import sparse_attention  # noqa: F401  (registers attention_kernel)

BLOCK = 16


def numpy_recall(q, k, seg, layouts, block):
    """Dense causal softmax mass (same segment; padding queries excluded) inside each layout
    ``[P, b, h, qb, qb]``, over the real queries: ``[P, h]``."""
    b, s, h, d = q.shape
    k = np.repeat(k, h // k.shape[2], axis=2).astype(np.float64)
    logits = np.einsum("bihd,bjhd->bhij", q.astype(np.float64), k) / np.sqrt(d)
    vis = (np.arange(s)[None, :] <= np.arange(s)[:, None])[None] & \
        (seg[:, :, None] == seg[:, None, :])
    logits = np.where(vis[:, None], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True) * (seg > 0)[:, None, :, None]
    qb = s // block
    tiles = p.reshape(b, h, qb, block, qb, block).sum((3, 5))
    return np.einsum("pbhij,bhij->ph", layouts, tiles) / (seg > 0).sum()


def test_recall_equals_numpy_on_random_packed_rows():
    rng = np.random.default_rng(0)
    b, s, h, kvh, d = 2, 64, 4, 2, 8
    q = rng.standard_normal((b, s, h, d)).astype(np.float32) * 2
    k = rng.standard_normal((b, s, kvh, d)).astype(np.float32) * 2
    seg = np.ones((b, s), np.int32)
    seg[0, 40:60], seg[0, 60:] = 2, 0  # two documents, then padding
    template = MInferenceMask(vertical_size=6, slash_size=6, keep_global=2, keep_local=2,
                              last_q=8, top_k=1, a_shape_blocks=1)
    recall, density = ps.head_recall(q, k, template, BLOCK, seg)
    layouts = np.stack([np.asarray(ps.single_pattern(template, p).block_layout_dynamic(
        q, k, BLOCK, BLOCK)) for p in PATTERNS])
    np.testing.assert_allclose(recall, numpy_recall(q, k, seg, layouts, BLOCK), atol=1e-5)
    qb = s // BLOCK
    np.testing.assert_allclose(density, layouts.sum((1, 3, 4)) / (b * qb * (qb + 1) / 2))
    assert recall.shape == density.shape == (3, h) and np.all(recall < 1 + 1e-6)
    assert len({tuple(r) for r in np.round(recall, 4)}) > 1  # the patterns differ here


def constructed_heads(s=128, w=3, columns=(40, 41, 90)):
    """q ``[1, s, 2, s]``, k ``[1, s, 1, s]`` (one KV head, GQA): k_j is the unit vector e_j;
    head 0's query i is the sum of e_{i-w} .. e_i (it attends uniformly to its last w + 1
    tokens: local), head 1's the sum of e_i and of the `columns` (it attends to itself and to
    those key columns). Logit gap 40: the rest gets ~e^-40 of the mass."""
    eye = np.eye(s, dtype=np.float32)
    scale = 40 * np.sqrt(s)
    local = np.stack([eye[max(0, i - w):i + 1].sum(0) for i in range(s)])
    vertical = eye + eye[list(columns)].sum(0)[None]
    q = np.stack([local, vertical], axis=1)[None] * scale
    return q, eye[None, :, None, :]


TEMPLATE = MInferenceMask(a_shape_blocks=2, top_k=1, vertical_size=16, slash_size=16,
                          keep_global=1, keep_local=1, last_q=16)


def test_local_head_gets_a_shape_and_column_head_vertical_slash():
    q, k = constructed_heads()
    result = ps.search_patterns([(q, k)], TEMPLATE, BLOCK)
    assert result.patterns == (("a_shape", "vertical_slash"),)
    recall = dict(zip(PATTERNS, result.recall[0]))
    density = dict(zip(PATTERNS, result.density[0]))
    # the local head: sink + 2 local blocks hold all of it, as do the vertical-slash tiles
    # (its diagonals), at no fewer tiles; pooled top-1 misses the block before the diagonal
    assert recall["a_shape"][0] > 1 - 1e-6 and recall["vertical_slash"][0] > 1 - 1e-6
    assert density["a_shape"][0] <= density["vertical_slash"][0]
    assert recall["block_sparse"][0] < 0.99
    # the column head: only the vertical columns reach keys 40, 41 and 90 from far queries
    assert recall["vertical_slash"][1] > 1 - 1e-6
    assert recall["a_shape"][1] < 0.8 and recall["block_sparse"][1] < 0.95  # top-1: not 90
    np.testing.assert_allclose(result.chosen(result.recall)[0], [1, 1], atol=1e-6)


def test_a_tie_goes_to_the_pattern_with_fewer_tiles():
    recall = np.array([[0.9, 0.5], [0.9, 0.5], [0.9 - 1e-8, 0.5]])  # PATTERNS order
    density = np.array([[0.8, 0.3], [0.6, 0.3], [0.7, 0.3]])
    # head 0: all within the tolerance, block_sparse keeps the fewest tiles; head 1: equal
    # tiles too, so the cheapest estimate (a_shape, static)
    assert ps.choose(recall, density) == ("block_sparse", "a_shape")
    recall[0, 0] = 0.95
    assert ps.choose(recall, density)[0] == "vertical_slash"


def test_spec_and_gin_text_run_the_result():
    q, k = constructed_heads()
    result = ps.search_patterns([(q, k), None], TEMPLATE, BLOCK)
    assert result.patterns[1] is None and np.isnan(result.recall[1]).all()
    spec = ps.prefill_method_spec(result, TEMPLATE, BLOCK)
    assert spec["layer_patterns"] == (("a_shape", "vertical_slash"), "a_shape")
    assert spec["top_k"] == 1 and spec["block_size"] == BLOCK and "pattern" not in spec
    gin.parse_config(ps.gin_text(spec, "a header\nof two lines"))
    assert sparse_attention.prefill_spec() == spec
    mask, block = sparse_attention.build_mask(spec)
    assert block == BLOCK and mask.layer_patterns == spec["layer_patterns"]


def test_templates_that_set_patterns_are_refused():
    with pytest.raises(ValueError, match="MInferenceMask.pattern='a_shape': the pattern search "
                                         "chooses the patterns"):
        ps.search_patterns([constructed_heads()], MInferenceMask(pattern="a_shape"), BLOCK)
    with pytest.raises(ValueError, match="block_size=24 must be a positive divisor"):
        ps.head_recall(*constructed_heads(), TEMPLATE, 24)
