"""The row index: every token of every document lands in exactly one row, rows are full."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sparsejax.data.pieces import RowReader, build_row_index, token_lengths
from sparsejax.data.tokenizer import ByteTokenizer


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=30), st.integers(2, 12), st.integers(0, 2**16))
def test_rows_tile_every_document_once(lengths, row_len, seed):
    lengths = np.array(lengths)
    doc_ids = np.arange(len(lengths)) * 3 + 1  # ids need not be 0..n-1 (document shards)
    ix = build_row_index(doc_ids, lengths, row_len, np.random.default_rng(seed))
    assert set(ix.doc) <= set(doc_ids)
    for d, n in zip(doc_ids, lengths):  # segments of a document tile [0, n) without overlap
        sel = ix.doc == d
        starts, lens = ix.start[sel], ix.length[sel]
        order = np.argsort(starts)
        np.testing.assert_array_equal(np.concatenate([[0], np.cumsum(lens[order])[:-1]]), starts[order])
        assert lens.sum() == n
    sizes = np.add.reduceat(ix.length, ix.row_ptr[:-1]) if len(ix) else np.array([])
    assert np.all(sizes[:-1] == row_len) and 0 < sizes[-1] <= row_len
    assert ix.full_rows == int(np.sum(lengths // row_len))
    assert np.all(np.diff(ix.row_ptr)[:ix.full_rows] == 1)
    assert np.all(ix.length[:ix.full_rows] == row_len) and np.all(ix.start[:ix.full_rows] % row_len == 0)
    assert len(ix) == ix.full_rows + -(-int(np.sum(lengths % row_len)) // row_len)
    again = build_row_index(doc_ids, lengths, row_len, np.random.default_rng(seed))
    for a, b in zip((ix.row_ptr, ix.doc, ix.start, ix.length), (again.row_ptr, again.doc, again.start, again.length)):
        np.testing.assert_array_equal(a, b)


def test_reader_rows_match_a_hand_layout():
    docs = [b"a", b"bbbbbbbb", b"ccccc", b"ddd"]  # 3, 10, 7, 5 tokens with bos/eos
    lengths = token_lengths(docs, np.arange(len(docs)), ByteTokenizer())
    ix = build_row_index(np.arange(4), lengths, 4, np.random.default_rng(0))
    reader = RowReader(ix, docs)
    assert len(reader) == 4 + 3  # 16 tokens of full pieces, 9 short ones packed into 3 rows
    bos, eos = 257, 258
    np.testing.assert_array_equal(reader[0]["tokens"], [bos, 98, 98, 98])  # doc 1, offset 0
    np.testing.assert_array_equal(reader[1]["tokens"], [98, 98, 98, 98])   # doc 1, offset 4
    np.testing.assert_array_equal(reader[2]["tokens"], [bos, 99, 99, 99])  # doc 2, offset 0
    np.testing.assert_array_equal(reader[3]["tokens"], [bos, 100, 100, 100])
    packed = np.concatenate([reader[r]["tokens"] for r in range(4, 7)])
    segs = [reader[r]["tokens_segment_ids"] for r in range(4, 7)]
    np.testing.assert_array_equal(segs[-1], [1, 0, 0, 0])  # 9 tokens: the last row is padded
    real = packed[np.concatenate(segs) > 0]
    # The short pieces, in a seeded order: doc 0 whole [bos, a, eos], the tails of doc 1 [b, eos],
    # doc 2 [c, c, eos] and doc 3 [eos].
    pieces = {(bos, 97, eos), (98, eos), (99, 99, eos), (eos,)}
    ends = np.flatnonzero(real == eos)
    assert {tuple(p) for p in np.split(real, ends[:-1] + 1)} == pieces
    for r in range(7):
        row = reader[r]
        for s in np.unique(row["tokens_segment_ids"][row["tokens_segment_ids"] > 0]):
            sel = row["tokens_segment_ids"] == s
            np.testing.assert_array_equal(row["tokens_positions"][sel], np.arange(sel.sum()))


def test_source_shorter_than_index_raises():
    ix = build_row_index(np.arange(1), np.array([6]), 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="source changed"):
        RowReader(ix, [b"x"])[0]


@pytest.mark.parametrize("kw,match", [(dict(row_len=1), "row_len"), (dict(lengths=np.array([0])), "lengths"),
                                      (dict(lengths=np.array([3, 4])), "equal")])
def test_bad_index_arguments(kw, match):
    args = dict(doc_ids=np.arange(1), lengths=np.array([5]), row_len=4, rng=np.random.default_rng(0))
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        build_row_index(**args)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=30), min_size=1, max_size=12), st.integers(2, 9), st.integers(0, 99))
def test_reader_rows_are_slices_of_the_tokenized_documents(docs, row_len, seed):
    from sparsejax.data.tokenizer import ByteTokenizer
    tok = ByteTokenizer()
    ix = build_row_index(np.arange(len(docs)), token_lengths(docs, np.arange(len(docs)), ByteTokenizer()), row_len,
                         np.random.default_rng(seed))
    reader = RowReader(ix, docs)
    for r in range(len(reader)):
        row = reader[r]
        sl = ix.segments(r)
        want = np.concatenate([tok.encode(docs[d], add_bos=True, add_eos=True)[a:a + n]
                               for d, a, n in zip(ix.doc[sl], ix.start[sl], ix.length[sl])])
        real = row["tokens_segment_ids"] > 0
        np.testing.assert_array_equal(row["tokens"][real], want)
        assert real.sum() == want.size and np.all(row["tokens"][~real] == 0)
