"""The row index: documents cut into pieces of one row's length, short pieces packed, for random access.

A document of `L` tokens (`tokenizer.encode_document`: `[bos, bytes..., eos]` under the byte
tokenizer; under a tokenizer.json its own encoding, then EOS) is cut at offsets 0, P, 2P, ...
(`P = row_len = seq_len + 1`): its `L // P` full pieces are rows of their own,
and its short tail (or the whole document, if `L < P`) joins the other short
pieces, which are shuffled with the seed and packed concat-then-split into
rows (a short piece may continue into the next packed row). Only document
lengths are needed to build the index, so building it is cheap (numpy over
one entry per document); `RowReader` then reads any row by its number, which
lets the pipeline shuffle rows globally (`grain.MapDataset.shuffle`). Under the byte
tokenizer a document's length is its byte count + 2 and a piece is a slice of its bytes;
another tokenizer (a tokenizer.json) tokenizes every document once for the lengths and
again when one of its pieces is read.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import numpy as np

from sparsejax.data import sources
from sparsejax.data.tokenizer import ByteTokenizer

KEY = "tokens"  # rows are {KEY, KEY_segment_ids, KEY_positions}, as grain's packers name them


@dataclasses.dataclass(frozen=True)
class RowIndex:
    """Rows of `row_len` tokens as segments of documents (CSR layout).

    Row r holds segments `row_ptr[r]:row_ptr[r + 1]`; segment j is tokens
    `start[j]:start[j] + length[j]` of document `doc[j]` (an index into the source).
    """

    row_len: int
    row_ptr: np.ndarray  # [rows + 1] int64
    doc: np.ndarray      # [segments] int64
    start: np.ndarray    # [segments] int64
    length: np.ndarray   # [segments] int64
    full_rows: int       # rows 0..full_rows-1 are one whole piece each; the rest are packed

    def __len__(self) -> int:
        return len(self.row_ptr) - 1

    def segments(self, row: int) -> slice:
        """The segment slice of row `row`."""
        return slice(int(self.row_ptr[row]), int(self.row_ptr[row + 1]))

    def docs_of_rows(self, rows: Sequence[int]) -> np.ndarray:
        """The distinct documents that rows `rows` draw tokens from (sorted)."""
        return np.unique(np.concatenate([self.doc[self.segments(int(r))] for r in rows] or [[]]))


def token_lengths(docs: Sequence[bytes], doc_ids: np.ndarray, tokenizer: Any) -> np.ndarray:
    """Tokens of documents `doc_ids` as rows hold them (`encode_document`): bytes + 2 under the
    byte tokenizer (no document is read in full), else the length of each encoded document."""
    if isinstance(tokenizer, ByteTokenizer):
        return (np.asarray(sources.byte_lengths(docs), np.int64) + 2)[doc_ids]
    return np.array([len(tokenizer.encode_document(docs[int(d)])) for d in doc_ids], np.int64)


def build_row_index(doc_ids: np.ndarray, lengths: np.ndarray, row_len: int,
                    rng: np.random.Generator) -> RowIndex:
    """Cuts documents `doc_ids` of `lengths` tokens into rows of `row_len` (see module docstring).

    `rng` orders the short pieces before they are packed. Full rows come first,
    in document order, then the packed rows; the pipeline shuffles them.
    """
    doc_ids = np.asarray(doc_ids, np.int64)
    lengths = np.asarray(lengths, np.int64)
    if doc_ids.shape != lengths.shape or doc_ids.ndim != 1:
        raise ValueError(f"doc_ids {doc_ids.shape} and lengths {lengths.shape} must be equal 1-D shapes")
    if not isinstance(row_len, (int, np.integer)) or row_len < 2:
        raise ValueError(f"row_len must be an int >= 2 (seq_len + 1), got {row_len!r}")
    if lengths.size and lengths.min() < 1:
        raise ValueError(f"document lengths must be >= 1 token, got min {lengths.min()}")
    n_full = lengths // row_len
    first_full = np.cumsum(n_full) - n_full
    full_doc = np.repeat(doc_ids, n_full)
    full_start = (np.arange(int(n_full.sum()), dtype=np.int64) - np.repeat(first_full, n_full)) * row_len

    tail = lengths % row_len
    short = tail > 0
    order = rng.permutation(int(short.sum()))
    s_doc, s_start, s_len = doc_ids[short][order], (n_full * row_len)[short][order], tail[short][order]
    ends = np.cumsum(s_len)
    begins = ends - s_len
    total = int(ends[-1]) if ends.size else 0
    # Concat-then-split: a segment starts at every piece start and every row boundary.
    points = np.unique(np.concatenate([begins, np.arange(0, total, row_len, dtype=np.int64)]))
    piece = np.searchsorted(ends, points, side="right")
    seg_len = np.diff(np.append(points, total))
    packed_rows = -(-total // row_len)
    packed_ptr = np.searchsorted(points // row_len, np.arange(packed_rows + 1), side="left")

    n_full_rows = full_doc.size
    return RowIndex(
        row_len=int(row_len),
        row_ptr=np.concatenate([np.arange(n_full_rows, dtype=np.int64), n_full_rows + packed_ptr]),
        doc=np.concatenate([full_doc, s_doc[piece]]),
        start=np.concatenate([full_start, s_start[piece] + points - begins[piece]]),
        length=np.concatenate([np.full(n_full_rows, row_len, np.int64), seg_len]),
        full_rows=int(n_full_rows),
    )


class RowReader:
    """Reads row r of a `RowIndex` from the documents (a sequence of bytes), random access.

    Returns {KEY: tokens, KEY_segment_ids: 1-based segment per token (0 on
    padding), KEY_positions: position within the segment}, each [row_len] int32.
    """

    def __init__(self, index: RowIndex, docs: Sequence[bytes], tokenizer: Any = None):
        self.index = index
        self.docs = docs
        self.tokenizer = ByteTokenizer() if tokenizer is None else tokenizer
        self._bytes = isinstance(self.tokenizer, ByteTokenizer)
        self._tokens = functools.lru_cache(maxsize=64)(
            lambda doc: self.tokenizer.encode_document(self.docs[doc]))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, row: int) -> dict[str, np.ndarray]:
        ix = self.index
        n = ix.row_len
        tokens = np.zeros(n, np.int32)
        segs = np.zeros(n, np.int32)
        pos = np.zeros(n, np.int32)
        at = 0
        sl = ix.segments(int(row))
        for s, (d, start, length) in enumerate(zip(ix.doc[sl], ix.start[sl], ix.length[sl]), 1):
            tokens[at:at + length] = self._piece(int(d), int(start), int(length))
            segs[at:at + length] = s
            pos[at:at + length] = np.arange(length, dtype=np.int32)
            at += length
        return {KEY: tokens, f"{KEY}_segment_ids": segs, f"{KEY}_positions": pos}

    def _piece(self, doc: int, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the encoded document; under the byte tokenizer
        (`[bos, bytes..., eos]`) without tokenizing the whole document (token t is byte t - 1)."""
        end = start + length
        if not self._bytes:
            tokens = self._tokens(doc)
            if end > len(tokens):
                raise ValueError(f"document {doc} has {len(tokens)} tokens, fewer than the index "
                                 f"needs ({end}); the source changed since the index was built")
            return np.asarray(tokens[start:end], np.int32)
        data = self.docs[doc]
        n = len(data)
        if end > n + 2:
            raise ValueError(f"document {doc} has {n + 2} tokens, fewer than the index needs ({end}); "
                             "the source changed since the index was built")
        tok = self.tokenizer
        body = np.frombuffer(data, np.uint8)[max(start - 1, 0):min(end - 1, n)]
        parts = [[tok.bos_id]] * (start == 0) + [body] + [[tok.eos_id]] * (end == n + 2)
        return np.concatenate(parts).astype(np.int32)

    def __repr__(self) -> str:
        return f"RowReader({len(self)} rows of {self.index.row_len} tokens)"
