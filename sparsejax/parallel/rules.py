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


def shardings_like(tree: Any, reference: Any, reference_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for `tree` (e.g. sparsity masks) that reuse the sharding of the leaf at the same
    path in `reference` (e.g. params) when shapes agree, and replicate everything else."""
    ref_flat = {jax.tree_util.keystr(p): (leaf, s) for (p, leaf), s in zip(
        jax.tree_util.tree_leaves_with_path(reference),
        jax.tree_util.tree_leaves(reference_shardings))}

    def pick(path, leaf):
        key = jax.tree_util.keystr(path)
        for ref_key, (ref_leaf, sharding) in ref_flat.items():
            if key.endswith(ref_key) and getattr(ref_leaf, "shape", None) == getattr(leaf, "shape", ()):
                return sharding
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, tree)
