"""Device mesh with axes (data, fsdp, tensor, expert), sized from config."""
from __future__ import annotations

import math
from typing import Sequence

import gin
import jax
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor", "expert")


def resolve_mesh_shape(shape: dict[str, int], num_devices: int) -> tuple[int, ...]:
    """Fills at most one -1 entry so the product equals num_devices; validates the rest."""
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    unknown = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
    bad = {a: s for a, s in zip(MESH_AXES, sizes) if s == 0 or s < -1}
    if bad:
        raise ValueError(f"mesh sizes {bad} are invalid: each axis must be >= 1 or -1 (fill)")
    if len(unknown) > 1:
        raise ValueError(f"mesh axes {unknown} are all -1; at most one axis may be -1 (fill)")
    known = math.prod(s for s in sizes if s != -1)
    if unknown:
        if num_devices % known:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, sizes))} cannot fill {num_devices} devices: the fixed "
                f"axes multiply to {known}, which does not divide {num_devices}")
        sizes[MESH_AXES.index(unknown[0])] = num_devices // known
    elif known != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {known} devices but {num_devices} are "
            f"available; make the product equal {num_devices} or set one axis to -1")
    return tuple(sizes)


@gin.configurable
def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, expert: int = 1,
              devices: Sequence[jax.Device] | None = None,
              num_devices: int | None = None) -> Mesh:
    """Builds the training mesh over all (global) devices, or the first `num_devices`, with
    Auto axis types, so that GSPMD propagation and Flax logical constraints apply."""
    devices = list(devices) if devices is not None else jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"make_mesh.num_devices={num_devices} must be in 1..{len(devices)}")
        devices = devices[:num_devices]
    shape = resolve_mesh_shape(
        {"data": data, "fsdp": fsdp, "tensor": tensor, "expert": expert}, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
    """Number of ways the batch is split (the axes the `batch` logical axis maps to)."""
    return mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
