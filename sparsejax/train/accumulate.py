"""Gradient accumulation: the global batch split into k micro-batches inside one jitted step.

`make_grad_fn(model, method, k)` returns grad_fn(params, state, batch, rng) ->
(loss, aux, mutated, grads), the same quantities `jax.value_and_grad` of the loss gives on the
whole batch, computed micro-batch by micro-batch in a `lax.scan` that sums the gradients, so
activation memory is that of one micro-batch:

* each micro-batch's token loss (its mean) is weighted by its share of the whole batch's
  tokens, so the loss and its gradient equal the un-split token-weighted mean exactly;
* the model's aux losses (means over a micro-batch's tokens) and the method's regularizer
  are averaged over micro-batches (the regularizer is the same each time); a loss that is not
  linear in the batch (the per-batch load-balance loss) is then the per-micro-batch variant,
  which is why MoE layers offer a global-batch one (`MoeMlp.global_load_balance_weight`);
* the micro-batches draw their random numbers (router jitter, stochastic forward params)
  from the step's rng folded with the micro-batch index;
* MoE layers that need exact expert counts of the whole global batch (the global load-balance
  loss, aux-loss-free bias updates) get them from a forward-only counting pass over the
  micro-batches before the scan (one extra forward, no backward; skipped when no layer needs
  it), supplied in the 'moe_counts' collection;
* sown metrics are averaged over micro-batches; the MoE state is the last micro-batch's (each
  micro-batch starts from the step's state and, given the global counts, computes the same
  update).

Micro-batch m holds rows m, m+k, m+2k, ... of the batch, so with the per-device batch
divisible by k every device keeps its own rows (no resharding).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

COUNTS = "moe_counts"


def check_microbatches(microbatches: Any, global_batch_size: int, data_parallel: int) -> None:
    """ValueError unless `microbatches` is an int >= 1 dividing the per-device batch."""
    if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
        raise ValueError(f"TrainConfig.microbatches={microbatches!r} must be an int >= 1")
    per_device = global_batch_size // max(data_parallel, 1)
    if per_device % microbatches:
        valid = [d for d in range(1, per_device + 1) if per_device % d == 0]
        raise ValueError(
            f"TrainConfig.microbatches={microbatches} does not divide the per-device batch "
            f"{per_device} (global_batch_size={global_batch_size} over {data_parallel} "
            f"data-parallel devices); valid: {valid}")


def split_microbatches(batch: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
    """{name: [batch, ...]} -> {name: [k, batch / k, ...]}; micro-batch m is rows m::k."""
    def split(x):
        y = jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
        return nn.with_logical_constraint(y, (None, "batch") + (None,) * (x.ndim - 1))
    return {name: split(x) for name, x in batch.items()}


def _sum_leaves(tree: Any) -> jax.Array:
    return sum((jnp.sum(jnp.asarray(v, jnp.float32)) for v in jax.tree.leaves(tree)),
               jnp.float32(0))


def make_grad_fn(loss_fn: Callable, microbatches: int) -> Callable:
    """grad_fn(params, state, batch, rng) -> (loss, aux, mutated, grads) from the train loss
    `loss_fn(params, state, batch, rng, extra_variables=None) -> (total, (loss, aux,
    mutated))` (`step.make_loss_fn`).

    k = 1 is `jax.value_and_grad(loss_fn)` on the whole batch; k > 1 accumulates over
    micro-batches as the module docstring describes."""
    if microbatches == 1:
        def whole(params, state, batch, rng):
            (_, (loss, aux, mutated)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, state, batch, rng)
            return loss, aux, mutated, grads
        return whole

    k = microbatches

    def global_counts(params, state, micro, rng):
        """Exact expert counts of the whole batch, summed over micro-batches ({} if no MoE
        layer asks for them)."""
        def one(mb, i):
            _, (_, _, mutated) = loss_fn(params, state, mb, jax.random.fold_in(rng, i))
            return mutated.get(COUNTS, {})
        first = jax.tree.map(lambda x: x[0], micro)
        shapes = jax.eval_shape(one, first, 0)
        if not jax.tree.leaves(shapes):
            return {}
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        def body(acc, xs):
            return jax.tree.map(jnp.add, acc, one(*xs)), None
        return jax.lax.stop_gradient(jax.lax.scan(body, zeros, (micro, jnp.arange(k)))[0])

    def grad_fn(params, state, batch, rng):
        micro = split_microbatches(batch, k)
        counts = jnp.sum(micro["loss_mask"].astype(jnp.float32),
                         axis=tuple(range(1, micro["loss_mask"].ndim)))  # [k] tokens each
        weights = counts / jnp.maximum(jnp.sum(counts), 1.0)
        expert_counts = global_counts(params, state, micro, rng)
        extra = {COUNTS: expert_counts} if expert_counts else None

        def body(acc, xs):
            mb, i, w = xs

            def objective(p):  # this micro-batch's share of the whole batch's loss
                _, (loss, aux, mutated) = loss_fn(p, state, mb, jax.random.fold_in(rng, i),
                                                  extra_variables=extra)
                return w * loss + aux / k, (loss, aux, mutated)
            (_, (loss, aux, mutated)), g = jax.value_and_grad(objective, has_aux=True)(params)
            g_acc, loss_acc, aux_acc = acc
            out = {"metrics": mutated.get("metrics", {}),
                   "moe_state": mutated.get("moe_state", {})}
            return (jax.tree.map(jnp.add, g_acc, g), loss_acc + w * loss, aux_acc + aux / k), out

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, loss, aux), outs = jax.lax.scan(
            body, (zeros, jnp.float32(0), jnp.float32(0)), (micro, jnp.arange(k), weights))
        mutated = {"metrics": jax.tree.map(lambda x: jnp.mean(x, axis=0), outs["metrics"])}
        if jax.tree.leaves(outs["moe_state"]):
            mutated["moe_state"] = jax.tree.map(lambda x: x[-1], outs["moe_state"])
        return loss, aux, mutated, grads

    return grad_fn
