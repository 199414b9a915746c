"""The grain input pipeline: documents -> shuffled, tokenized, packed, batched, process-sharded rows.

Every batch is a dict of numpy arrays, each [local_batch, seq_len]:
  inputs      int32    token ids
  targets     int32    the next token of each input (inputs shifted left by one)
  loss_mask   float32  1 where the target is a real token of the input's document, else 0
  segment_ids int32    1-based document id within the row; 0 on padding
  positions   int32    position within the document's piece in this row (restarts at 0 per row)

Documents are tokenized as [bos, bytes..., eos] and packed with grain's
concat-then-split into rows of `seq_len + 1` tokens, so a row's inputs and
targets are its first and last `seq_len` tokens. Padding only appears at the
end of a finite pass.
"""
from __future__ import annotations

import functools
from typing import Any

import gin
import grain
import jax
import numpy as np

from sparsejax.data import sources
from sparsejax.data.checkpoint import iterator_restore_args, iterator_save_args  # noqa: F401 (re-exported)
from sparsejax.data.tokenizer import make_tokenizer

_KEY = "tokens"


def _tokenize(text: bytes, tokenizer: Any) -> dict[str, np.ndarray]:
    return {_KEY: tokenizer.encode(text, add_bos=True, add_eos=True)}


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
    num_threads: int = 2,
    prefetch_buffer_size: int = 64,
) -> grain.IterDataset:
    """Returns this process's batches of `split` of `dataset` (see module docstring for the format).

    train: documents are sharded by process (`docs[process_index::process_count]`,
    so each process reads only its own), shuffled with `seed` differently in
    each epoch, repeated `num_epochs` times (None: forever), packed, and
    batched to `global_batch_size // process_count` rows; incomplete last
    batches are dropped.

    validation: one unshuffled pass (or `num_epochs` passes). Every process
    packs the whole split into global batches, padding the last one, and keeps
    its rows `[process_index * local, (process_index + 1) * local)`; so all
    processes yield the same number of batches (no collective hangs in eval).

    `process_index`/`process_count` default to JAX's. `num_threads` and
    `prefetch_buffer_size` set grain's reader threads and read-ahead.
    """
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
    process_index, process_count = _resolve_processes(global_batch_size, process_index, process_count)
    local_batch = global_batch_size // process_count

    docs = grain.MapDataset.source(sources.text_source(dataset, split, data_dir))
    if split == "train":
        docs = docs[process_index::process_count]
        if len(docs) == 0:
            raise ValueError(
                f"dataset {dataset!r} split 'train' has fewer documents than process_count={process_count}"
            )
        docs = docs.shuffle(seed=seed).repeat(num_epochs)
        batch_rows, row_slice = local_batch, slice(None)
        batch_fn = None
    else:
        docs = docs.repeat(num_epochs or 1)
        batch_rows = global_batch_size
        row_slice = slice(process_index * local_batch, (process_index + 1) * local_batch)
        batch_fn = functools.partial(grain.experimental.batch_and_pad, batch_size=global_batch_size)

    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
    tokenizer = make_tokenizer()  # gin-configured: byte (default) or a tokenizer.json
    rows = grain.experimental.ConcatThenSplitIterDataset(
        docs.map(functools.partial(_tokenize, tokenizer=tokenizer)).to_iter_dataset(read_options),
        length_struct={_KEY: seq_len + 1},
    )
    batches = rows.batch(batch_rows, drop_remainder=split == "train", batch_fn=batch_fn)
    return batches.map(functools.partial(_to_training_batch, row_slice=row_slice,
                                         pad_id=tokenizer.pad_id))


def make_iterator(split: str, **kwargs: Any) -> grain.DatasetIterator:
    """`iter(make_dataset(split, **kwargs))`: an iterator whose `get_state()`/`set_state()` checkpoint its position."""
    return iter(make_dataset(split, **kwargs))
