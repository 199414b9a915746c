"""Compact weight formats under any sparsity method: the formats' integer params (a
block-sparse projection's `indices`) are structure, kept in the method state.

A format such as `block_sparse` (models/formats/) declares its layout as int32 params, so
the model's init returns them with the weights. They are never differentiated nor touched by
the optimizer: `FormatLayoutMethod` moves them to `sparsity['layout']` at init (the inner
method and the optimizer see the float weights only) and merges them back wherever the model
runs (`forward_params`, `finalize`). A method that changes the layout (block DST) returns a
new `sparsity['layout']` from its `update`; any other method passes it through unchanged.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp

from sparsejax.models.formats import is_layout_leaf
from sparsejax.sparsity.method import CompactProjection, MethodWrapper, SparsityMethod

PyTree = Any
LAYOUT = "layout"


def split_layout(params: PyTree) -> tuple[PyTree, PyTree]:
    """(weights, layout): nested dicts, the integer leaves taken out into `layout`, which
    holds only them (under the same paths)."""
    if not isinstance(params, dict):
        return params, None
    weights, layout = {}, {}
    for k, v in params.items():
        if isinstance(v, dict):
            w, lay = split_layout(v)
            weights[k] = w
            if lay:
                layout[k] = lay
        elif is_layout_leaf(v):
            layout[k] = v
        else:
            weights[k] = v
    return weights, layout


def merge_layout(weights: PyTree, layout: PyTree) -> PyTree:
    """The inverse of `split_layout`."""
    if not layout:
        return weights
    out = dict(weights)
    for k, v in layout.items():
        out[k] = merge_layout(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


class FormatLayoutMethod(MethodWrapper):
    """`inner` on the weights of a model whose formats have integer layouts (see module doc)."""

    def init(self, params, rng):
        weights, layout = split_layout(params)
        p, s = self.inner.init(weights, rng)
        return p, {**s, LAYOUT: layout}

    def wrap_optimizer(self, tx):
        return self.inner.wrap_optimizer(tx)

    def forward_params(self, params, sparsity, *, step=0, rng=None):
        return merge_layout(self.inner.forward_params(params, sparsity, step=step, rng=rng),
                            sparsity[LAYOUT])

    def regularizer(self, params, sparsity, *, step=0):
        return self.inner.regularizer(params, sparsity, step=step)

    def on_grads(self, params, sparsity, grads, *, step=0):
        g, s = self.inner.on_grads(params, sparsity, grads, step=step)
        return g, {**s, LAYOUT: s.get(LAYOUT, sparsity[LAYOUT])}

    def grad_view(self, params, sparsity):
        return self.inner.grad_view(params, sparsity)

    def update(self, params, opt_state, sparsity, *, step, rng=None, grads=None):
        p, o, s, m = self.inner.update(params, opt_state, sparsity, step=step, rng=rng,
                                       grads=grads)
        s = {**s, LAYOUT: s.get(LAYOUT, sparsity[LAYOUT])}
        if s.get("masks") is None and not self.inner.resizes:
            m = {**m, "sparsity/density": jnp.float32(
                stored_density(self.run.compact))}
        return p, o, s, m

    def metrics(self, params, sparsity):
        """The inner method's metrics; where it keeps no masks, `sparsity/density` (and its
        running average) is the stored fraction of the compact projections' dense entries
        (the fan-in is constant, so it never changes; a method that shrinks the layout reports
        its own)."""
        out = self.inner.metrics(params, sparsity)
        if sparsity.get("masks") is None and not self.inner.resizes:
            out["sparsity/density"] = out["sparsity/avg_density"] = jnp.float32(
                stored_density(self.run.compact))
        return out

    def finalize_structure(self, params):
        return self.inner.finalize_structure(params)

    def finalize(self, params, sparsity):
        return merge_layout(self.inner.finalize(params, sparsity), sparsity[LAYOUT])

    def valid_masks(self, masks):
        return self.inner.valid_masks(masks)


def stored_density(compact: Mapping[str, CompactProjection]) -> float:
    """Stored weight entries of the compact projections over their dense entries."""
    return (sum(c.stored for c in compact.values())
            / sum(c.in_features * c.out_features for c in compact.values()))


def for_formats(method: SparsityMethod, model_config: Any) -> SparsityMethod:
    """`method` wrapped for the model's weight formats (unchanged when every projection is
    dense)."""
    if model_config.formats().all_dense:
        return method
    return FormatLayoutMethod(method)
