"""Pure train and eval steps: (state, batch) -> (state, metrics). Jitted by the trainer with
explicit shardings; nothing here does I/O."""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from sparsejax.train.state import TrainState

MUTABLE = ["aux_loss", "metrics", "moe_state"]


def flatten_sown(tree: Any, prefix: str) -> dict[str, jax.Array]:
    """Flattens a sown collection ({'layer_0': {'moe': {'load': (v,)}}}) into
    {'prefix/layer_0/moe/load': v}; values sown several times are averaged."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, tuple))[0]:
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        vals = leaf if isinstance(leaf, tuple) else (leaf,)
        out[f"{prefix}/{name}"] = sum(jnp.asarray(v, jnp.float32) for v in vals) / len(vals)
    return out


def cross_entropy(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array):
    """Masked token cross-entropy: returns (sum of losses, number of counted tokens)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum(losses * mask), jnp.sum(mask)


def model_variables(params, moe_state):
    variables = {"params": params}
    if moe_state:
        variables["moe_state"] = moe_state
    return variables


def make_loss_fn(model: nn.Module, sparsity_method: Any = None) -> Callable:
    """loss_fn(params, state, batch, rng) -> (loss + aux losses, (loss, aux, mutated)).

    With a sparsity method, the model sees `forward_params` (masked, straight-through), so the
    gradient w.r.t. `params` is the dense gradient that RigL/SNIP use at update steps."""

    def loss_fn(params, state: TrainState, batch, rng):
        fwd_params = params
        if sparsity_method is not None:
            fwd_params = sparsity_method.forward_params(params, state.sparsity, step=state.step,
                                                        rng=rng)
        logits, mutated = model.apply(
            model_variables(fwd_params, state.moe_state), batch["inputs"], batch["positions"],
            batch["segment_ids"], deterministic=False, rngs={"router": rng, "dropout": rng}, mutable=MUTABLE)
        loss_sum, count = cross_entropy(logits, batch["targets"], batch["loss_mask"])
        loss = loss_sum / jnp.maximum(count, 1.0)
        aux = sum((jnp.sum(jnp.asarray(v, jnp.float32)) for v in
                   jax.tree.leaves(mutated.get("aux_loss", {}))), jnp.float32(0))
        if sparsity_method is not None:
            aux = aux + sparsity_method.regularizer(params, state.sparsity, step=state.step)
        return loss + aux, (loss, aux, mutated)

    return loss_fn


def step_rng(state: TrainState) -> jax.Array:
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    lr_schedule: Callable[[Any], Any] | None = None,
                    sparsity_method: Any = None) -> Callable:
    """Builds train_step(state, batch) -> (state, metrics).

    A step whose loss or gradient is not finite leaves params, optimizer, sparsity and MoE state
    unchanged (the step counter still advances past the bad batch) and reports `nonfinite=1`.
    """
    loss_fn = make_loss_fn(model, sparsity_method)

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, (loss, aux, mutated)), grads = grad_fn(state.params, state, batch, step_rng(state))
        sparsity = state.sparsity
        if sparsity_method is not None:
            grads, sparsity = sparsity_method.on_grads(state.params, sparsity, grads,
                                                       step=state.step)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(aux)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = state.replace(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            sparsity=keep(sparsity, state.sparsity),
            moe_state=keep(mutated.get("moe_state", state.moe_state), state.moe_state),
        )
        metrics = {"loss": loss, "aux_loss": aux, "grad_norm": grad_norm,
                   "nonfinite": (~finite).astype(jnp.int32)}
        if lr_schedule is not None:
            metrics["learning_rate"] = lr_schedule(state.step)
        metrics.update(flatten_sown(mutated.get("metrics", {}), "model"))
        return new_state, metrics

    return train_step


def make_eval_step(model: nn.Module, sparsity_method: Any = None) -> Callable:
    """eval_step(state, batch) -> {'loss_sum', 'count'} summed over the global batch."""

    def eval_step(state: TrainState, batch):
        params = state.params
        if sparsity_method is not None:
            params = sparsity_method.forward_params(params, state.sparsity, step=state.step,
                                                    rng=None)
        logits = model.apply(model_variables(params, state.moe_state), batch["inputs"],
                             batch["positions"], batch["segment_ids"], deterministic=True)
        loss_sum, count = cross_entropy(logits, batch["targets"], batch["loss_mask"])
        return {"loss_sum": loss_sum, "count": count}

    return eval_step
