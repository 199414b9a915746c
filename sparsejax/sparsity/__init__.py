"""Sparsity library: masks, distributions, schedules, pruning/growth algorithms,
N:M sparsity (SR-STE, learnable masks), an optax wrapper and sparse fine-tuning.

Trainer protocol
----------------
A method is chosen by gin (``make_method.name`` picks a registered class; the presets under
configs/sparsity/ bind one and its parts) and driven with these calls; ``sparsity`` is the
method's state pytree (a dict), kept in the TrainState's ``sparsity`` field and checkpointed
with it. Its ``masks`` entry is bool arrays shaped like the params (``None`` for params never
pruned), so it can use the params' shardings; it is the only copy of the masks::

    method = make_method()                           # gin: make_method.name = 'masked_pruning'
    method.bind(RunInfo(num_steps=N))                # resolves fractions of the run
    params, sparsity = method.init(params, rng)      # may prune params or add keys
    tx = method.wrap_optimizer(tx)                   # keeps pruned weights exactly zero
    opt_state = tx.init(params)

    def loss_fn(params, sparsity, batch, step, rng):           # inside jit
        eff = method.forward_params(params, sparsity, step=step, rng=rng)
        loss = model_loss(model.apply({"params": eff}, batch))
        return loss + method.regularizer(params, sparsity, step=step)

    def train_step(params, opt_state, sparsity, batch, step, rng):   # jitted
        grads = jax.grad(loss_fn)(params, sparsity, batch, step, rng)
        grads, sparsity = method.on_grads(params, sparsity, grads, step=step)
        updates, opt_state = tx.update(grads, opt_state, params, sparsity=sparsity)
        return optax.apply_updates(params, updates), opt_state, sparsity

    update = jax.jit(method.update)                  # its own jitted function
    for step in range(num_steps):
        if method.is_update_step(step):              # host int; BEFORE the train step
            g = (jax.grad(loss_fn)(params, sparsity, batch, step, rng)
                 if method.needs_dense_grads else None)
            params, opt_state, sparsity, metrics = update(
                params, opt_state, sparsity, step=step, rng=rng, grads=g)
            # metrics: sparsity/density, sparsity/density/<param path>, sparsity/churn
        params, opt_state, sparsity = train_step(params, opt_state, sparsity, batch, step, rng)

    method.metrics(params, sparsity)    # density, running average density / param count
    final = method.finalize(params, sparsity)       # model params, hard masks applied

Extension points, each a registry of its own (``sparsejax list`` prints them):
``METHODS``, ``CRITERIA`` (criteria/), ``SCHEDULES``, ``STRUCTURES``, ``DISTRIBUTIONS``.

Notes:
  * ``forward_params`` of mask methods returns the params as they are (pruned entries are
    exactly zero), so ``jax.grad`` of the loss w.r.t. ``params`` is the dense gradient
    RigL/SNIP need; the wrapped optimizer zeroes the masked gradient entries and updates.
  * ``rng`` in ``forward_params`` may be None (eval): learned N:M then uses the
    hard mask instead of Gumbel-softmax samples.
  * Learned N:M (``LearnedNMMethod``) adds its mask logits to ``params`` under the
    top-level key ``nm_mask_logits`` (a tree mirroring the model params, None
    where not pruned; logits of a kernel have shape ``moveaxis(kernel, -2, -1)``
    with the last dim d split into ``[d // M, C(M, N)]``). ``forward_params`` and
    ``finalize`` return params without that key, so the trainer differentiates
    w.r.t. ``params`` as usual and the optimizer trains the logits.
  * Sparse fine-tuning (``SparseFinetuneMethod``) masks mean "trainable"; frozen
    entries keep their base values. ``method.export_diff(params, sparsity)``
    gives the sparse difference; ``apply_diffs(base, [d1, d2])`` composes them.
  * Params padded for sharding (``RunInfo.valid``: the LM head's vocab columns) are never
    kept and never counted in densities or parameter counts.
"""
from sparsejax.sparsity.block_dst import BlockDSTMethod
from sparsejax.sparsity.block_gmp import BlockGMPMethod
from sparsejax.sparsity.criteria import CRITERIA, Criterion
from sparsejax.sparsity.distributions import (DISTRIBUTIONS, erdos_renyi_densities, layer_densities,
                                              mean_density)
from sparsejax.sparsity.finetune import SparseFinetuneMethod, apply_diffs, most_changed_masks, sparse_diff
from sparsejax.sparsity.masks import (apply_masks, average_param_count, flops_per_token, mask_churn,
                                      nnz, ones_masks, overall_density, param_count)
from sparsejax.sparsity.masks import layer_densities as mask_layer_densities
from sparsejax.sparsity.method import METHODS, DenseMethod, RunInfo, SparsityMethod, make_method
from sparsejax.sparsity.nm import nm_mask
from sparsejax.sparsity.nm_methods import LOGITS_KEY, LearnedNMMethod, SRSTEMethod
from sparsejax.sparsity.optim import masked_optimizer, reset_slots
from sparsejax.sparsity.paths import DEFAULT_EXCLUDE, prunable_tree
from sparsejax.sparsity.pruning import MaskedPruningMethod
from sparsejax.sparsity.schedules import (SCHEDULES, AverageDensitySchedule, ConstantSchedule,
                                          DenseSchedule, DropGrowSchedule, OneShotSchedule,
                                          PolynomialSchedule, SparseThenDenseSchedule,
                                          realized_average_density, solve_final_density,
                                          solve_start_step)
from sparsejax.sparsity.structures import STRUCTURES, BlockStructure, NMStructure, Structure

__all__ = [
    "AverageDensitySchedule", "BlockDSTMethod", "BlockGMPMethod", "BlockStructure", "CRITERIA", "ConstantSchedule", "Criterion",
    "DEFAULT_EXCLUDE", "DISTRIBUTIONS", "DenseMethod", "DenseSchedule", "DropGrowSchedule",
    "LOGITS_KEY", "LearnedNMMethod", "METHODS", "MaskedPruningMethod", "NMStructure",
    "OneShotSchedule", "PolynomialSchedule", "RunInfo", "SCHEDULES", "SRSTEMethod", "STRUCTURES",
    "SparseFinetuneMethod", "SparseThenDenseSchedule", "SparsityMethod", "Structure",
    "apply_diffs", "apply_masks", "average_param_count", "erdos_renyi_densities",
    "flops_per_token", "layer_densities", "make_method", "mask_churn", "mask_layer_densities",
    "masked_optimizer", "mean_density", "most_changed_masks", "nm_mask", "nnz", "ones_masks",
    "overall_density", "param_count", "prunable_tree", "realized_average_density", "reset_slots",
    "solve_final_density", "solve_start_step", "sparse_diff",
]
