"""Public gathered matmul: validation and backend choice (see reference.py for what it is).

    y = gather_matmul(x, w, idx, count)               # rows: x[:, idx] @ w[idx]   -> [B, N]
    u = gather_matmul(x, w, idx, count, mode="cols")  # cols: (x @ w)[:, idx]      -> [B, C]
    u = gather_matmul(x, w_t, idx, count, mode="cols", transpose_w=True)  # w_t = w.T [N, K]

Backends: "gpu" (Pallas Triton kernels, gpu.py) and "xla" (a loop over the active rows, xla.py, used
on CPU and TPU). `backend=None` picks "gpu" on a GPU, else "xla"; `interpret=True` runs the
GPU kernel in Pallas interpret mode (on CPU, for tests). Forward only: this is a decode-time
op (no VJP). Output dtype: x's and w's promoted dtype, accumulated in float32.
"""
from __future__ import annotations

from typing import Optional

import gin
import jax
import jax.numpy as jnp

from pallas_kernels.gather_matmul import gpu as gpu_kernels
from pallas_kernels.gather_matmul.reference import MODES
from pallas_kernels.gather_matmul.xla import gather_matmul_xla

_BACKENDS = ("gpu", "xla")
_FLOATS = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@gin.configurable
def gather_matmul_tiles(tc: int = 32, tn: int = 128, tk: int = 128) -> tuple[int, int, int]:
    """GPU tiles: tc slots per block, tn output columns (rows mode), tk contraction (cols
    mode); powers of two, >= 16."""
    for name, t in (("tc", tc), ("tn", tn), ("tk", tk)):
        if not isinstance(t, int) or t < 16 or t & (t - 1):
            raise ValueError(f"gather_matmul_tiles.{name}={t!r} must be a power of two >= 16")
    return tc, tn, tk


def _resolve_backend(backend: Optional[str], interpret: bool) -> str:
    if backend is None:
        return "gpu" if jax.default_backend() == "gpu" or interpret else "xla"
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r} is not valid; use one of {_BACKENDS} or None")
    if backend == "gpu" and not interpret and jax.default_backend() != "gpu":
        raise ValueError(f"backend='gpu' with interpret=False needs a GPU, but the default "
                         f"platform is {jax.default_backend()!r}; pass interpret=True or "
                         f"backend='xla'")
    return backend


def _check(x, w, idx, count, mode, transpose_w):
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not valid; use one of {MODES}")
    if transpose_w and mode != "cols":
        raise ValueError("transpose_w=True is for mode='cols' (a neuron-major [N, K] weight)")
    k_dim = 1 if transpose_w else 0
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[k_dim]:
        want = "[N, K]" if transpose_w else "[K, N]"
        raise ValueError(f"x {x.shape} and w {w.shape} must be [B, K] and {want}")
    for name, a in (("x", x), ("w", w)):
        if jnp.dtype(a.dtype) not in _FLOATS:
            raise ValueError(f"{name} has dtype {a.dtype}; valid: float32, bfloat16, float16")
    if idx.ndim != 1 or idx.dtype != jnp.int32:
        raise ValueError(f"idx must be a 1-D int32 array [C], got {idx.shape} {idx.dtype}")
    if jnp.shape(count) != () or jnp.dtype(jnp.result_type(count)) != jnp.int32:
        raise ValueError(f"count must be an int32 scalar, got shape {jnp.shape(count)}")


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def gather_matmul(x: jax.Array, w: jax.Array, idx: jax.Array, count: jax.Array, *,
                  mode: str = "rows", transpose_w: bool = False, backend: Optional[str] = None,
                  interpret: bool = False) -> jax.Array:
    """The gathered matmul of reference.py on the chosen backend."""
    count = jnp.asarray(count, jnp.int32)
    _check(x, w, idx, count, mode, transpose_w)
    out_dtype = jnp.promote_types(x.dtype, w.dtype)
    b, c = x.shape[0], idx.shape[0]
    n = w.shape[0] if transpose_w else w.shape[1]
    if b == 0 or c == 0 or n == 0:
        return jnp.zeros((b, n if mode == "rows" else c), out_dtype)
    if _resolve_backend(backend, interpret) == "xla":
        return gather_matmul_xla(x, w, idx, count, mode, out_dtype, transpose_w)
    tc, tn, tk = gather_matmul_tiles()
    tc = min(tc, max(16, _pow2(c)))
    bp = max(16, _pow2(b))
    cp = -(-c // tc) * tc
    idx_p = jnp.pad(idx, (0, cp - c))
    x_p = jnp.pad(x, ((0, bp - b), (0, 0)))
    cnt = jnp.clip(count, 0, c).reshape(1)
    if mode == "rows":
        y = gpu_kernels.rows_gpu(x_p.T, w, idx_p, cnt, tc=tc, tn=min(tn, max(16, _pow2(w.shape[1]))),
                                 out_dtype=out_dtype, interpret=interpret)
        return y[:b]
    y = gpu_kernels.cols_gpu(x_p, w, idx_p, cnt, tc=tc, tk=min(tk, max(16, _pow2(x.shape[1]))),
                             out_dtype=out_dtype, interpret=interpret, transpose_w=transpose_w)
    return y[:b, :c]
