"""Eval: a fixed random sample of validation rows, sized in tokens, and its loss with a standard error.

The sample is the first `ceil(eval_tokens / seq_len)` rows of the validation
split's rows in an order shuffled with `make_eval_set.seed` (default 0, not the
training seed), so it is drawn from across the whole split and is the same
at every eval, in every run of a config, and for every training seed (paired
comparisons see the same rows). It is read once and kept in memory.

`eval_loss` is the token-weighted mean loss over the sample, and
`eval_loss_stderr` its standard error over rows (the sampling unit): with
per-row loss sums s_i and token counts n_i over m rows, L = sum s / sum n and

    stderr = sqrt(m / (m - 1) * sum_i (s_i - L n_i)^2) / sum n,

the delta-method (ratio-estimator) error, which is `std(row means) / sqrt(m)`
when every row has the same number of tokens.

Every eval also logs the MLPs' activation sparsity on the same sample (`act/...`;
sparsity/activation/metrics.py, `ActivationMetrics`).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax.data import pipeline
from sparsejax.models.act_record import STATS
from sparsejax.parallel.rules import replicated
from sparsejax.sparsity.activation import metrics as act_metrics
from sparsejax.sparsity.activation.metrics import ActivationMetrics
from sparsejax.train.step import model_variables

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """This process's rows of each global eval batch, and what the sample is."""

    batches: tuple[dict[str, np.ndarray], ...]
    rows: int            # sampled rows (all processes), padding rows excluded
    batch_size: int      # rows per global eval batch
    seq_len: int
    seed: int
    split_rows: int      # rows in the whole validation split
    skipped_documents: int = 0  # validation documents of fewer than 2 tokens (data/pipeline.py)

    def describe(self) -> str:
        skipped = (f", {self.skipped_documents} documents of fewer than 2 tokens skipped"
                   if self.skipped_documents else "")
        return (f"{self.rows} validation rows x {self.seq_len} tokens ({self.rows * self.seq_len:,} "
                f"tokens, of {self.split_rows} rows in the split{skipped}; sample seed "
                f"{self.seed}) in {len(self.batches)} batches of {self.batch_size}")


@gin.configurable(denylist=["eval_tokens", "global_batch_size", "seq_len", "dataset", "data_dir"])
def make_eval_set(*, eval_tokens: int, global_batch_size: int, seq_len: int, dataset: str = "stdlib",
                  data_dir: str | None = None, seed: int = 0, batch_multiple: int = 1) -> EvalSet:
    """Reads the eval sample: `ceil(eval_tokens / seq_len)` rows (all rows if the split has fewer).

    Batches hold `global_batch_size * batch_multiple` rows (larger batches run
    faster on CPU; a multiple of the training batch splits over the same mesh),
    the last one padded; every process gets the same number of batches.
    """
    if isinstance(eval_tokens, bool) or not isinstance(eval_tokens, int) or eval_tokens < 1:
        raise ValueError(f"TrainConfig.eval_tokens={eval_tokens!r} must be an int >= 1 here (0 turns eval off)")
    if not isinstance(batch_multiple, int) or batch_multiple < 1:
        raise ValueError(f"make_eval_set.batch_multiple={batch_multiple!r} must be an int >= 1")
    if not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"make_eval_set.seed={seed!r} must be an int in [0, 2**32)")
    plan = pipeline.row_plan("validation", seq_len=seq_len, seed=seed, dataset=dataset,
                             data_dir=data_dir)
    split_rows = len(plan.index)
    rows = -(-eval_tokens // seq_len)
    if rows > split_rows:
        log.warning("TrainConfig.eval_tokens=%d asks for %d rows of %d tokens, but the validation split "
                    "of %r has %d; evaluating on all of them", eval_tokens, rows, seq_len, dataset, split_rows)
        rows = split_rows
    batch_size = global_batch_size * batch_multiple
    batches = tuple(pipeline.make_dataset("validation", global_batch_size=batch_size, seq_len=seq_len,
                                          seed=seed, dataset=dataset, data_dir=data_dir, num_rows=rows))
    return EvalSet(batches, rows, batch_size, seq_len, seed, split_rows, len(plan.skipped))


def eval_set_for(cfg: Any, eval_tokens: int | None = None) -> EvalSet | None:
    """The eval sample of a TrainConfig (None when `eval_tokens` is 0: eval off). Reads the
    activation-metric settings too (validated here, before anything compiles)."""
    n = cfg.eval_tokens if eval_tokens is None else eval_tokens
    if n == 0:
        return None
    ActivationMetrics()
    return make_eval_set(eval_tokens=n, global_batch_size=cfg.global_batch_size, seq_len=cfg.seq_len,
                         dataset=cfg.dataset, data_dir=cfg.data_dir)


def make_row_loss_step(model, sparsity_method: Any) -> Callable:
    """row_losses(state, batch) -> {'loss_sum': [B], 'count': [B]}: each row's summed token
    loss; with `ActivationMetrics.enabled`, also 'act': the batch's activation counts."""
    act = ActivationMetrics()

    def row_losses(state, batch):
        params = sparsity_method.forward_params(state.params, state.sparsity, step=state.step,
                                                rng=None)
        res = model.apply(model_variables(params, state.moe_state), batch["inputs"],
                          batch["positions"], batch["segment_ids"], deterministic=True,
                          **({"mutable": [STATS]} if act.enabled else {}))
        logits, mut = res if act.enabled else (res, {})
        losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])
        mask = batch["loss_mask"].astype(jnp.float32)
        out = {"loss_sum": jnp.sum(losses * mask, axis=-1), "count": jnp.sum(mask, axis=-1)}
        if act.enabled:
            out["act"] = act_metrics.batch_sums(mut.get(STATS), batch["segment_ids"], act)
        return out

    return row_losses


