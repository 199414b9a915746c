"""Pure train and mask-update steps: (state, batch) -> (state, metrics). Jitted by the
trainer with explicit shardings; nothing here does I/O. Every step drives the run's sparsity
method (`DenseMethod` for dense training), so none of them has a dense special case."""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from sparsejax.models.act_record import STATS
from sparsejax.models.layer_stack import layer_period, unstack_layers
from sparsejax.sparsity.method import SparsityMethod
from sparsejax.train.accumulate import make_grad_fn
from sparsejax.train.state import TrainState

MUTABLE = ["aux_loss", "metrics", "moe_state", "moe_counts"]


def flatten_sown(tree: Any, prefix: str) -> dict[str, jax.Array]:
    """Flattens a sown collection ({'layer_0': {'moe': {'load': (v,)}}}) into
    {'prefix/layer_0/moe/load': v}; values sown several times are averaged."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, tuple))[0]:
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        vals = leaf if isinstance(leaf, tuple) else (leaf,)
        out[f"{prefix}/{name}"] = sum(jnp.asarray(v, jnp.float32) for v in vals) / len(vals)
    return out


def sown_metrics(model: nn.Module, mutated: dict) -> dict[str, jax.Array]:
    """The model's sown metrics as {'model/layer_0/moe/expert_load': v}, per layer also when
    the layers are scanned (their metrics are stacked along the scanned axis)."""
    tree = mutated.get("metrics", {})
    cfg = getattr(model, "config", None)
    if getattr(cfg, "scan_layers", False):
        tree = unstack_layers(tree, layer_period(cfg))
    return flatten_sown(tree, "model")


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


def make_loss_fn(model: nn.Module, method: SparsityMethod, act_regularizer: Any = None) -> Callable:
    """loss_fn(params, state, batch, rng, extra_variables=None) -> (loss + aux losses,
    (loss, aux, mutated)); `extra_variables`: more model collections (gradient accumulation
    passes the global batch's expert counts, 'moe_counts').

    The model sees the method's `forward_params`, so the gradient w.r.t. `params` is the dense
    gradient that RigL/SNIP use at update steps. An active `act_regularizer`
    (sparsity/activation/regularizer.py) adds its penalty on the sown MLP activations; its
    metrics join the model's ('model/act_reg/...')."""
    regularize = act_regularizer is not None and act_regularizer.active
    mutable = MUTABLE + [STATS] if regularize else MUTABLE

    def loss_fn(params, state: TrainState, batch, rng, extra_variables=None):
        fwd_params = method.forward_params(params, state.sparsity, step=state.step, rng=rng)
        logits, mutated = model.apply(
            {**model_variables(fwd_params, state.moe_state), **(extra_variables or {})},
            batch["inputs"], batch["positions"],
            batch["segment_ids"], deterministic=False, rngs={"router": rng, "dropout": rng}, mutable=mutable)
        loss_sum, count = cross_entropy(logits, batch["targets"], batch["loss_mask"])
        loss = loss_sum / jnp.maximum(count, 1.0)
        aux = sum((jnp.sum(jnp.asarray(v, jnp.float32)) for v in
                   jax.tree.leaves(mutated.get("aux_loss", {}))), jnp.float32(0))
        aux = aux + method.regularizer(params, state.sparsity, step=state.step)
        if regularize:
            mutated = dict(mutated)
            penalty, reg_metrics = act_regularizer.loss(mutated.pop(STATS, {}), batch["segment_ids"],
                                                        state.step)
            aux = aux + penalty
            mutated["metrics"] = {**mutated.get("metrics", {}), "act_reg": reg_metrics}
        return loss + aux, (loss, aux, mutated)

    return loss_fn


def step_rng(state: TrainState) -> jax.Array:
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def make_train_step(model: nn.Module, tx: optax.GradientTransformationExtraArgs,
                    method: SparsityMethod, lr_schedule: Callable[[Any], Any] | None = None,
                    microbatches: int = 1, act_regularizer: Any = None) -> Callable:
    """Builds train_step(state, batch) -> (state, metrics). `tx` is the method's wrapped
    optimizer (`method.wrap_optimizer`), which reads the masks from `sparsity=`.
    `microbatches` > 1 accumulates the gradient over that many micro-batches of the batch
    (train/accumulate.py); the method, the guard below and the metrics see the whole step.

    A step whose loss or gradient is not finite leaves params, optimizer, sparsity and MoE state
    unchanged (the step counter still advances past the bad batch) and reports `nonfinite=1`.
    """
    grad_fn = make_grad_fn(make_loss_fn(model, method, act_regularizer), microbatches)

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        loss, aux, mutated, grads = grad_fn(state.params, state, batch, step_rng(state))
        grads, sparsity = method.on_grads(state.params, state.sparsity, grads, step=state.step)
        updates, opt_state = tx.update(grads, state.opt_state, state.params, sparsity=sparsity)
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
        metrics.update(sown_metrics(model, mutated))
        return new_state, metrics

    return train_step


def make_sparsity_update(model: nn.Module, method: SparsityMethod,
                         microbatches: int = 1, act_regularizer: Any = None) -> Callable:
    """update(state, batch) -> (state, metrics): new masks (and pruned/grown params, reset
    optimizer slots) for the method's schedule at `state.step`. Jitted on its own and run only
    at the method's update steps, so RigL's dense gradient costs nothing on ordinary steps;
    that gradient is accumulated over `microbatches` like the train step's."""
    grad_fn = make_grad_fn(make_loss_fn(model, method, act_regularizer), microbatches)

    def update(state: TrainState, batch):
        rng = jax.random.fold_in(step_rng(state), 1)
        grads = None
        if method.needs_dense_grads:
            params, sparsity = method.grad_view(state.params, state.sparsity)
            grads = grad_fn(params, state.replace(sparsity=sparsity), batch, rng)[3]
        params, opt_state, sparsity, metrics = method.update(
            state.params, state.opt_state, state.sparsity, step=state.step, rng=rng, grads=grads)
        return state.replace(params=params, opt_state=opt_state, sparsity=sparsity), metrics

    return update
