"""Weight formats: how a projection's weight [in, out] is stored and multiplied.

`ModelConfig.weight_format` names the format of every projection built through
`layers.dense()` / `Projection` (attention q, k, v, o; MLP gate, up, down) and
`ModelConfig.weight_format_overrides` maps regexes, searched in the projection's module path
('layer_0/mlp/wi_gate'; scanned: 'layers/block_0/mlp/wi_gate'), to other formats; the first
match wins. The LM head keeps the dense format unless an override names it.

A format is one module that registers a `WeightFormat` subclass in `WEIGHT_FORMATS`
(`dense.py`, `block_sparse.py`, `monarch.py`); its settings are gin bindings of its class.
A format's integer params (a block-sparse layout's indices) are structure, not weights: the
run keeps them beside the masks (`sparsity/layout.py`) and never differentiates them.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.registry import Registry

Dtype = Any


class WeightFormat:
    """Stores a projection's weight [in, out] and multiplies by it.

    `__call__(module, x, ...)` runs inside the `Projection` module's compact call: it creates
    the format's params on `module` (the LM head's padded output columns from
    `real_features` on start at zero) and returns x [tokens, in] @ W. `to_dense(params,
    in_features)` gives W [in, out] (exact), `from_dense(kernel, ...)` the format's params
    for a dense kernel (exact where the kernel has the format's structure). `param_names`
    are the params it creates besides the bias (how a warm start recognizes it)."""

    param_names: tuple[str, ...] = ()
    plans_layers: bool = False  # does `plan` return settings (under the current gin bindings)?

    def __call__(self, module: nn.Module, x: jax.Array, *, features: int,
                 axes: tuple[str, str], dtype: Dtype, param_dtype: Dtype,
                 real_features: int | None) -> jax.Array:
        raise NotImplementedError

    def plan(self, shapes: Mapping[str, tuple[int, int]]) -> dict[str, Any]:
        """{projection path: setting} for settings that depend on the whole model (a
        block-sparse fan-in spread over the layers by a distribution such as ERK), given the
        dense shapes (in, out) of every projection stored in this format, one entry per layer
        (paths of the unscanned model). The model passes each projection its setting through
        `at` when it initializes. Nothing by default."""
        return {}

    def at(self, setting: Any) -> "WeightFormat":
        """This format with a projection's planned `setting` (from `plan`); itself by
        default."""
        return self

    def check_mesh(self, mesh_shape: Mapping[str, int]) -> None:
        """A ValueError naming the format's setting when its params cannot be split over a
        mesh of `mesh_shape` ({axis: size}); any mesh by default."""

    def to_dense(self, params: Mapping[str, jax.Array], in_features: int) -> jax.Array:
        raise NotImplementedError

    def from_dense(self, kernel: jax.Array, **kwargs: Any) -> dict[str, jax.Array]:
        raise NotImplementedError


WEIGHT_FORMATS: Registry[type[WeightFormat]] = Registry("weight format")


@dataclasses.dataclass(frozen=True)
class FormatSpec:
    """The run's choice of formats: `default` and (regex, format) `overrides` in order, and
    the formats' per-projection `plans` ((path, setting) pairs, `WeightFormat.plan`) once the
    model has made them at init."""

    default: str = "dense"
    overrides: tuple[tuple[str, str], ...] = ()
    plans: tuple[tuple[str, Any], ...] = ()

    def format_at(self, path: str) -> str:
        for rx, name in self.overrides:
            if re.search(rx, path):
                return name
        return "dense" if path.split("/")[-1] == "lm_head" else self.default

    def format(self, path: str) -> WeightFormat:
        """The format (with its gin settings and its plan for `path`) of the projection at
        module path `path`."""
        fmt = WEIGHT_FORMATS.get(self.format_at(path), setting="ModelConfig.weight_format")()
        setting = dict(self.plans).get(path)
        return fmt if setting is None else fmt.at(setting)

    def planned(self, shapes: Mapping[str, tuple[int, int]]) -> "FormatSpec":
        """This spec with the plans of its formats for a model whose projections (module
        paths of the unscanned model) have dense shapes `shapes` {path: (in, out)}."""
        plans = {}
        for name in self.names:
            mine = {p: s for p, s in shapes.items() if self.format_at(p) == name}
            if mine:
                plans.update(WEIGHT_FORMATS.get(name)().plan(mine))
        return dataclasses.replace(self, plans=tuple(sorted(plans.items())))

    @property
    def needs_plan(self) -> bool:
        """Does some format of this spec plan its projections over the whole model?"""
        return any(WEIGHT_FORMATS.get(n)().plans_layers for n in self.names)

    @property
    def names(self) -> tuple[str, ...]:
        """The formats some projection may use (the LM head's dense included)."""
        return tuple(dict.fromkeys(("dense", self.default, *(n for _, n in self.overrides))))

    @property
    def all_dense(self) -> bool:
        return self.default == "dense" and all(n == "dense" for _, n in self.overrides)


def format_spec(weight_format: str, overrides: Mapping[str, str] | None) -> FormatSpec:
    """Validated FormatSpec from `ModelConfig.weight_format` / `weight_format_overrides`."""
    WEIGHT_FORMATS.get(weight_format, setting="ModelConfig.weight_format")
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, Mapping):
        raise ValueError(f"ModelConfig.weight_format_overrides={overrides!r} must be a dict "
                         f"{{regex on projection paths: format name}}")
    for rx, name in overrides.items():
        try:
            re.compile(rx)
        except (re.error, TypeError) as e:
            raise ValueError(f"ModelConfig.weight_format_overrides: {rx!r} is not a valid "
                             f"regex ({e})") from e
        WEIGHT_FORMATS.get(name, setting=f"ModelConfig.weight_format_overrides[{rx!r}]")
    return FormatSpec(weight_format, tuple(overrides.items()))


def module_path(module: nn.Module, name: str | None = None) -> str:
    """'layer_0/mlp/wi_gate': the module's path (plus `name`) as the overrides see it."""
    parts = [str(p) for p in module.scope.path] + ([name] if name else [])
    return "/".join(parts)


class Projection(nn.Module):
    """x [tokens, in] -> [tokens, features] through the weight format chosen for this
    module's path; a bias (if asked) is a plain vector on the output axis. The dense format
    creates exactly `nn.Dense`'s params ('kernel', 'bias') and computes what it computes."""

    features: int
    axes: tuple[str, str]
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    use_bias: bool = False
    real_features: int | None = None
    formats: FormatSpec = FormatSpec()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fmt = self.formats.format(module_path(self))
        y = fmt(self, x, features=self.features, axes=self.axes, dtype=self.dtype,
                param_dtype=self.param_dtype, real_features=self.real_features)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                   (self.axes[1],)),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(y.dtype)
        return y


def format_of(params: Any) -> str | None:
    """The registered format whose params (plus an optional 'bias') are exactly the keys of
    the dict `params` (one projection's params), or None."""
    if not isinstance(params, Mapping):
        return None
    keys = set(params) - {"bias"}
    for name in WEIGHT_FORMATS.names():
        if keys and keys == set(WEIGHT_FORMATS.get(name).param_names):
            return name
    return None


def is_layout_leaf(x: Any) -> bool:
    """A format's structure leaf (integer dtype), as opposed to a trained weight."""
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.integer)


# the shipped formats register themselves on import
from sparsejax.models.formats import block_sparse, dense, monarch  # noqa: E402,F401
