"""The method protocol the trainer drives, the method registry and the dense (no-op) method.

See the package docstring (``sparsejax/sparsity/__init__.py``) for the exact call
sequence. Every method keeps its state in a dict pytree (the trainer's ``sparsity`` field)
with at least ``masks`` (or None), ``density``, ``avg_density`` and ``num_steps``; the masks
exist only there (the optimizer reads them through the ``sparsity`` extra argument).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import gin
import jax
import jax.numpy as jnp
import optax

from sparsejax import config
from sparsejax.registry import Registry
from sparsejax.sparsity import masks as masks_lib

PyTree = Any
Metrics = dict[str, jax.Array]


class CompactProjection(NamedTuple):
    """A projection stored in a compact weight format: its dense shape and how many weight
    entries the format stores (constant for the shipped formats)."""

    in_features: int
    out_features: int
    stored: int


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What a method needs to know about the run it is part of.

    num_steps: the run's length, against which fractional steps resolve.
    valid: {param path: (axis, length)} for params padded along `axis` past `length` (the
      vocab padding of the LM head): those entries are never kept and never counted.
    compact: {projection path ('layer_0/mlp/wo', per layer also when layers are scanned):
      CompactProjection} of the projections stored in a compact weight format
      (models/formats/), whose params hold no dense kernel to read their shape from.
    """

    num_steps: int
    valid: Mapping[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    compact: Mapping[str, CompactProjection] = dataclasses.field(default_factory=dict)


class SparsityMethod:
    """Base protocol. Subclasses override what they need; all jittable except ``bind``,
    ``init``, ``wrap_optimizer`` and ``is_update_step`` (host side)."""

    needs_dense_grads: bool = False
    run: RunInfo | None = None
    # names of param leaves whose dimensions the method's updates shrink (with their optimizer
    # slots and layouts): a checkpoint may hold them smaller than the model inits them
    resizes: tuple[str, ...] = ()

    def bind(self, run: RunInfo) -> "SparsityMethod":
        """Resolves run-relative settings (fractions of the run) before ``init``."""
        self.run = run
        return self

    def require_bound(self) -> RunInfo:
        if self.run is None:
            raise ValueError(f"{type(self).__name__}: call method.bind(RunInfo(num_steps=...)) "
                             f"before init, so run-relative steps can be resolved")
        return self.run

    def init(self, params: PyTree, rng: jax.Array) -> tuple[PyTree, PyTree]:
        """Returns ``(params, sparsity_state)``; params may be pruned or extended."""
        return params, new_stats_state(None)

    def wrap_optimizer(self, tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
        """The optimizer to use; its ``update`` takes the method state as ``sparsity=``."""
        return optax.with_extra_args_support(tx)

    def forward_params(self, params: PyTree, sparsity: PyTree, *, step=0, rng: jax.Array | None = None) -> PyTree:
        """Params for the model's ``apply`` inside the loss (``rng=None``: deterministic/eval)."""
        return params

    def regularizer(self, params: PyTree, sparsity: PyTree, *, step=0) -> jax.Array:
        """Extra loss term (added to the loss by the trainer)."""
        return jnp.zeros((), jnp.float32)

    def on_grads(self, params: PyTree, sparsity: PyTree, grads: PyTree, *, step=0) -> tuple[PyTree, PyTree]:
        """Per-step hook between the gradient and the optimizer: ``(grads, sparsity)``."""
        return grads, track_density(sparsity)

    def is_update_step(self, step: int) -> bool:
        """Host-side: does a mask update run before the train step of ``step``?"""
        return False

    def grad_view(self, params: PyTree, sparsity: PyTree) -> tuple[PyTree, PyTree]:
        """``(params, sparsity)`` whose loss gradient ``update`` receives as ``grads`` when
        ``needs_dense_grads``: the params as they are, except for methods whose stored
        params hide the dense gradient (compact block DST gives every block)."""
        return params, sparsity

    def update(self, params: PyTree, opt_state: PyTree, sparsity: PyTree, *, step, rng: jax.Array | None = None,
               grads: PyTree | None = None) -> tuple[PyTree, PyTree, PyTree, Metrics]:
        """Mask update: ``(params, opt_state, sparsity, metrics)``."""
        return params, opt_state, sparsity, density_metrics(sparsity.get("masks"), self.valid)

    def metrics(self, params: PyTree, sparsity: PyTree) -> Metrics:
        """Cheap per-step metrics: overall density, running average density and param count
        (padding excluded)."""
        m = sparsity.get("masks")
        out = density_metrics(m, self.valid, per_layer=False)
        out["sparsity/avg_density"] = sparsity["avg_density"]
        model_params = self.finalize_structure(params)
        out["sparsity/param_count"] = masks_lib.param_count(model_params, m, self.valid)
        out["sparsity/avg_param_count"] = masks_lib.average_param_count(
            model_params, m, sparsity["avg_density"], self.valid)
        return out

    def finalize_structure(self, params: PyTree) -> PyTree:
        """Model-structured params (drops any extra keys the method added)."""
        return params

    def finalize(self, params: PyTree, sparsity: PyTree) -> PyTree:
        """Model params with the final (hard) masks applied, for export/eval."""
        m = sparsity.get("masks")
        return params if m is None else masks_lib.apply_masks(params, m)

    # --- padding (entries that exist for sharding only) ------------------------------------

    @property
    def valid(self) -> Mapping[str, tuple[int, int]]:
        """{param path: (axis, length)} of padded params (see RunInfo)."""
        return self.run.valid if self.run is not None else {}

    def valid_masks(self, masks: PyTree) -> PyTree | None:
        """Bool trees of the real (unpadded) entries of each masked param, or None."""
        return masks_lib.valid_tree(masks, self.valid)


class MethodWrapper(SparsityMethod):
    """A method that drives `inner` through a view of the trees (scanned layers, compact
    layouts): run, binding and update steps are the inner method's, and so is every attribute
    the wrapper does not define."""

    def __init__(self, inner: SparsityMethod):
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def resizes(self) -> tuple[str, ...]:
        return self.inner.resizes

    @property
    def needs_dense_grads(self) -> bool:
        return self.inner.needs_dense_grads

    @property
    def run(self):
        return self.inner.run

    def bind(self, run):
        self.inner.bind(run)
        return self

    def is_update_step(self, step: int) -> bool:
        return self.inner.is_update_step(step)

    @property
    def valid(self):
        return self.inner.valid


def new_stats_state(masks: PyTree | None, valid: Mapping | None = None, **extra: Any) -> dict[str, Any]:
    """State dict with masks and the running-average statistics."""
    return {"masks": masks, "density": current_density(masks, valid),
            "avg_density": jnp.zeros((), jnp.float32), "num_steps": jnp.zeros((), jnp.int32),
            **extra}


def with_masks(sparsity: PyTree, masks: PyTree, valid: Mapping | None = None) -> PyTree:
    """New masks plus their overall density, computed once here rather than every step."""
    return {**sparsity, "masks": masks, "density": current_density(masks, valid)}


def current_density(masks: PyTree | None, valid: Mapping | None = None) -> jax.Array:
    if masks is None or not jax.tree.leaves(masks):
        return jnp.ones((), jnp.float32)
    return masks_lib.overall_density(masks, valid)


def track_density(sparsity: PyTree, masks: PyTree | None = None, valid: Mapping | None = None) -> PyTree:
    """Adds the current overall density to the running average over train steps."""
    if masks is None and "density" in sparsity:
        d = sparsity["density"]
    else:
        d = current_density(sparsity.get("masks") if masks is None else masks, valid)
    n = sparsity["num_steps"]
    avg = sparsity["avg_density"] + (d - sparsity["avg_density"]) / (n + 1).astype(jnp.float32)
    return {**sparsity, "avg_density": avg, "num_steps": n + 1}


def density_metrics(masks: PyTree | None, valid: Mapping | None = None,
                    per_layer: bool = True) -> Metrics:
    out = {"sparsity/density": current_density(masks, valid)}
    if per_layer and masks is not None:
        for path, d in masks_lib.layer_densities(masks, valid).items():
            out[f"sparsity/density/{path}"] = d
    return out


METHODS: Registry[type[SparsityMethod]] = Registry("sparsity method")


@gin.configurable
@METHODS.register("dense")
class DenseMethod(SparsityMethod):
    """Dense training through the same protocol (baseline)."""


@gin.configurable
def make_method(name: str = "dense") -> SparsityMethod:
    """The run's sparsity method: the registered class `name`, built with its gin bindings.

    Presets (RigL, SET, GMP, ...) are gin files under configs/sparsity/ that bind a method
    and its parts (`--gin_file=sparsity/rigl.gin`)."""
    if name not in METHODS:
        presets = [p[len("sparsity/"):-len(".gin")] for p in config.shipped_configs()
                   if p.startswith("sparsity/")]
        hint = (f"; {name!r} is a preset: use --gin_file=sparsity/{name}.gin"
                if name in presets else "")
        raise ValueError(f"make_method.name={name!r} is not a registered sparsity method; "
                         f"valid: {METHODS.names()}{hint}")
    return METHODS.get(name)()
