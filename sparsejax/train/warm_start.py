"""Start a new run from another run's parameters: sparse upcycling (dense MLP -> MoE experts),
a plain parameter copy (e.g. dense fine-tuning of a sparse pre-trained model), or the params
that `sparsejax import-hf` put in the workdir (`init_from_pretrained`; another run starts
from them with `from_workdir` as from a checkpoint).

A plain copy with `convert_formats=True` also converts the source's dense projections to
the weight format of the target's (models/formats/): Monarch by its Frobenius projection,
block-sparse exactly when the kernel's nonzero blocks fit the target's layout and otherwise
by keeping the largest-norm blocks (`BlockSparse.from_dense(project=True)`)."""
from __future__ import annotations

import logging
import os
from typing import Any

from flax import traverse_util
import gin
import jax
import numpy as np
import orbax.checkpoint as ocp

from sparsejax.models.formats import WEIGHT_FORMATS, format_of
from sparsejax.models.layer_stack import (layout_like, stacked_period, unstack_abstract,
                                          unstack_layers)
from sparsejax.models.moe.upcycle import upcycle_params
from sparsejax.parallel.rules import path_str
from sparsejax.sparsity.layout import LAYOUT, merge_layout, split_layout
from sparsejax.train.checkpoint import restore_numpy, restore_state_numpy
from sparsejax.train.workdir import PRETRAINED_CONFIG, PRETRAINED_DIR, has_pretrained
from sparsejax.train.state import TrainState

MODES = ("upcycle", "params")
log = logging.getLogger(__name__)


def restore_params(workdir: str) -> tuple[int, Any]:
    """(step, params as numpy arrays) of the latest checkpoint in `workdir`; (0, the imported
    params) when `sparsejax import-hf` wrote the workdir and no run has checkpointed there."""
    try:
        step, state = restore_state_numpy(workdir)
    except ValueError as e:  # no checkpoint in the workdir
        if has_pretrained(workdir):
            return 0, restore_numpy(os.path.join(os.path.abspath(workdir),
                                                 PRETRAINED_DIR))["params"]
        raise ValueError(f"warm_start.from_workdir: {e}") from None
    return step, state["params"]


@gin.configurable(denylist=["resumed"])
def warm_start(state: TrainState, param_shardings: Any, from_workdir: str | None = None,
               mode: str = "upcycle", convert_formats: bool = False, *,
               resumed: bool = False) -> TrainState:
    """Replaces the freshly initialized params of `state` with ones built from the latest
    checkpoint of `from_workdir` (no-op when it is None). Optimizer state stays fresh.

    `convert_formats` (mode='params'): each dense projection of the source whose target
    projection has another weight format becomes that format's `from_dense` of the kernel
    (see the module doc); a block-sparse layout chosen so replaces the target's.

    Called on every start; a resumed run (`resumed`) keeps its restored state, since it
    started from `from_workdir` already."""
    if mode not in MODES:
        raise ValueError(f"warm_start.mode={mode!r} is unknown; valid: {MODES}")
    if not isinstance(convert_formats, bool):
        raise ValueError(f"warm_start.convert_formats={convert_formats!r} must be True or False")
    if convert_formats and mode != "params":
        raise ValueError(f"warm_start.convert_formats=True converts a plain copy of the params: "
                         f"it needs warm_start.mode='params', not {mode!r}")
    if from_workdir is None or resumed:
        return state
    _, source = restore_params(from_workdir)
    stacked_template = jax.device_get(state.params)
    # Both runs' params in the per-layer layout, whether either scans its layers.
    source, template = unstack_layers(source), unstack_layers(stacked_template)
    sparsity = state.sparsity
    if convert_formats:
        stacked_layout = (jax.device_get(sparsity[LAYOUT])
                          if isinstance(sparsity, dict) and sparsity.get(LAYOUT) else None)
        full = merge_layout(template, unstack_layers(stacked_layout) if stacked_layout else None)
        source, layout = split_layout(convert_to_formats(source, full))
        if stacked_layout:
            shardings = jax.tree.map(lambda x: x.sharding, sparsity[LAYOUT])
            layout = jax.device_put(layout_like(layout, stacked_layout), shardings)
            sparsity = {**sparsity, LAYOUT: layout}
    if mode == "upcycle":
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
    return state.replace(params=jax.device_put(params, param_shardings), sparsity=sparsity)


def _dense_kernel(node: Any) -> Any:
    """The [in, out] kernel of a dense projection's params (attention keeps its dense
    kernels as arrays of the attention module; `layers.dense` as {'kernel'[, 'bias']}),
    else None."""
    if isinstance(node, dict) and format_of(node) == "dense":
        return node["kernel"]
    return node if getattr(node, "ndim", None) == 2 else None


def convert_to_formats(source: Any, template: Any, path: str = "") -> Any:
    """`source` (per-layer params) with every dense projection whose counterpart in `template`
    (complete per-layer params, integer layouts included) has another format replaced by
    that format's params from `from_dense` (its settings: the run's gin bindings). A bias
    is copied. Everything else is returned as is (the caller compares shapes)."""
    if not isinstance(template, dict):
        return source
    name = format_of(template)
    kernel = _dense_kernel(source) if name not in (None, "dense") else None
    if kernel is not None:
        fmt = WEIGHT_FORMATS.get(name)()
        kernel = np.asarray(kernel)
        converted = (_block_sparse_from_dense(fmt, kernel, template) if name == "block_sparse"
                     else fmt.from_dense(kernel))
        error = np.linalg.norm(np.asarray(fmt.to_dense(converted, kernel.shape[0])) - kernel)
        log.info("warm start: %s dense %s -> %s, relative Frobenius error %.3f", path,
                 kernel.shape, name, error / max(np.linalg.norm(kernel), 1e-30))
        if isinstance(source, dict) and "bias" in source:
            converted["bias"] = source["bias"]
        return converted
    if not isinstance(source, dict):
        return source
    return {k: convert_to_formats(v, template[k], f"{path}/{k}".lstrip("/"))
            if k in template else v for k, v in source.items()}


def _block_sparse_from_dense(fmt: Any, kernel: np.ndarray, template: dict) -> dict:
    """Exact when the kernel's nonzero blocks are a layout of the target's shape, else the
    target's number of largest-norm blocks per column (the rest dropped)."""
    try:
        out = fmt.from_dense(kernel)
        if out["values"].shape == template["values"].shape:
            return out
    except ValueError:
        pass
    return fmt.at(template["values"].shape[-3]).from_dense(kernel, project=True)


def _flat(tree):
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
