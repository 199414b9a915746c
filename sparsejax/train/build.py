"""Builds everything a run needs before its first step: mesh, model, optimizer, sparsity
method, the abstract TrainState and its shardings (`build_run`). All validation happens here,
before anything compiles."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax.data.sources import check_dataset
from sparsejax.data.tokenizer import make_tokenizer
from sparsejax.models.formats import WEIGHT_FORMATS
from sparsejax.models.layer_stack import unstack_layers
from sparsejax.models.moe.expert_parallel import expert_axis_size
from sparsejax.models.transformer import ModelConfig, Transformer, padded_params
from sparsejax.parallel import mesh as mesh_lib
from sparsejax.parallel.rules import (LOGICAL_RULES, batch_sharding, logical_shardings,
                                      replicated, shardings_like)
from sparsejax.sparsity.activation.regularizer import make_activation_regularizer
from sparsejax.sparsity.method import CompactProjection, RunInfo, SparsityMethod, make_method
from sparsejax.models.formats import convert, is_layout_leaf
from sparsejax.sparsity.layout import LAYOUT, for_formats, stored_density
from sparsejax.sparsity.method import density_metrics
from sparsejax.sparsity.stacked import for_layout
from sparsejax.train import optim
from sparsejax.train.accumulate import check_microbatches
from sparsejax.train.state import TrainState
from sparsejax.train.step import make_sparsity_update

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
    cfg: Any
    model_config: ModelConfig
    mesh: jax.sharding.Mesh
    model: Transformer
    tx: optax.GradientTransformationExtraArgs  # the method's wrapped optimizer
    lr_schedule: Callable
    sparsity_method: SparsityMethod
    abstract_state: Any  # TrainState of ShapeDtypeStructs with shardings
    state_shardings: Any
    abstract_model_params: Any  # the model's params (before the sparsity method), with shardings
    _init: Callable
    act_regularizer: Any = None  # ActivationRegularizer (sparsity/activation/regularizer.py)

    def init_state(self, model_params: Any = None) -> TrainState:
        """A fresh TrainState; with `model_params` (sharded like `abstract_model_params`)
        those replace the random init, and the method's masks are chosen from them."""
        return self._init(model_params)

    def sparsity_update_fn(self):
        """Jitted (state, batch) -> (state, metrics) for mask updates (the state is donated
        unless the method shrinks layouts: a buffer of another shape cannot be reused)."""
        return jax.jit(make_sparsity_update(self.model, self.sparsity_method,
                                            self.cfg.microbatches, self.act_regularizer),
                       in_shardings=(self.state_shardings, batch_sharding(self.mesh)),
                       out_shardings=(self.state_shardings, replicated(self.mesh)),
                       donate_argnums=() if self.sparsity_method.resizes else (0,))

    def layer_density_fn(self):
        """Jitted state -> overall and per-layer mask densities ('sparsity/density/<path>'),
        replicated; logged at step 0 so density plots start at the first step. Compact
        weights without masks: the stored fraction (the method's 'sparsity/density')."""
        method = self.sparsity_method

        def densities(s):
            # per layer also when the layers are scanned (the names the mask updates log)
            out = density_metrics(unstack_layers(s.sparsity.get("masks")), method.valid)
            if s.sparsity.get("masks") is None and LAYOUT in s.sparsity:
                out["sparsity/density"] = method.metrics(s.params, s.sparsity)["sparsity/density"]
            return out

        return jax.jit(densities, in_shardings=(self.state_shardings,),
                       out_shardings=replicated(self.mesh))


def strip_boxes(tree: Any) -> Any:
    """Removes logical-partitioning boxes without adding sharding constraints."""
    return jax.tree.map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x, tree,
                        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def validate(cfg, model_config: ModelConfig, mesh) -> None:
    """Fails fast with ValueErrors that name the setting, the value and what is valid."""
    dp = mesh_lib.data_parallel_size(mesh)
    if cfg.global_batch_size % dp:
        raise ValueError(
            f"TrainConfig.global_batch_size={cfg.global_batch_size} is not divisible by the "
            f"data-parallel size {dp} (mesh {dict(mesh.shape)}: data*fsdp*expert); use a "
            f"multiple of {dp}")
    if cfg.global_batch_size % jax.process_count():
        raise ValueError(f"TrainConfig.global_batch_size={cfg.global_batch_size} is not divisible "
                         f"by the process count {jax.process_count()}")
    check_microbatches(cfg.microbatches, cfg.global_batch_size, dp)
    if cfg.seq_len > model_config.max_seq_len:
        raise ValueError(f"TrainConfig.seq_len={cfg.seq_len} exceeds ModelConfig.max_seq_len="
                         f"{model_config.max_seq_len}; use seq_len <= {model_config.max_seq_len}")
    vocab = make_tokenizer().vocab_size
    if model_config.vocab_size < vocab:
        raise ValueError(f"ModelConfig.vocab_size={model_config.vocab_size} is smaller than the "
                         f"tokenizer's vocabulary ({vocab}; make_tokenizer)")
    check_dataset(cfg.dataset, cfg.data_dir)
    for name in model_config.formats().names:
        WEIGHT_FORMATS.get(name)().check_mesh(dict(mesh.shape))


