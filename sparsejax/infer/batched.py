"""Many variable-length requests through fixed-shape batches, for the lm-evaluation-harness
model (sparsejax/interop/lm_eval_model.py): the log-probability of every token of a sequence
(and whether it is the model's greedy choice), and greedy continuations with the KV cache
(`generate.make_generate_fn`).

Requests are sorted by length and cut into batches of `batch_size` rows, rounded up to a
multiple of the mesh's data-parallel size (rows missing from the last batch are padding);
each batch is split over the mesh like a training batch, and its length is rounded up to a
power of two (at least 16, at most what the model allows), so that a whole evaluation
compiles a handful of programs. Padding never changes a request's result: scored rows are
padded on the right (causal attention never looks there), prompts on the left with segment
id 0, as `generate.pad_prompts` does.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.infer.generate import make_generate_fn, pad_prompts
from sparsejax.parallel.mesh import data_parallel_size
from sparsejax.parallel.rules import LOGICAL_RULES, batch_sharding
from sparsejax.train.step import model_variables

MIN_BUCKET = 16


def bucket(n: int, limit: int) -> int:
    """The padded length of a batch whose longest row has `n` tokens: the next power of two
    (at least MIN_BUCKET), at most `limit`."""
    return min(int(limit), max(MIN_BUCKET, 1 << max(int(n) - 1, 0).bit_length()))


def make_score_fn(model: Any):
    """fn(params, moe_state, tokens, positions, segs, targets) -> (log-prob of each target
    [batch, seq] float32, whether it is the argmax [batch, seq] bool), jitted."""

    def score(params, moe_state, tokens, positions, segs, targets):
        logits = model.apply(model_variables(params, moe_state), tokens, positions, segs)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return picked, jnp.argmax(logits, axis=-1) == targets

    return jax.jit(score)


class BatchedModel:
    """A loaded model (sparsejax.infer.workdir.LoadedWorkdir's model, params and MoE state) on
    its run's mesh, answering lists of requests in fixed-shape batches."""

    def __init__(self, model: Any, params: Any, moe_state: Any, mesh: Any, batch_size: int):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be an int >= 1")
        self.model, self.params, self.moe_state, self.mesh = model, params, moe_state, mesh
        dp = data_parallel_size(mesh)
        self.rows = -(-batch_size // dp) * dp
        self.max_seq_len = int(model.config.max_seq_len)
        self._score = make_score_fn(model)
        self._generate: dict[int, Any] = {}  # max_new_tokens -> jitted generate fn

    def _put(self, *arrays: np.ndarray) -> list[jax.Array]:
        sharding = batch_sharding(self.mesh)
        return [jax.device_put(a, sharding) for a in arrays]

    def _batches(self, lengths: Sequence[int]):
        """Index lists of at most `rows` requests, longest first."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        return [order[i:i + self.rows] for i in range(0, len(order), self.rows)]

    def logprobs(self, seqs: Sequence[Sequence[int]],
                 progress: Callable[[int], Any] | None = None
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each token sequence (2 to max_seq_len + 1 tokens): the log-probability of each
        of its tokens after the first, given the tokens before it, [len - 1] float32, and
        whether that token is the model's most likely one, [len - 1] bool. `progress(n)` is
        called after each batch with its number of sequences."""
        for s in seqs:
            if not 2 <= len(s) <= self.max_seq_len + 1:
                raise ValueError(f"a scored sequence has {len(s)} tokens; it needs 2 to "
                                 f"ModelConfig.max_seq_len + 1 = {self.max_seq_len + 1}")
        out: list[Any] = [None] * len(seqs)
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(LOGICAL_RULES):
            for idx in self._batches([len(s) for s in seqs]):
                t = bucket(max(len(seqs[i]) for i in idx) - 1, self.max_seq_len)
                tokens = np.zeros((self.rows, t), np.int32)
                targets = np.zeros((self.rows, t), np.int32)
                segs = np.zeros((self.rows, t), np.int32)
                for r, i in enumerate(idx):
                    s = np.asarray(seqs[i], np.int32)
                    tokens[r, :len(s) - 1], targets[r, :len(s) - 1] = s[:-1], s[1:]
                    segs[r, :len(s) - 1] = 1
                positions = np.broadcast_to(np.arange(t, dtype=np.int32), (self.rows, t))
                logp, greedy = jax.device_get(self._score(
                    self.params, self.moe_state, *self._put(tokens, np.ascontiguousarray(positions),
                                                            segs, targets)))
                for r, i in enumerate(idx):
                    n = len(seqs[i]) - 1
                    out[i] = (logp[r, :n], greedy[r, :n])
                if progress is not None:
                    progress(len(idx))
        return out

    def greedy(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, pad_id: int,
               eos_id: int | None = None, progress: Callable[[int], Any] | None = None
               ) -> list[list[int]]:
        """`max_new_tokens` greedy tokens after each prompt (token id lists of at most
        max_seq_len - max_new_tokens tokens), each cut after the first `eos_id`;
        `progress(n)` after each batch of n prompts."""
        n_new = int(max_new_tokens)
        limit = self.max_seq_len - n_new
        if n_new < 1 or limit < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be in [1, "
                             f"ModelConfig.max_seq_len={self.max_seq_len})")
        for p in prompts:
            if not 1 <= len(p) <= limit:
                raise ValueError(f"a prompt has {len(p)} tokens; with {n_new} new tokens it "
                                 f"needs 1 to {limit} (ModelConfig.max_seq_len="
                                 f"{self.max_seq_len})")
        if n_new not in self._generate:
            self._generate[n_new] = make_generate_fn(self.model, n_new, 0.0, 0, 1.0)
        fn = self._generate[n_new]
        out: list[Any] = [None] * len(prompts)
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(LOGICAL_RULES):
            for idx in self._batches([len(p) for p in prompts]):
                rows = [list(prompts[i]) for i in idx] + [[pad_id]] * (self.rows - len(idx))
                tokens, positions, segs = pad_prompts(rows, pad_id)
                extra = bucket(tokens.shape[1], limit) - tokens.shape[1]
                if extra > 0:  # more left padding (segment 0) up to the bucket's length
                    tokens = np.pad(tokens, ((0, 0), (extra, 0)), constant_values=pad_id)
                    positions = np.pad(positions, ((0, 0), (extra, 0)))
                    segs = np.pad(segs, ((0, 0), (extra, 0)))
                new = np.asarray(jax.device_get(fn(self.params, self.moe_state,
                                                   *self._put(tokens, positions, segs),
                                                   jax.random.key(0))))
                for r, i in enumerate(idx):
                    row = new[r].tolist()
                    if eos_id is not None and eos_id in row:
                        row = row[:row.index(eos_id) + 1]
                    out[i] = row
                if progress is not None:
                    progress(len(idx))
        return out
