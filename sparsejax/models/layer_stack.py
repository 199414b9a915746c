"""Scanned layers (`ModelConfig.scan_layers`): the repeating group of blocks run by `nn.scan`,
and the conversion between the two param layouts.

The layer pattern (`mlp_kinds` / `attention_kinds` / `layer_types`, each cycled over the
layers) repeats every `period = lcm(len(mlp_kinds), len(attention_kinds), len(layer_types))`
layers. Scanned, the model holds one
group of `period` blocks, `layers/block_{j}`, whose params (and every other per-layer variable:
MoE state, sown metrics, KV cache) carry a leading `layers` axis of length
`num_layers / period`; layer i of the unscanned model is `block_{i % period}` at index
`i // period`:

    unscanned  {'layer_0': A0, 'layer_1': B0, 'layer_2': A1, 'layer_3': B1, 'embed': ...}
    scanned    {'layers': {'block_0': stack(A0, A1), 'block_1': stack(B0, B1)}, 'embed': ...}

`stack_layers` / `unstack_layers` convert any pytree that holds such dicts (params, masks,
optimizer states, sown metrics); `unstack_layers` reads the period and length from the tree.
The unscanned layout is the canonical one: HF import/export, warm starts and the sparsity
methods (through `sparsity/stacked.py`) see it, whatever the run's layout. Initialization too:
the scanned Transformer's `init` is the unscanned one's, stacked (`Transformer.init_with_output`),
so the layout never changes the initial params.
"""
from __future__ import annotations

import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np

from sparsejax.models.remat import remat_module

GROUP = "layers"  # the scanned group's name, and the logical axis of its leading dim
_LAYER = re.compile(r"layer_(\d+)$")
_BLOCK = re.compile(r"block_(\d+)$")
# Collections whose per-layer variables are stacked along the scanned axis.
SCAN_COLLECTIONS = ("params", "moe_state", "moe_counts", "aux_loss", "metrics", "cache",
                    "intermediates", "act_stats")


def layer_period(cfg: Any) -> int:
    """Layers after which the per-layer pattern repeats."""
    return math.lcm(len(tuple(cfg.mlp_kinds)), len(tuple(cfg.attention_kinds)),
                    len(tuple(getattr(cfg, "layer_types", ()))) or 1)


def check_scan_layers(cfg: Any) -> None:
    """ValueError when scan_layers is on and the pattern does not repeat into num_layers."""
    if not isinstance(cfg.scan_layers, bool):
        raise ValueError(f"ModelConfig.scan_layers={cfg.scan_layers!r} must be True or False")
    p = layer_period(cfg)
    if cfg.scan_layers and cfg.num_layers % p:
        raise ValueError(
            f"ModelConfig.scan_layers=True: the layer pattern (mlp_kinds={tuple(cfg.mlp_kinds)}, "
            f"attention_kinds={tuple(cfg.attention_kinds)}, "
            f"layer_types={tuple(getattr(cfg, 'layer_types', ()))}) repeats every {p} layers, which does "
            f"not divide num_layers={cfg.num_layers}; use a multiple of {p} layers or "
            f"scan_layers=False")


def _is_layer_dict(x: Any) -> bool:
    return isinstance(x, dict) and any(isinstance(k, str) and _LAYER.match(k) for k in x)


def _is_stacked_dict(x: Any) -> bool:
    return isinstance(x, dict) and isinstance(x.get(GROUP), dict) and \
        all(isinstance(k, str) and _BLOCK.match(k) for k in x[GROUP])


def is_stacked(tree: Any) -> bool:
    """Does `tree` hold scanned (stacked) layers anywhere?"""
    found = []
    jax.tree.map(lambda x: found.append(_is_stacked_dict(x)), tree, is_leaf=_is_stacked_dict)
    return any(found)


def _stack(xs):
    if all(isinstance(x, np.ndarray) for x in xs):
        return np.stack(xs)
    return jnp.stack(xs)


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def _boxed(x: Any) -> Any:
    return x.value if isinstance(x, nn.Partitioned) else x.unbox()


_AXIS = {nn.PARTITION_NAME: GROUP}  # what nn.scan adds to (removes from) partitioning boxes


def _stack_leaves(*xs):
    """Stacks one leaf of every group; a partitioning box (flax's init output) keeps its
    logical names with `layers` in front, as nn.scan's own init writes them."""
    if _is_box(xs[0]):
        return xs[0].replace_boxed(_stack([_boxed(x) for x in xs])).add_axis(0, _AXIS)
    return _stack(xs)


def _stack_dict(d: dict, period: int) -> dict:
    """Layer i -> block i % period at index i // period. A block may be absent from every
    group (e.g. the MoE state of a ('dense', 'moe') pattern has only the odd layers), never
    from some."""
    layers = {int(_LAYER.match(k).group(1)) for k in d if _LAYER.match(k)}
    n_groups = max(layers) // period + 1
    out = {k: stack_layers(v, period) for k, v in d.items() if not _LAYER.match(k)}
    group = {}
    for j in range(period):
        have = [g * period + j in layers for g in range(n_groups)]
        if any(have) and not all(have):
            raise ValueError(
                f"cannot stack layers {sorted(layers)} into groups of {period}: layer i is "
                f"block i % {period} of group i // {period}, and block {j} is in some of the "
                f"{n_groups} groups only")
        if all(have):
            group[f"block_{j}"] = jax.tree.map(
                _stack_leaves, *[d[f"layer_{g * period + j}"] for g in range(n_groups)],
                is_leaf=_is_box)
    out[GROUP] = group
    return out


