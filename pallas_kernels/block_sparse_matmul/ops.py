"""Public block-sparse matmul: validation, backend choice and a custom VJP.

    y = block_sparse_matmul(x, values, indices)   # x [tokens, in] @ W -> [tokens, out]

with W stored compactly (reference.py): values [out_blocks, k, block_in, block_out] and int32
indices [out_blocks, k], distinct within a row. The custom VJP gives dx = dy @ Wᵀ and
dvalues (each stored block's gradient) on the same backend; indices get no gradient.

Backends: "xla" (batched matmuls over gathered block slabs, xla.py: the CPU path and the
fallback); "tpu" (Pallas Mosaic TPU kernels with scalar-prefetched indices, tpu.py); "gpu"
(Mosaic GPU kernels for Hopper, gpu.py; `interpret=True` runs them on CPU through
pallas_kernels/mosaic_gpu_interpret.py). `backend=None` picks "tpu" on a TPU, "gpu" on a
Hopper GPU and "xla" everywhere else (other GPUs included).

Shapes, dtypes and a `k` that does not match the values are checked at trace time. Indices
are data: out-of-range or repeated entries can be refused only where their values are known,
so they are checked whenever the indices are concrete (outside jit), and by
`check_indices`, which the weight formats call on every layout they build.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse_matmul import gpu as gpu_kernels
from pallas_kernels.block_sparse_matmul import tpu as tpu_kernels
from pallas_kernels.block_sparse_matmul import xla as xla_kernels
from pallas_kernels.block_sparse_matmul.metadata import transpose_layout

_BACKENDS = ("xla", "tpu", "gpu")
_FLOATS = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def check_indices(indices, in_blocks: int, name: str = "indices") -> None:
    """Refuses concrete indices that are out of [0, in_blocks) or repeat within a row."""
    idx = np.asarray(indices)
    if idx.size == 0:
        return
    if idx.min() < 0 or idx.max() >= in_blocks:
        bad = idx[(idx < 0) | (idx >= in_blocks)]
        raise ValueError(f"{name} hold input blocks {sorted(set(bad.tolist()))[:8]} outside "
                         f"[0, {in_blocks}) (in_blocks = in_features // block_in)")
    s = np.sort(idx.reshape(-1, idx.shape[-1]), axis=-1)
    dup = np.nonzero((s[:, 1:] == s[:, :-1]).any(axis=-1))[0]
    if dup.size:
        raise ValueError(f"{name} repeat an input block within output block column(s) "
                         f"{dup[:8].tolist()}: each stored block of a column must read a "
                         f"distinct input block")


def check_shapes(x, values, indices) -> int:
    """Trace-time checks; returns in_blocks."""
    if values.ndim != 4:
        raise ValueError(f"values must be [out_blocks, k, block_in, block_out], got shape "
                         f"{values.shape}")
    ob, k, bi, bo = values.shape
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D [tokens, in_features], got shape {x.shape}")
    if x.shape[1] % bi:
        raise ValueError(f"x's in_features={x.shape[1]} is not a multiple of block_in={bi} "
                         f"(values {values.shape})")
    if indices.ndim != 2 or indices.dtype != jnp.int32:
        raise ValueError(f"indices must be int32 [out_blocks, k], got shape {indices.shape} "
                         f"dtype {indices.dtype}")
    if indices.shape != (ob, k):
        raise ValueError(f"indices shape {indices.shape} does not match values {values.shape}: "
                         f"want (out_blocks, k) = {(ob, k)}")
    in_blocks = x.shape[1] // bi
    if k > in_blocks:
        raise ValueError(f"k={k} stored blocks per column exceeds in_blocks={in_blocks}")
    for name, a in (("x", x), ("values", values)):
        if jnp.dtype(a.dtype) not in _FLOATS:
            raise ValueError(f"{name} has dtype {a.dtype}; valid: float32, bfloat16, float16")
    if not isinstance(indices, jax.core.Tracer):
        check_indices(indices, in_blocks)
    return in_blocks


def resolve_backend(backend: Optional[str], interpret: bool = False) -> str:
    if backend is None:
        platform = jax.default_backend()
        if platform == "gpu":
            hopper = str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9")
            return "gpu" if hopper else "xla"
        return platform if platform in _BACKENDS else "xla"
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r} is not valid; use one of {_BACKENDS} or None")
    if backend in ("gpu", "tpu") and not interpret and jax.default_backend() != backend:
        raise ValueError(f"backend={backend!r} with interpret=False needs a {backend.upper()}, "
                         f"but the default platform is {jax.default_backend()!r}; pass "
                         f"interpret=True or backend='xla'")
    return backend


def _kernels(backend: str):
    return {"xla": xla_kernels, "tpu": tpu_kernels, "gpu": gpu_kernels}[backend]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _bsm(x, values, indices, backend, interpret):
    return _forward(x, values, indices, backend, interpret)


def _forward(x, values, indices, backend, interpret):
    out_dtype = jnp.promote_types(x.dtype, values.dtype)
    kw = {} if backend == "xla" else {"interpret": interpret}
    return _kernels(backend).forward(x, values, indices, out_dtype=out_dtype, **kw)


def _bsm_fwd(x, values, indices, backend, interpret):
    return _forward(x, values, indices, backend, interpret), (x, values, indices)


def _bsm_bwd(backend, interpret, res, dy):
    x, values, indices = res
    kern = _kernels(backend)
    kw = {} if backend == "xla" else {"interpret": interpret}
    in_blocks = x.shape[1] // values.shape[2]
    layout = transpose_layout(indices, in_blocks)
    dx = kern.grad_input(dy, values, indices, layout, in_blocks, out_dtype=x.dtype, **kw)
    dv = kern.grad_values(x, dy, indices, values.shape[2], out_dtype=values.dtype, **kw)
    return dx, dv, np.zeros(indices.shape, jax.dtypes.float0)


_bsm.defvjp(_bsm_fwd, _bsm_bwd)


def block_sparse_matmul(x: jax.Array, values: jax.Array, indices: jax.Array, *,
                        backend: Optional[str] = None, interpret: bool = False) -> jax.Array:
    """x [tokens, in_features] @ W -> [tokens, out_blocks * block_out] (see module doc);
    output dtype: x's and values' promoted dtype, accumulated in float32."""
    check_shapes(x, values, indices)
    return _bsm(x, values, indices, resolve_backend(backend, interpret), interpret)