def build_run(cfg, model_config: ModelConfig | None = None,
              mesh: jax.sharding.Mesh | None = None) -> Run:
    """Builds the run; `model_config` and `mesh` default to their gin-configured values."""
    model_config = model_config or ModelConfig()
    mesh = mesh or mesh_lib.make_mesh()
    validate(cfg, model_config, mesh)
    model = Transformer(model_config)
    base_tx = optim.make_optimizer(total_steps=cfg.num_steps)
    lr_schedule = optim.learning_rate_schedule(total_steps=cfg.num_steps)
    dummy = jnp.zeros((1, min(cfg.seq_len, model_config.max_seq_len)), jnp.int32)
    compact = compact_projections(model_config)
    if compact:  # a block layout's rounding and its one-block floor can move it off the target
        log.info("compact weight formats: %d projections store %.4f of their dense weights",
                 len(compact), stored_density(compact))
    method = for_formats(for_layout(make_method().bind(RunInfo(
        num_steps=cfg.num_steps, valid=padded_params(model_config), compact=compact)),
        model_config), model_config)
    act_regularizer = make_activation_regularizer().bind(cfg.num_steps)
    check_regularizer_mesh(act_regularizer, model_config, mesh)

    def init_variables(key):
        return model.init({"params": key, "router": key, "dropout": key}, dummy)

    def make_state(seed_key, model_params=None):
        params_key, rng_key, mask_key = jax.random.split(seed_key, 3)
        variables = nn.meta.unbox(init_variables(params_key))
        if model_params is not None:  # e.g. an imported checkpoint's params
            variables = {**variables, "params": model_params}
        params, sparsity = method.init(variables["params"], mask_key)
        tx = method.wrap_optimizer(base_tx)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=jax.random.key_data(rng_key), sparsity=sparsity,
                          moe_state=variables.get("moe_state") or None)

    seed_key = jax.random.key(cfg.seed)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        boxed_vars = jax.eval_shape(init_variables, seed_key)
        param_shardings = logical_shardings(boxed_vars["params"], mesh)
        check_divisible(strip_boxes(boxed_vars["params"]), param_shardings)
        abstract = jax.eval_shape(make_state, seed_key)
        shardings = shardings_like(abstract, strip_boxes(boxed_vars["params"]), param_shardings,
                                   mesh)
        abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        abstract_model_params = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            strip_boxes(boxed_vars["params"]), param_shardings)
        init = jax.jit(make_state, out_shardings=shardings)

    def init_state(model_params=None):
        return init(seed_key) if model_params is None else init(seed_key, model_params)

    tx = method.wrap_optimizer(base_tx)
    return Run(cfg, model_config, mesh, model, tx, lr_schedule, method, abstract_state,
               shardings, abstract_model_params, init_state, act_regularizer)


def check_divisible(params: Any, shardings: Any) -> None:
    """Every sharded param dimension splits evenly over its mesh axes (else a ValueError that
    names the param, rather than an error from deep inside XLA)."""
    for (path, x), sh in zip(jax.tree_util.tree_leaves_with_path(params),
                             jax.tree.leaves(shardings)):
        for dim, axes in enumerate(getattr(sh, "spec", ())):
            names = (axes,) if isinstance(axes, str) else tuple(axes or ())
            parts = int(np.prod([sh.mesh.shape[a] for a in names])) if names else 1
            if x.shape[dim] % parts:
                raise ValueError(
                    f"param {jax.tree_util.keystr(path)} {tuple(x.shape)}: dimension {dim} "
                    f"({x.shape[dim]}) does not split over mesh axes {names} ({parts} ways); "
                    f"use a mesh whose {'*'.join(names)} divides it (make_mesh), or other "
                    f"block sizes for a compact format")


def compact_projections(model_config: ModelConfig) -> dict:
    """{projection path: CompactProjection} of the projections in a compact weight format,
    per layer (RunInfo.compact): each one's dense shape (formats/convert.py finds them against
    the all-dense twin) and the weight entries its format stores, from abstract params of
    the unscanned model (no arrays are made)."""
    if model_config.formats().all_dense:
        return {}
    per_layer = dataclasses.replace(model_config, scan_layers=False)
    flat = convert.abstract_params(per_layer)
    out = {}
    for owner, proj in convert.compact_projections(per_layer).items():
        stored = sum(flat[f"{owner}/{name}"].size for name in proj.own
                     if not is_layout_leaf(flat[f"{owner}/{name}"]))
        out[owner] = CompactProjection(*proj.shape[-2:], stored)
    return out


def check_regularizer_mesh(regularizer: Any, model_config: ModelConfig, mesh) -> None:
    """Expert-parallel MoE layers run their experts inside shard_map, where they cannot sow
    the activations an activation regularizer needs: refused rather than left out."""
    moe = any(model_config.mlp_kind(i) == "moe" for i in range(model_config.num_layers))
    if regularizer.active and moe and expert_axis_size(mesh) > 1:
        raise ValueError(f"make_activation_regularizer.name={type(regularizer).__name__!r} needs "
                         f"the MoE layers' activations, which expert parallelism (mesh 'expert' "
                         f"axis {expert_axis_size(mesh)}) does not expose; use a mesh without "
                         f"an expert axis (make_mesh) or no activation regularizer")
