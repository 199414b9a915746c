"""Synthetic retrieval documents mixed into the training stream, so that a long-context model
learns retrieval (the tasks of `sparsejax longeval`, data/retrieval_tasks.py, on the 'train'
stream of seeds, which evaluation never draws).

`RetrievalMix.fraction` of the training rows are replaced, at fixed places in each document
shard's row order: row i (counted from the start of the shard's stream) is synthetic exactly
when floor((i + 1) * fraction) > floor(i * fraction), so any n consecutive rows hold
n * fraction synthetic ones, up to one. A synthetic row is one retrieval document (prompt,
canonical answer, EOS) whose haystack fills the row, its task drawn uniformly from `tasks`,
and its content a pure function of (seed, shard, row), so resuming a run reads the same rows.
The default fraction 0 leaves the stream as it was.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import gin
import numpy as np

from sparsejax.data import retrieval_tasks
from sparsejax.data.pieces import KEY


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RetrievalMix:
    """`fraction` in [0, 1) of the training rows are retrieval documents of `tasks`, drawn
    with `seed` (module docstring)."""

    fraction: float = 0.0
    tasks: tuple = retrieval_tasks.TASKS
    seed: int = 0

    def __post_init__(self):
        f = self.fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f < 1:
            raise ValueError(f"RetrievalMix.fraction={f!r} must be a number in [0, 1) (the "
                             f"fraction of training rows that are retrieval documents)")
        object.__setattr__(self, "tasks", retrieval_tasks.check_tasks(self.tasks,
                                                                      "RetrievalMix.tasks"))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"RetrievalMix.seed={self.seed!r} must be an int >= 0")

    def is_synthetic(self, i: int) -> bool:
        """Is row i of a shard's stream a retrieval document?"""
        f = float(self.fraction)
        return int(np.floor((i + 1) * f)) > int(np.floor(i * f))

    def row(self, i: int, row_len: int, tokenizer: Any, shard: int = 0,
            num_shards: int = 1) -> dict[str, np.ndarray]:
        """Row i of shard `shard` as a retrieval document of at most `row_len` tokens, in the
        row format of data/pieces.RowReader (padding after the document has segment 0)."""
        index = int(i) * int(num_shards) + int(shard)  # distinct across shards
        task = self.tasks[int(np.random.default_rng([self.seed, index]).integers(
            len(self.tasks)))]
        # the answer as the document holds it: its tokens, EOS, and one token of slack for a
        # merge across the prompt/answer boundary (a subword tokenizer)
        ex = retrieval_tasks.generate_example(
            task, row_len, index, lambda t: len(tokenizer.encode_text(t)), seed=self.seed,
            stream="train", answer_tokens=lambda a: len(tokenizer.encode(a)) + 2,
            setting="TrainConfig.seq_len + 1")
        doc = np.asarray(tokenizer.encode_document(ex.prompt + ex.answer_text), np.int32)
        doc = doc[:row_len]
        tokens = np.full(row_len, tokenizer.pad_id, np.int32)
        segs = np.zeros(row_len, np.int32)
        pos = np.zeros(row_len, np.int32)
        tokens[:doc.size], segs[:doc.size] = doc, 1
        pos[:doc.size] = np.arange(doc.size, dtype=np.int32)
        return {KEY: tokens, f"{KEY}_segment_ids": segs, f"{KEY}_positions": pos}
