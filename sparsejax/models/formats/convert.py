"""A model's params in its weight formats <-> the params of its dense twin.

The dense twin of a ModelConfig is the same model with every projection in the dense format
(`dense_twin`). `to_dense_params` writes each projection stored in another format as the
dense kernel it computes with (`WeightFormat.to_dense`, exact: a block-sparse projection has
exact zeros outside its stored blocks), at the path the twin keeps it (an attention kernel is
a param of the attention module, an MLP kernel its projection's 'kernel'); every other param
passes unchanged. `export-hf` writes it, and tests compare compact models against it.
`from_dense_params` is the inverse (`WeightFormat.from_dense`, exact for kernels with the
format's structure), which `prune --compact` writes.

Both take params as the model computes with them, a format's integer layout merged in
(`method.forward_params` / `method.finalize` merge `state.sparsity['layout']`), in the
model's own layout (scanned or per layer).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sparsejax.models.formats import WEIGHT_FORMATS, format_of
from sparsejax.models.transformer import ModelConfig, Transformer

PyTree = Any


def dense_twin(model_config: ModelConfig) -> ModelConfig:
    """`model_config` with every projection in the dense format."""
    return dataclasses.replace(model_config, weight_format="dense", weight_format_overrides=None)


def abstract_params(model_config: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """{param path ('layer_0/mlp/wi_gate/values'): shape and dtype} of the model's params,
    traced without making arrays."""
    tokens = jax.ShapeDtypeStruct((1, model_config.max_seq_len), jnp.int32)
    key = jax.random.key(0)
    variables = jax.eval_shape(
        lambda t: Transformer(model_config).init(
            {"params": key, "router": key, "dropout": key}, t), tokens)
    params = jax.tree.map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x,
                          variables["params"],
                          is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    return traverse_util.flatten_dict(params, sep="/")


@dataclasses.dataclass(frozen=True)
class FormattedProjection:
    """A projection in a format other than dense: its module path (`owner`), the format, and
    where (`target`) and with what shape ([..., in, out]; a scanned model's stacked layers
    lead) the dense twin keeps its kernel."""

    owner: str
    format: str
    target: str
    shape: tuple[int, ...]

    @property
    def own(self) -> tuple[str, ...]:
        """The format's params under `owner` (a bias stays beside them in either format)."""
        return WEIGHT_FORMATS.get(self.format).param_names


def compact_projections(model_config: ModelConfig) -> dict[str, FormattedProjection]:
    """{module path: FormattedProjection} of the model's projections in a non-dense format
    (empty when all are dense), in the model's own layout: where the model's params under a
    dense projection's path of the twin are another registered format's."""
    if model_config.formats().all_dense:
        return {}
    ours = traverse_util.unflatten_dict(abstract_params(model_config), sep="/")
    out = {}
    for path, x in abstract_params(dense_twin(model_config)).items():
        # a dense projection is its module's 'kernel' or (attention) a param of the parent
        owner = path.removesuffix("/kernel")
        node = ours
        for part in owner.split("/"):
            node = node.get(part) if isinstance(node, dict) else None
        name = format_of(node)
        if name not in (None, "dense"):
            out[owner] = FormattedProjection(owner, name, path, tuple(x.shape))
    return out


def to_dense_params(params: PyTree, model_config: ModelConfig) -> PyTree:
    """The dense twin's params computing what `params` (layouts merged) compute: each compact
    projection written as its dense kernel by the format's `to_dense` (exact)."""
    plan = compact_projections(model_config)
    if not plan:
        return params
    flat = traverse_util.flatten_dict(params, sep="/")
    for proj in plan.values():
        missing = [n for n in proj.own if f"{proj.owner}/{n}" not in flat]
        if missing:
            raise ValueError(f"params[{proj.owner!r}] lack {missing} of the {proj.format!r} "
                             f"format (ModelConfig.weight_format): pass the params the model "
                             f"computes with, the layout merged in (method.forward_params / "
                             f"method.finalize)")
        fmt = WEIGHT_FORMATS.get(proj.format)()
        own = {n: jnp.asarray(flat.pop(f"{proj.owner}/{n}")) for n in proj.own}
        fn = lambda p, fmt=fmt, n=proj.shape[-2]: fmt.to_dense(p, n)
        for _ in range(len(proj.shape) - 2):  # the stacked layers of a scanned model
            fn = jax.vmap(fn)
        flat[proj.target] = fn(own)
    return traverse_util.unflatten_dict(flat, sep="/")


def from_dense_params(params: PyTree, model_config: ModelConfig,
                      masks: PyTree | None = None) -> PyTree:
    """`model_config`'s params (layouts included) from its dense twin's `params`: each
    projection that `model_config` stores in another format converted by the format's
    `from_dense` (its settings: the gin bindings), given `mask=` the projection's bool kernel
    in `masks` (a tree at the twin's paths) where there is one. A kernel the format refuses,
    or whose structure gives other shapes than `model_config`'s (a block-sparse fan-in other
    than BlockSparse.density's), is a ValueError."""
    plan = compact_projections(model_config)
    if not plan:
        return params
    ours = abstract_params(model_config)
    flat = traverse_util.flatten_dict(params, sep="/")
    flat_masks = {} if masks is None else {
        k: v for k, v in traverse_util.flatten_dict(masks, sep="/").items() if v is not None}
    for proj in plan.values():
        if proj.target not in flat:
            raise ValueError(f"params hold no dense kernel {proj.target!r} to store in the "
                             f"{proj.format!r} format")
        fmt = WEIGHT_FORMATS.get(proj.format)()
        kernel = np.asarray(flat.pop(proj.target))
        mask = flat_masks.get(proj.target)
        lead = kernel.shape[:-2]
        parts = [fmt.from_dense(kernel[i], **({} if mask is None else
                                              {"mask": np.asarray(mask)[i]}))
                 for i in np.ndindex(*lead)]  # one per stacked layer (one when unscanned)
        for name in proj.own:
            path = f"{proj.owner}/{name}"
            value = np.stack([np.asarray(p[name]) for p in parts]).reshape(
                lead + np.shape(parts[0][name]))
            if value.shape != ours[path].shape:
                raise ValueError(f"{path}: the kernel's structure gives shape {value.shape}, "
                                 f"the model's {proj.format!r} format (ModelConfig."
                                 f"weight_format and the format's settings) "
                                 f"{tuple(ours[path].shape)}")
            flat[path] = jnp.asarray(value, ours[path].dtype)
    return traverse_util.unflatten_dict(flat, sep="/")
