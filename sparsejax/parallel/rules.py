"""The logical-axis rules table and the helpers that turn logical annotations into shardings."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# logical axis -> mesh axes. The batch is split over every axis that is not model-parallel;
# the expert axis doubles as data parallelism outside the MoE layers.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("out_blocks", ("fsdp", "tensor")),  # a block-sparse weight's output blocks (models/formats)
    ("vocab", "tensor"),
    ("expert", "expert"),
    ("kv", None),
    ("seq", None),
    ("layers", None),
)


def logical_shardings(abstract_boxed_tree: Any, mesh: Mesh,
                      rules=LOGICAL_RULES) -> Any:
    """Shardings for a tree whose leaves may be `nn.LogicallyPartitioned` boxes (unboxed leaves
    are replicated). Returns a tree shaped like the unboxed tree."""
    specs = nn.get_partition_spec(abstract_boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh, rules=LOGICAL_RULES) -> NamedSharding:
    """Sharding of a [batch, seq] input array."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", "seq"), rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def path_str(path) -> str:
    """A tree path as 'layer_0/mlp/wo/kernel', whatever the container types (dict, dataclass,
    namedtuple), so that paths in params, optimizer state and masks can be compared."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def shardings_like(tree: Any, reference: Any, reference_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for every leaf of `tree` (a TrainState, optimizer state, masks...): a leaf whose
    path ends with the path of a `reference` leaf (e.g. a param) of the same shape gets that
    leaf's sharding; everything else is replicated."""
    by_path = {path_str(p): (getattr(x, "shape", None), s) for (p, x), s in zip(
        jax.tree_util.tree_leaves_with_path(reference),
        jax.tree_util.tree_leaves(reference_shardings))}

    def pick(path, leaf):
        parts = path_str(path).split("/")
        for i in range(len(parts)):
            hit = by_path.get("/".join(parts[i:]))
            if hit is not None and hit[0] == getattr(leaf, "shape", None):
                return hit[1]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, tree)
