"""The grain input pipeline: documents -> row index -> globally shuffled rows -> batches.

Every batch is a dict of numpy arrays, each [local_batch, seq_len]:
  inputs      int32    token ids
  targets     int32    the next token of each input (inputs shifted left by one)
  loss_mask   float32  1 where the target is a real token of the input's document, else 0
  segment_ids int32    1-based document piece within the row; 0 on padding
  positions   int32    position within the document's piece in this row (restarts at 0 per row)

Documents are tokenized as the gin-configured `make_tokenizer` encodes them
(`encode_document`: [bos, bytes..., eos] by default; a tokenizer.json's own
encoding, then EOS) and cut into rows of `seq_len + 1` tokens by a row index
(`pieces.py`: full pieces of one document, and rows packing the short pieces
concat-then-split), so a row's inputs and targets are its first and last
`seq_len` tokens. Training rows
are read in an order shuffled over the whole index (grain random access,
a new permutation every epoch), so consecutive rows, and the rows of one
batch, are near-independent draws from the corpus. Padding appears only in
the last packed row and in the padded last batch of a validation pass.
Documents of fewer than 2 tokens have nothing to predict (the loss never
crosses documents) and are skipped: an empty file under a tokenizer.json
that adds no BOS and a config without EOS encodes to no tokens at all. Runs
record how many (`RowPlan.skipped`, train/run_info.py).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import gin
import grain
import jax
import numpy as np

from sparsejax.data import pieces, sources
from sparsejax.data.checkpoint import iterator_restore_args, iterator_save_args  # noqa: F401 (re-exported)
from sparsejax.data.retrieval_mix import RetrievalMix
from sparsejax.data.tokenizer import make_tokenizer

_KEY = pieces.KEY
_SPLIT_CODE = {"train": 0, "validation": 1}


def _to_training_batch(rows: dict[str, np.ndarray], row_slice: slice,
                       pad_id: int) -> dict[str, np.ndarray]:
    """Packed rows {tokens, segment ids, positions}: [batch, seq_len + 1] -> model batch [batch', seq_len]."""
    tokens = rows[_KEY][row_slice]
    segs = rows[f"{_KEY}_segment_ids"][row_slice].astype(np.int32)
    pos = rows[f"{_KEY}_positions"][row_slice].astype(np.int32)
    seg_in, seg_out = segs[:, :-1], segs[:, 1:]
    tokens = np.where(segs == 0, pad_id, tokens).astype(np.int32)
    # The eos -> next document's bos step crosses documents: nothing to learn there.
    loss_mask = (seg_out != 0) & (seg_out == seg_in)
    return {
        "inputs": np.ascontiguousarray(tokens[:, :-1]),
        "targets": np.ascontiguousarray(tokens[:, 1:]),
        "loss_mask": loss_mask.astype(np.float32),
        "segment_ids": np.ascontiguousarray(seg_in),
        "positions": np.where(seg_in == 0, 0, pos[:, :-1]).astype(np.int32),
    }


def _resolve_processes(global_batch_size: int, process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_count is None:
        process_count = jax.process_count()
    if process_index is None:
        process_index = jax.process_index()
    if not isinstance(process_count, int) or process_count < 1:
        raise ValueError(f"process_count must be an int >= 1, got {process_count!r}")
    if not isinstance(process_index, int) or not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be an int in [0, {process_count}), got {process_index!r}")
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by process_count={process_count}"
        )
    return process_index, process_count


def _seed(seed: int, split: str, shard: int, purpose: int) -> int:
    """A 32-bit seed for one use (0: row order, 1: packing) of one shard of one split."""
    return int(np.random.SeedSequence([seed, _SPLIT_CODE[split], shard, purpose]).generate_state(1)[0])


@dataclasses.dataclass
class RowPlan:
    """Which rows a split (or one document shard of it) reads, and in which order.

    `order[i]` is the row index of the i-th row read; `reader[r]` reads row r. `skipped`:
    the documents left out, with fewer than 2 tokens (indices into `reader.docs`).
    """

    index: pieces.RowIndex
    reader: pieces.RowReader
    order: grain.MapDataset
    num_documents: int
    skipped: np.ndarray

    def distinct_docs(self, batch_rows: int, num_batches: int) -> np.ndarray:
        """Distinct source documents in each of the first `num_batches` batches of `batch_rows` rows."""
        n = min(num_batches, len(self.order) // batch_rows)
        return np.array([self.index.docs_of_rows([self.order[b * batch_rows + i] for i in range(batch_rows)]).size
                         for b in range(n)], np.int64)


def row_plan(split: str, *, seq_len: int, seed: int = 0, dataset: str = "stdlib", data_dir: str | None = None,
             shard_index: int = 0, num_shards: int = 1, num_epochs: int | None = None) -> RowPlan:
    """The row index of documents `docs[shard_index::num_shards]` of `split` and its shuffled read order.

    The order is a seeded permutation of all rows, a new one in each of
    `num_epochs` epochs (None: forever). Seeds are derived from (`seed`, split,
    shard), so shards and splits never share a permutation.
    """
    docs = sources.text_source(dataset, split, data_dir)
    doc_ids = np.arange(shard_index, len(docs), num_shards, dtype=np.int64)
    if doc_ids.size == 0:
        raise ValueError(f"dataset {dataset!r} split {split!r} has {len(docs)} documents, fewer than "
                         f"the {num_shards} document shards")
    tokenizer = make_tokenizer()
    lengths = pieces.token_lengths(docs, doc_ids, tokenizer)
    short = lengths < 2  # nothing to predict (module docstring)
    if short.all():
        raise ValueError(
            f"dataset {dataset!r} split {split!r}: all {doc_ids.size} documents"
            f"{f' of document shard {shard_index}' if num_shards > 1 else ''} encode to fewer "
            f"than 2 tokens (e.g. {sources.document_name(docs, int(doc_ids[0]))}), so there is "
            f"nothing to train on; check the files, or the tokenizer (make_tokenizer.path)")
    rng = np.random.default_rng(_seed(seed, split, shard_index, 1))
    index = pieces.build_row_index(doc_ids[~short], lengths[~short], seq_len + 1, rng)
    order = grain.MapDataset.range(len(index)).shuffle(seed=_seed(seed, split, shard_index, 0))
    return RowPlan(index, pieces.RowReader(index, docs, tokenizer), order.repeat(num_epochs),
                   len(doc_ids), doc_ids[short])


def _check_args(split: str, seq_len: int, global_batch_size: int, seed: int, num_epochs: int | None) -> None:
    if split not in sources.SPLITS:
        raise ValueError(f"split must be one of {sources.SPLITS}, got {split!r}")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
    if not isinstance(global_batch_size, int) or global_batch_size < 1:
        raise ValueError(f"global_batch_size must be an int >= 1, got {global_batch_size!r}")
    if not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    if num_epochs is not None and (not isinstance(num_epochs, int) or num_epochs < 1):
        raise ValueError(f"num_epochs must be None (forever) or an int >= 1, got {num_epochs!r}")


@gin.configurable(denylist=["split", "global_batch_size", "seq_len", "process_index", "process_count"])
def make_dataset(
    split: str,
    *,
    global_batch_size: int,
    seq_len: int,
    seed: int = 0,
    dataset: str = "stdlib",
    data_dir: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_epochs: int | None = None,
    num_rows: int | None = None,
    num_threads: int = 2,
    prefetch_buffer_size: int = 64,
) -> grain.IterDataset:
    """Returns this process's batches of `split` of `dataset` (see module docstring for the format).

    train: documents are sharded by process (`docs[process_index::process_count]`,
    so each process reads only its own); their rows are read in a seeded random
    order, a new permutation in each of `num_epochs` epochs (None: forever), with
    `RetrievalMix.fraction` of them replaced by synthetic retrieval documents
    (data/retrieval_mix.py; default none), and batched to `global_batch_size // process_count` rows; incomplete last
    batches are dropped.

    validation: every process reads the whole split's rows in one seeded random
    order (`num_epochs` passes, default 1), keeps the first `num_rows` (None:
    all; a uniform sample of the split's rows), packs them into global batches,
    padding the last one, and keeps its rows `[process_index * local,
    (process_index + 1) * local)`; so all processes yield the same number of
    batches (no collective hangs in eval).

    `process_index`/`process_count` default to JAX's. `num_threads` and
    `prefetch_buffer_size` set grain's reader threads and read-ahead.
    """
    _check_args(split, seq_len, global_batch_size, seed, num_epochs)
    if num_rows is not None and (split != "validation" or not isinstance(num_rows, int) or num_rows < 1):
        raise ValueError(f"num_rows={num_rows!r}: only the validation split takes num_rows, an int >= 1")
    process_index, process_count = _resolve_processes(global_batch_size, process_index, process_count)
    local_batch = global_batch_size // process_count
    if split == "train":
        plan = row_plan(split, seq_len=seq_len, seed=seed, dataset=dataset, data_dir=data_dir,
                        shard_index=process_index, num_shards=process_count, num_epochs=num_epochs)
        mix = RetrievalMix()
        if mix.fraction > 0:  # synthetic retrieval documents at fixed places of the stream
            reader, row_len = plan.reader, seq_len + 1
            rows = plan.order.map_with_index(
                lambda i, r: mix.row(i, row_len, reader.tokenizer, process_index, process_count)
                if mix.is_synthetic(i) else reader[r])
        else:
            rows = plan.order.map(plan.reader.__getitem__)
        batches = rows.batch(local_batch, drop_remainder=True)
        row_slice = slice(None)
    else:
        plan = row_plan(split, seq_len=seq_len, seed=seed, dataset=dataset, data_dir=data_dir,
                        num_epochs=num_epochs or 1)
        order = plan.order if num_rows is None else plan.order[:num_rows]
        batches = order.map(plan.reader.__getitem__).batch(
            global_batch_size, batch_fn=functools.partial(grain.experimental.batch_and_pad,
                                                          batch_size=global_batch_size))
        row_slice = slice(process_index * local_batch, (process_index + 1) * local_batch)
    batches = batches.map(functools.partial(_to_training_batch, row_slice=row_slice,
                                            pad_id=plan.reader.tokenizer.pad_id))
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
    return batches.to_iter_dataset(read_options)


def make_iterator(split: str, **kwargs: Any) -> grain.DatasetIterator:
    """`iter(make_dataset(split, **kwargs))`: an iterator whose `get_state()`/`set_state()` checkpoint its position."""
    return iter(make_dataset(split, **kwargs))


def mean_distinct_docs(plans: Sequence[RowPlan], rows_per_plan: int, num_batches: int = 100) -> float:
    """Mean number of distinct documents per batch made of `rows_per_plan` rows of each plan.

    Plans are disjoint document shards, so their counts add up.
    """
    counts = [p.distinct_docs(rows_per_plan, num_batches) for p in plans]
    n = min(c.size for c in counts)
    return float(np.mean(np.sum([c[:n] for c in counts], axis=0))) if n else float("nan")
