"""Gradient accumulation: the global batch split into k micro-batches inside one jitted step.

`make_grad_fn(model, method, k)` returns grad_fn(params, state, batch, rng) ->
(loss, aux, mutated, grads), the same quantities `jax.value_and_grad` of the loss gives on the
whole batch, computed micro-batch by micro-batch in a `lax.scan` that sums the gradients, so
activation memory is that of one micro-batch:

* the token loss is the sum of each micro-batch's loss sum over the *whole* batch's token
  count, so it (and its gradient) equals the un-split token-weighted mean exactly;
* the model's aux losses (means over a micro-batch's tokens) are averaged over micro-batches;
  a loss that is not linear in the batch (the per-batch load-balance loss) is then the
  per-micro-batch variant, which is why MoE layers offer a global-batch one
  (`MoeMlp.global_load_balance_weight`);
* the method's `forward_params` run once per step (their VJP maps the summed gradient back
  onto the params) and its regularizer is added once;
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

from sparsejax.sparsity.method import SparsityMethod

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


def make_grad_fn(model: nn.Module, method: SparsityMethod, microbatches: int,
                 loss_fn: Callable | None = None) -> Callable:
    """grad_fn(params, state, batch, rng) -> (loss, aux, mutated, grads).

    k = 1 is `jax.value_and_grad(loss_fn)` (`step.make_loss_fn`) on the whole batch; k > 1
    accumulates over micro-batches as the module docstring describes."""
    from sparsejax.train import step as step_lib  # noqa: PLC0415 (step imports this module)
    if microbatches == 1:
        loss_fn = loss_fn or step_lib.make_loss_fn(model, method)

        def whole(params, state, batch, rng):
            (_, (loss, aux, mutated)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, state, batch, rng)
            return loss, aux, mutated, grads
        return whole

    k = microbatches

    def apply(fwd_params, state, mb, rng, counts, mutable):
        variables = step_lib.model_variables(fwd_params, state.moe_state)
        if counts:
            variables[COUNTS] = counts
        return model.apply(variables, mb["inputs"], mb["positions"], mb["segment_ids"],
                           deterministic=False, rngs={"router": rng, "dropout": rng},
                           mutable=mutable)

    def global_counts(fwd_params, state, micro, rng):
        """Exact expert counts of the whole batch, summed over micro-batches ({} if no MoE
        layer asks for them)."""
        def one(mb, i):
            _, mut = apply(jax.lax.stop_gradient(fwd_params), state, mb,
                           jax.random.fold_in(rng, i), None, [COUNTS])
            return mut.get(COUNTS, {})
        first = jax.tree.map(lambda x: x[0], micro)
        if not jax.tree.leaves(jax.eval_shape(one, first, 0)):
            return {}
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(one, first, 0))

        def body(acc, xs):
            return jax.tree.map(jnp.add, acc, one(*xs)), None
        return jax.lax.scan(body, zeros, (micro, jnp.arange(k)))[0]

    def grad_fn(params, state, batch, rng):
        fwd_params, fwd_vjp = jax.vjp(
            lambda p: method.forward_params(p, state.sparsity, step=state.step, rng=rng), params)
        total = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
        micro = split_microbatches(batch, k)
        counts = global_counts(fwd_params, state, micro, rng)

        def micro_loss(fp, mb, i):
            logits, mutated = apply(fp, state, mb, jax.random.fold_in(rng, i), counts,
                                    step_lib.MUTABLE)
            loss_sum, _ = step_lib.cross_entropy(logits, mb["targets"], mb["loss_mask"])
            aux = _sum_leaves(mutated.get("aux_loss", {}))
            return loss_sum / total + aux / k, (loss_sum / total, aux / k, mutated)

        def body(acc, xs):
            mb, i = xs
            (_, (loss, aux, mutated)), g = jax.value_and_grad(micro_loss, has_aux=True)(
                fwd_params, mb, i)
            g_acc, loss_acc, aux_acc = acc
            out = {"metrics": mutated.get("metrics", {}),
                   "moe_state": mutated.get("moe_state", {})}
            return (jax.tree.map(jnp.add, g_acc, g), loss_acc + loss, aux_acc + aux), out

        zeros = jax.tree.map(jnp.zeros_like, fwd_params)
        (g_sum, loss, aux), outs = jax.lax.scan(
            body, (zeros, jnp.float32(0), jnp.float32(0)), (micro, jnp.arange(k)))
        (grads,) = fwd_vjp(g_sum)
        reg, reg_grads = jax.value_and_grad(
            lambda p: method.regularizer(p, state.sparsity, step=state.step))(params)
        grads = jax.tree.map(jnp.add, grads, reg_grads)
        mutated = {"metrics": jax.tree.map(lambda x: jnp.mean(x, axis=0), outs["metrics"])}
        if jax.tree.leaves(outs["moe_state"]):
            mutated["moe_state"] = jax.tree.map(lambda x: x[-1], outs["moe_state"])
        return loss, aux + reg, mutated, grads

    return grad_fn