def make_eval_fn(model, sparsity_method, state_shardings, mesh, batch_sharding) -> Callable:
    """The jitted row-loss step; its output is replicated so every process can read every row."""
    return jax.jit(make_row_loss_step(model, sparsity_method),
                   in_shardings=(state_shardings, batch_sharding), out_shardings=replicated(mesh))


def loss_stats(loss_sums: np.ndarray, counts: np.ndarray) -> dict[str, float]:
    """Token-weighted mean loss over rows, its standard error over rows (module docstring),
    perplexity, and the numbers of rows and tokens. Rows without tokens (padding) are dropped."""
    s = np.asarray(loss_sums, np.float64)
    n = np.asarray(counts, np.float64)
    keep = n > 0
    s, n = s[keep], n[keep]
    if n.size == 0:
        raise ValueError("the eval sample has no tokens to score")
    total = n.sum()
    loss = float(s.sum() / total)
    m = n.size
    stderr = float(math.sqrt(m / (m - 1) * np.sum((s - loss * n) ** 2)) / total) if m > 1 else None
    return {"eval_loss": loss, "eval_loss_stderr": stderr, "eval_perplexity": math.exp(min(loss, 50.0)),
            "eval_rows": int(m), "eval_tokens": int(total)}


def evaluate(eval_fn: Callable, state, eval_set: EvalSet, sharding) -> dict[str, float]:
    """Loss statistics of `state` on the eval sample (every process runs every batch).

    With several processes each batch finishes before the next is dispatched: independent
    programs in flight at once may run their cross-process collectives in a different order
    on each process, which deadlocks the CPU collectives."""
    outs = []
    for b in eval_set.batches:
        out = eval_fn(state, {k: jax.make_array_from_process_local_data(sharding, v)
                              for k, v in b.items()})
        outs.append(jax.block_until_ready(out) if jax.process_count() > 1 else out)
    outs = jax.device_get(outs)
    result = loss_stats(np.concatenate([o["loss_sum"] for o in outs]),
                        np.concatenate([o["count"] for o in outs]))
    if "act" in outs[0]:
        sums = None
        for o in outs:
            sums = act_metrics.add_sums(sums, o["act"])
        result.update(act_metrics.summarize(sums, ActivationMetrics()))
    return result


__all__ = ["EvalSet", "eval_set_for", "evaluate", "loss_stats", "make_eval_fn", "make_eval_set",
           "make_row_loss_step"]
