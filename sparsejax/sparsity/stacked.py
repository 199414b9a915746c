"""A sparsity method on a model with scanned layers sees the per-layer params.

With `ModelConfig.scan_layers` the TrainState holds params, optimizer state and masks in the
scanned layout (a leading `layers` axis per group of blocks; models/layer_stack.py). Masks are
chosen per tensor (top-k within a layer's kernel, per-layer densities, per-layer metrics), so
`LayerStackedMethod` hands the wrapped method every tree in the unscanned layout and stacks
what it returns: a scanned run prunes exactly as the unscanned one does. Inside jit the
conversions are slices and concatenations that XLA fuses with their consumers.
"""
from __future__ import annotations

from typing import Any

import optax

from sparsejax.models.layer_stack import stack_layers, unstack_layers
from sparsejax.models.layer_stack import layer_period
from sparsejax.sparsity.method import DenseMethod, MethodWrapper, SparsityMethod

PyTree = Any


class LayerStackedMethod(MethodWrapper):
    """`inner` driven through the per-layer view of scanned trees (`period`: blocks per scan
    step)."""

    def __init__(self, inner: SparsityMethod, period: int):
        super().__init__(inner)
        self.period = int(period)

    def _u(self, tree: PyTree) -> PyTree:
        return unstack_layers(tree, self.period)

    def _s(self, tree: PyTree) -> PyTree:
        return stack_layers(tree, self.period)

    def init(self, params, rng):
        p, s = self.inner.init(self._u(params), rng)
        return self._s(p), self._s(s)

    def wrap_optimizer(self, tx: optax.GradientTransformation
                       ) -> optax.GradientTransformationExtraArgs:
        inner = self.inner.wrap_optimizer(tx)

        def init_fn(params):
            return self._s(inner.init(self._u(params)))

        def update_fn(updates, state, params=None, **extra):
            u, st = inner.update(self._u(updates), self._u(state), self._u(params),
                                 **{k: self._u(v) for k, v in extra.items()})
            return self._s(u), self._s(st)

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)

    def forward_params(self, params, sparsity, *, step=0, rng=None):
        return self._s(self.inner.forward_params(self._u(params), self._u(sparsity), step=step,
                                                 rng=rng))

    def regularizer(self, params, sparsity, *, step=0):
        return self.inner.regularizer(self._u(params), self._u(sparsity), step=step)

    def on_grads(self, params, sparsity, grads, *, step=0):
        g, s = self.inner.on_grads(self._u(params), self._u(sparsity), self._u(grads), step=step)
        return self._s(g), self._s(s)

    def grad_view(self, params, sparsity):
        p, s = self.inner.grad_view(self._u(params), self._u(sparsity))
        return self._s(p), self._s(s)

    def update(self, params, opt_state, sparsity, *, step, rng=None, grads=None):
        p, o, s, m = self.inner.update(self._u(params), self._u(opt_state), self._u(sparsity),
                                       step=step, rng=rng,
                                       grads=None if grads is None else self._u(grads))
        return self._s(p), self._s(o), self._s(s), m

    def metrics(self, params, sparsity):
        return self.inner.metrics(self._u(params), self._u(sparsity))

    def finalize_structure(self, params):
        return self._s(self.inner.finalize_structure(self._u(params)))

    def finalize(self, params, sparsity):
        return self._s(self.inner.finalize(self._u(params), self._u(sparsity)))

    def valid_masks(self, masks):
        return self._s(self.inner.valid_masks(self._u(masks)))


def for_layout(method: SparsityMethod, model_config: Any) -> SparsityMethod:
    """`method` as the run drives it: wrapped for scanned layers, except the dense method,
    which never looks at a tensor's layout."""
    if not getattr(model_config, "scan_layers", False) or type(method) is DenseMethod:
        return method
    return LayerStackedMethod(method, layer_period(model_config))