def _take(x, g):
    return x[g]


def _unstack_dict(d: dict, period: int | None, take=_take) -> dict:
    group = d[GROUP]
    blocks = {int(_BLOCK.match(k).group(1)): v for k, v in group.items()}
    period = period or max(blocks, default=-1) + 1
    leaves = [_boxed(x) if _is_box(x) else x for x in jax.tree.leaves(group, is_leaf=_is_box)]
    length = leaves[0].shape[0] if leaves else 0

    def take_leaf(x, g):
        if _is_box(x):
            return x.replace_boxed(take(_boxed(x), g)).remove_axis(0, _AXIS)
        return take(x, g)
    out = {k: unstack_layers(v, period, take) for k, v in d.items() if k != GROUP}
    for g in range(length):
        for j, sub in blocks.items():
            out[f"layer_{g * period + j}"] = jax.tree.map(lambda x: take_leaf(x, g), sub,
                                                          is_leaf=_is_box)
    return out


def stack_layers(tree: Any, period: int) -> Any:
    """Unscanned -> scanned layout, in every dict of `tree` with `layer_{i}` keys (also
    boxed variables from `init`: their logical names gain the `layers` axis)."""
    return jax.tree.map(lambda x: _stack_dict(x, period) if _is_layer_dict(x) else x, tree,
                        is_leaf=_is_layer_dict)


def unstack_layers(tree: Any, period: int | None = None, take=_take) -> Any:
    """Scanned -> unscanned layout, in every dict of `tree` with a stacked `layers` group;
    other trees pass unchanged. The length is read from the tree, the period too unless
    given (give it for trees that may lack the last blocks, e.g. MoE metrics of a
    ('moe', 'dense') pattern). `take(leaf, g)` slices a leaf (default `leaf[g]`)."""
    return jax.tree.map(lambda x: _unstack_dict(x, period, take) if _is_stacked_dict(x) else x,
                        tree, is_leaf=_is_stacked_dict)


def stacked_period(tree: Any) -> int | None:
    """Blocks per scan step of a complete stacked tree (params), None if it is unscanned."""
    found = []
    jax.tree.map(lambda x: found.append(len(x[GROUP])) if _is_stacked_dict(x) else None, tree,
                 is_leaf=_is_stacked_dict)
    return found[0] if found else None


def layout_like(tree: Any, reference: Any) -> Any:
    """`tree` (either layout) in the layout of the complete tree `reference`."""
    tree = unstack_layers(tree)
    period = stacked_period(reference)
    return tree if period is None else stack_layers(tree, period)


def unstack_abstract(tree: Any) -> Any:
    """`unstack_layers` for ShapeDtypeStructs: a stacked leaf's per-layer struct drops the
    leading axis from its shape and from its sharding's partition spec."""

    def take(x, g):
        sh = getattr(x, "sharding", None)
        if isinstance(sh, NamedSharding):
            sh = NamedSharding(sh.mesh, PartitionSpec(*tuple(sh.spec)[1:]))
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sh)
    return unstack_layers(tree, take=take)


def to_layout(tree: Any, cfg: Any) -> Any:
    """`tree` (either layout) in the layout of model config `cfg`."""
    tree = unstack_layers(tree)
    return stack_layers(tree, layer_period(cfg)) if cfg.scan_layers else tree


class BlockGroup(nn.Module):
    """One period of the layer pattern: blocks 0..period-1 (a scan step); `block` is the
    transformer's block class, called as block(config, layer)(x, positions, segment_ids,
    deterministic, decode)."""

    config: Any
    block: Any
    deterministic: bool
    decode: bool

    @nn.compact
    def __call__(self, x, positions, segment_ids):
        for j in range(layer_period(self.config)):
            x = self.block(self.config, j, name=f"block_{j}")(x, positions, segment_ids,
                                                              self.deterministic, self.decode)
        return x, None


def scanned_blocks(cfg: Any, block: Any, x: jax.Array, positions: jax.Array,
                   segment_ids: jax.Array, deterministic: bool, decode: bool) -> jax.Array:
    """Runs the layers as `num_layers / period` scan steps over a (rematerialized) group of
    `block`s. Call inside a compact Transformer (creates the submodule `layers`)."""
    group = remat_module(BlockGroup, cfg.remat_policy, prevent_cse=False)
    scan = nn.scan(group, variable_axes={c: 0 for c in SCAN_COLLECTIONS},
                   split_rngs={"params": True, "router": True, "dropout": True},
                   in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers // layer_period(cfg),
                   metadata_params={nn.PARTITION_NAME: GROUP})
    x, _ = scan(cfg, block, deterministic, decode, name=GROUP)(x, positions, segment_ids)
    return x
