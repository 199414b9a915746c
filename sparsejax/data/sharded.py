"""Training batches read in `num_shards` independent document shards, so that the global batch
(and its checkpointed position) does not depend on how many processes read it.

Shard s owns documents `docs[s::num_shards]` and fills rows `[s * B/S, (s+1) * B/S)` of every
global batch of B rows. Process p of P reads only its shards `[p * S/P, (p+1) * S/P)`. A run on
one process with `num_shards=2` sees exactly the batches of a 2-process run, and a checkpoint
saved by 2 processes restores on 1 (or 4) processes at the same data position. Within a shard,
rows are drawn in a seeded random order over the shard's whole row index (`pipeline.py`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from sparsejax.data.pipeline import RowPlan, make_iterator, mean_distinct_docs, row_plan
from sparsejax.data.sources import document_name


class ShardedTrainIterator:
    """This process's rows of every global training batch, from its document shards."""

    def __init__(self, *, global_batch_size: int, seq_len: int, seed: int = 0,
                 dataset: str = "stdlib", data_dir: str | None = None,
                 num_shards: int | None = None, process_index: int | None = None,
                 process_count: int | None = None):
        pc = jax.process_count() if process_count is None else process_count
        pi = jax.process_index() if process_index is None else process_index
        shards = pc if num_shards is None else num_shards
        if shards < 1 or shards % pc:
            raise ValueError(f"TrainConfig.data_shards={shards} must be a positive multiple of the "
                             f"process count {pc}")
        if global_batch_size % shards:
            raise ValueError(f"TrainConfig.global_batch_size={global_batch_size} is not divisible "
                             f"by TrainConfig.data_shards={shards}")
        self.num_shards = shards
        per_process = shards // pc
        self.shard_ids = list(range(pi * per_process, (pi + 1) * per_process))
        self._plan_args = dict(seq_len=seq_len, seed=seed, dataset=dataset, data_dir=data_dir,
                               num_shards=shards)
        self.rows_per_shard = global_batch_size // shards
        self._its = {s: make_iterator("train", global_batch_size=global_batch_size,
                                      seq_len=seq_len, seed=seed, dataset=dataset,
                                      data_dir=data_dir, process_index=s, process_count=shards)
                     for s in self.shard_ids}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(self._its[s]) for s in self.shard_ids]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    @functools.cached_property
    def plans(self) -> list[RowPlan]:
        """The row plans of this process's document shards."""
        return [row_plan("train", shard_index=s, **self._plan_args) for s in self.shard_ids]

    def distinct_docs_per_batch(self, num_batches: int = 100) -> float:
        """Mean distinct source documents in this process's rows of the first `num_batches` batches
        (computed from the row index and read order, without reading any text)."""
        return mean_distinct_docs(self.plans, self.rows_per_shard, num_batches)

    def skipped_documents(self) -> list[str]:
        """The documents of this process's shards left out for having fewer than 2 tokens
        (pipeline.py), named as messages name them."""
        return [document_name(p.reader.docs, int(d)) for p in self.plans for d in p.skipped]

    def get_state(self) -> dict[str, Any]:
        return {str(s): it.get_state() for s, it in self._its.items()}

    def set_state(self, state: dict[str, Any]) -> None:
        for s, it in self._its.items():
            it.set_state(state[str(s)])


class ShardedIteratorHandler(ocp.CheckpointHandler):
    """Writes one JSON file per data shard (`shard_{s}-of-{S}.json`), each by the process that
    owns the shard, so a restore works with any process count that divides S."""

    def save(self, directory: epath.Path, args: "ShardedIteratorSave"):
        it = args.item
        for s, state in it.get_state().items():
            (directory / f"shard_{s}-of-{it.num_shards}.json").write_text(json.dumps(state))

    def restore(self, directory: epath.Path, args: "ShardedIteratorRestore"):
        it = args.item
        state = {}
        for s in it.shard_ids:
            path = directory / f"shard_{s}-of-{it.num_shards}.json"
            if not path.exists():
                saved = sorted(p.name for p in directory.iterdir())
                raise ValueError(f"data position for shard {s} of {it.num_shards} is not in the "
                                 f"checkpoint (it holds {saved[:4]}); TrainConfig.data_shards must "
                                 f"equal the value the checkpoint was written with")
            state[str(s)] = json.loads(path.read_text())
        it.set_state(state)
        return it

    def metadata(self, directory):
        return None

    def structure(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(ShardedIteratorHandler, for_save=True)
@dataclasses.dataclass
class ShardedIteratorSave(ocp.args.CheckpointArgs):
    item: ShardedTrainIterator


@ocp.args.register_with_handler(ShardedIteratorHandler, for_restore=True)
@dataclasses.dataclass
class ShardedIteratorRestore(ocp.args.CheckpointArgs):
    item: ShardedTrainIterator
