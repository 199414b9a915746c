"""Start a new run from another run's parameters: sparse upcycling (dense MLP -> MoE experts),
a plain parameter copy (e.g. dense fine-tuning of a sparse pre-trained model), or the params
that `sparsejax import-hf` put in the workdir (`init_from_pretrained`)."""
from __future__ import annotations

import os
from typing import Any

import gin
import jax

from sparsejax.models.layer_stack import (layout_like, stacked_period, unstack_abstract,
                                          unstack_layers)
from sparsejax.train.checkpoint import restore_state_numpy
from sparsejax.train.workdir import PRETRAINED_CONFIG, PRETRAINED_DIR, has_pretrained
from sparsejax.train.state import TrainState

MODES = ("upcycle", "params")


def restore_params(workdir: str) -> tuple[int, Any]:
    """(step, params as numpy arrays) of the latest checkpoint in `workdir`."""
    try:
        step, state = restore_state_numpy(workdir)
    except ValueError as e:
        raise ValueError(f"warm_start.from_workdir: {e}") from None
    return step, state["params"]


@gin.configurable(denylist=["resumed"])
def warm_start(state: TrainState, param_shardings: Any, from_workdir: str | None = None,
               mode: str = "upcycle", *, resumed: bool = False) -> TrainState:
    """Replaces the freshly initialized params of `state` with ones built from the latest
    checkpoint of `from_workdir` (no-op when it is None). Optimizer state stays fresh.

    Called on every start; a resumed run (`resumed`) keeps its restored state, since it
    started from `from_workdir` already."""
    if mode not in MODES:
        raise ValueError(f"warm_start.mode={mode!r} is unknown; valid: {MODES}")
    if from_workdir is None or resumed:
        return state
    _, source = restore_params(from_workdir)
    stacked_template = jax.device_get(state.params)
    # Both runs' params in the per-layer layout, whether either scans its layers.
    source, template = unstack_layers(source), unstack_layers(stacked_template)
    if mode == "upcycle":
        from sparsejax.models.moe.upcycle import upcycle_params
        # routers (and Drop-Upcycling's re-drawn dimensions) depend on the run's seed
        rng = jax.random.fold_in(jax.random.wrap_key_data(jax.device_get(state.rng)), 7)
        params = upcycle_params(source, template, rng)
    else:
        src = {"/".join(map(str, k)): v.shape for k, v in _flat(source)}
        dst = {"/".join(map(str, k)): v.shape for k, v in _flat(template)}
        if src != dst:
            bad = sorted(set(src.items()) ^ set(dst.items()))[:3]
            raise ValueError(f"warm_start.from_workdir={from_workdir!r} has params of another "
                             f"shape (e.g. {bad}); mode='params' needs the same model")
        params = source
    params = jax.tree.map(lambda p, t: p.astype(t.dtype), params, template)
    params = layout_like(params, stacked_template)
    return state.replace(params=jax.device_put(params, param_shardings))


def _flat(tree):
    from flax import traverse_util
    return traverse_util.flatten_dict(tree).items()


def restore_pretrained(workdir: str, abstract_params: Any) -> Any:
    """The imported params of `workdir`, restored straight into their shardings (each process
    reads its own slices). Shape mismatches with the configured model name the param.
    Imports hold per-layer params; a model with scanned layers gets them stacked."""
    if stacked_period(abstract_params) is not None:
        per_layer = restore_pretrained(workdir, unstack_abstract(abstract_params))
        shardings = jax.tree.map(lambda x: x.sharding, abstract_params)
        return jax.jit(lambda p: layout_like(p, abstract_params), out_shardings=shardings)(
            per_layer)
    import orbax.checkpoint as ocp
    from sparsejax.parallel.rules import path_str
    path = os.path.join(os.path.abspath(workdir), PRETRAINED_DIR)
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(path)
        meta = getattr(meta, "item_metadata", meta)
        have = {path_str(p): tuple(x.shape) for p, x in
                jax.tree_util.tree_leaves_with_path(meta["params"])}
        want = {path_str(p): tuple(x.shape) for p, x in
                jax.tree_util.tree_leaves_with_path(abstract_params)}
        bad = [f"{k}: imported {have.get(k, 'missing')} vs model {v}" for k, v in want.items()
               if have.get(k) != v] + [f"{k}: imported, not in the model" for k in have
                                       if k not in want]
        if bad:
            raise ValueError(f"workdir {workdir!r} holds imported params of another model "
                             f"({'; '.join(bad[:3])}); keep the bindings of its "
                             f"{PRETRAINED_CONFIG}")
        return ckptr.restore(path, {"params": abstract_params})["params"]


def init_from_pretrained(run: Any, workdir: str) -> TrainState:
    """A fresh TrainState whose params are the imported ones when `workdir` holds them (the
    sparsity method's masks and the optimizer state are built from those params), else the
    random init. Call under the run's mesh and logical-axis rules."""
    if not has_pretrained(workdir):
        return run.init_state()
    return run.init_state(restore_pretrained(workdir, run.abstract_model_params))
