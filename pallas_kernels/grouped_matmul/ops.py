"""Public grouped matmul ops: validation, backend dispatch and a custom VJP.

`gmm(lhs, rhs, group_sizes)` has the semantics of `jax.lax.ragged_dot`: rows of
`lhs [m, k]` are sorted by group and row block `i` is multiplied by `rhs[i]`.
`tgmm(lhs, grad, group_sizes)` is the transposed variant `lhs_iᵀ @ grad_i` that
gives the weight gradient. Backends: "gpu" (Pallas Triton), "tpu" (Pallas
Mosaic), "xla" (a padded-tile batched matmul in plain XLA, `xla.py`, used on CPU where
`jax.lax.ragged_dot` is pathologically slow). Every backend carries a `custom_vjp` whose
backward uses the same backend:
  d lhs = gmm(grad, rhsᵀ)   (same kernel, rhs read transposed)
  d rhs = tgmm(lhs, grad)

Group sizes that are negative or sum past `m` cannot raise inside `jit`; they
are clipped: negative sizes count as 0 and the running sum is clamped to `m`
(see `reference.effective_group_sizes`). Rows past the last group give zeros.
"""

from __future__ import annotations

import functools
from typing import Literal, Optional

import gin
import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul import gpu as gpu_kernels
from pallas_kernels.grouped_matmul import tpu as tpu_kernels
from pallas_kernels.grouped_matmul import xla as xla_kernels

Backend = Literal["gpu", "tpu", "xla"]
Tiling = tuple[int, int, int]
_BACKENDS = ("gpu", "tpu", "xla")
_FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@gin.configurable
def gmm_default_tiling(
    backend: str,
    op: str,
    gpu_gmm: Tiling = (128, 64, 128),
    gpu_tgmm: Tiling = (64, 128, 128),
    tpu_gmm: Tiling = (512, 512, 512),
    tpu_tgmm: Tiling = (512, 512, 512),
) -> Tiling:
    """Default (tm, tk, tn) tiles per backend and op ("gmm" or "tgmm").

    tm tiles rows of lhs, tk the contraction (gmm) / lhs columns (tgmm), tn the
    output columns. GPU tiles must be powers of two.
    """
    table = {
        ("gpu", "gmm"): gpu_gmm,
        ("gpu", "tgmm"): gpu_tgmm,
        ("tpu", "gmm"): tpu_gmm,
        ("tpu", "tgmm"): tpu_tgmm,
    }
    return tuple(int(t) for t in table[(backend, op)])  # type: ignore[return-value]


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _round_up(x: int, t: int) -> int:
    return -(-x // t) * t


def _fit_tiling(tiling: Tiling, backend: str, dims: tuple[int, int, int]) -> Tiling:
    """Shrinks tiles that exceed the (aligned) problem dims, so small problems stay cheap."""
    if backend == "gpu":
        return tuple(min(t, max(16, _next_pow2(d))) for t, d in zip(tiling, dims))  # type: ignore
    aligns = (8, 128, 128)
    return tuple(min(t, _round_up(d, a)) for t, d, a in zip(tiling, dims, aligns))  # type: ignore


def _resolve_backend(backend: Optional[str], interpret: bool) -> str:
    if backend is None:
        platform = jax.default_backend()
        return platform if platform in ("gpu", "tpu") else "xla"
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r} is not valid; use one of {_BACKENDS} or None.")
    if backend in ("gpu", "tpu") and not interpret and jax.default_backend() != backend:
        raise ValueError(
            f"backend={backend!r} with interpret=False needs a {backend.upper()}, but the "
            f"default platform is {jax.default_backend()!r}; pass interpret=True or backend='xla'."
        )
    return backend


def _check_tiling(tiling: Optional[Tiling], backend: str) -> None:
    if tiling is None:
        return
    if (
        not isinstance(tiling, (tuple, list))
        or len(tiling) != 3
        or not all(isinstance(t, int) and t > 0 for t in tiling)
    ):
        raise ValueError(f"tiling={tiling!r} must be a tuple of three positive ints (tm, tk, tn).")
    if backend == "gpu" and any(t & (t - 1) for t in tiling):
        raise ValueError(f"tiling={tiling!r}: GPU (Triton) tiles must be powers of two.")


def _check_group_sizes(group_sizes: jax.Array, num_groups: Optional[int], what: str) -> None:
    if group_sizes.ndim != 1:
        raise ValueError(f"group_sizes must be 1-D [g], got shape {group_sizes.shape}.")
    if group_sizes.dtype != jnp.int32:
        raise ValueError(f"group_sizes must have dtype int32, got {group_sizes.dtype}.")
    if num_groups is not None and group_sizes.shape[0] != num_groups:
        raise ValueError(
            f"group_sizes has length {group_sizes.shape[0]} but {what} has {num_groups} groups; "
            "they must match."
        )


def _check_float(name: str, x: jax.Array) -> None:
    if jnp.dtype(x.dtype) not in _FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {x.dtype}; valid dtypes are float32, bfloat16, float16.")


def _out_dtype(preferred_element_type, default) -> jnp.dtype:
    if preferred_element_type is None:
        return jnp.dtype(default)
    dt = jnp.dtype(preferred_element_type)
    if dt not in _FLOAT_DTYPES:
        raise ValueError(
            f"preferred_element_type={dt} is not valid; use float32, bfloat16, float16 or None."
        )
    return dt


# ----------------------------------------------------------------------------- kernels


def _xla_tile_rows(tiling: Optional[Tiling], m: int, g: int, k: int, n: int) -> int:
    """The XLA formulation tiles rows only: tiling[0] if given, else a size-based default
    (symmetric in k and n, so the forward and both backward ops share one layout)."""
    if tiling:
        return min(int(tiling[0]), -(-m // 8) * 8)  # like _fit_tiling: no tile past m
    return xla_kernels.default_tile_rows(m, g, k, n)


def _gmm_kernel(lhs, rhs, group_sizes, out_dtype, tiling, backend, interpret, transpose_rhs):
    """Dispatches the forward gmm kernel; rhs is [g, k, n] or [g, n, k] if transposed."""
    m, k = lhs.shape
    g = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    if min(m, k, n, g) == 0:
        return jnp.zeros((m, n), out_dtype)
    if backend == "xla":
        tm = _xla_tile_rows(tiling, m, g, k, n)
        return xla_kernels.gmm_xla(
            lhs, rhs, group_sizes, tm=tm, transpose_rhs=transpose_rhs, out_dtype=out_dtype
        )
    tiles = _fit_tiling(tiling or gmm_default_tiling(backend, "gmm"), backend, (m, k, n))
    fn = gpu_kernels.gmm_gpu if backend == "gpu" else tpu_kernels.gmm_tpu
    kwargs = {"launch": gpu_kernels.gmm_gpu_compiler_params()} if backend == "gpu" else {}
    return fn(
        lhs,
        rhs,
        group_sizes,
        tiling=tiles,
        transpose_rhs=transpose_rhs,
        out_dtype=out_dtype,
        interpret=interpret,
        **kwargs,
    )


def _tgmm_kernel(lhs, grad, group_sizes, out_dtype, tiling, backend, interpret):
    m, k = lhs.shape
    n = grad.shape[1]
    g = group_sizes.shape[0]
    if min(m, k, n, g) == 0:
        return jnp.zeros((g, k, n), out_dtype)
    if backend == "xla":
        tm = _xla_tile_rows(tiling, m, g, k, n)
        return xla_kernels.tgmm_xla(lhs, grad, group_sizes, tm=tm, out_dtype=out_dtype)
    tiles = _fit_tiling(tiling or gmm_default_tiling(backend, "tgmm"), backend, (m, k, n))
    fn = gpu_kernels.tgmm_gpu if backend == "gpu" else tpu_kernels.tgmm_tpu
    kwargs = {"launch": gpu_kernels.gmm_gpu_compiler_params()} if backend == "gpu" else {}
    return fn(lhs, grad, group_sizes, tiling=tiles, out_dtype=out_dtype, interpret=interpret, **kwargs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _gmm_vjp(lhs, rhs, group_sizes, out_dtype, tiling, backend, interpret):
    return _gmm_kernel(lhs, rhs, group_sizes, out_dtype, tiling, backend, interpret, False)


def _gmm_fwd(lhs, rhs, group_sizes, out_dtype, tiling, backend, interpret):
    out = _gmm_kernel(lhs, rhs, group_sizes, out_dtype, tiling, backend, interpret, False)
    return out, (lhs, rhs, group_sizes)


def _gmm_bwd(out_dtype, tiling, backend, interpret, residuals, grad):
    lhs, rhs, group_sizes = residuals
    # grad: [m, n]. d lhs = grad @ rhs_gᵀ per group; d rhs_g = lhs_gᵀ @ grad_g.
    d_lhs = _gmm_kernel(grad, rhs, group_sizes, lhs.dtype, tiling, backend, interpret, True)
    d_rhs = _tgmm_kernel(lhs, grad, group_sizes, rhs.dtype, tiling, backend, interpret)
    return d_lhs, d_rhs, None


_gmm_vjp.defvjp(_gmm_fwd, _gmm_bwd)


# ----------------------------------------------------------------------------- public


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    preferred_element_type: Optional[jnp.dtype] = None,
    tiling: Optional[Tiling] = None,
    backend: Optional[Backend] = None,
    interpret: bool = False,
) -> jax.Array:
    """Grouped matmul: out[r] = lhs[r] @ rhs[group(r)], like `jax.lax.ragged_dot`.

    lhs: [m, k] rows sorted by group; rhs: [g, k, n]; group_sizes: [g] int32.
    Returns [m, n] in `preferred_element_type` (default lhs.dtype), accumulated
    in float32. Negative sizes count as 0 and the running sum of sizes is
    clamped to m; rows past it are zero. Differentiable in lhs and rhs (reverse
    mode: a custom VJP on every backend, so no `jax.jvp`).
    backend: None picks the platform's kernel ("gpu"/"tpu") or "xla" on CPU.
    tiling: (tm, tk, tn) tile sizes, default per backend (`gmm_default_tiling`);
      "xla" uses only tm (rows per tile, default `xla.default_tile_rows`).
    interpret: run a kernel backend in Pallas interpret mode (tests on CPU).
    """
    if lhs.ndim != 2:
        raise ValueError(f"lhs must be 2-D [m, k], got shape {lhs.shape}.")
    if rhs.ndim != 3:
        raise ValueError(f"rhs must be 3-D [g, k, n], got shape {rhs.shape}.")
    _check_float("lhs", lhs)
    _check_float("rhs", rhs)
    if lhs.dtype != rhs.dtype:
        raise ValueError(f"lhs dtype {lhs.dtype} and rhs dtype {rhs.dtype} must match.")
    if lhs.shape[1] != rhs.shape[1]:
        raise ValueError(
            f"lhs has k={lhs.shape[1]} (shape {lhs.shape}) but rhs has k={rhs.shape[1]} "
            f"(shape {rhs.shape}); they must match."
        )
    _check_group_sizes(group_sizes, rhs.shape[0], "rhs")
    out_dtype = _out_dtype(preferred_element_type, lhs.dtype)
    backend_ = _resolve_backend(backend, interpret)
    _check_tiling(tiling, backend_)
    tiling_ = None if tiling is None else tuple(int(t) for t in tiling)
    return _gmm_vjp(lhs, rhs, group_sizes, out_dtype, tiling_, backend_, bool(interpret))


def tgmm(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    *,
    preferred_element_type: Optional[jnp.dtype] = None,
    tiling: Optional[Tiling] = None,
    backend: Optional[Backend] = None,
    interpret: bool = False,
) -> jax.Array:
    """Transposed grouped matmul: out[i] = lhs[rows_i]ᵀ @ grad[rows_i] (weight gradient).

    lhs: [m, k]; grad: [m, n]; group_sizes: [g] int32 -> [g, k, n], zeros for
    empty groups. Same group-size clipping and arguments as `gmm`. Not
    differentiable through the kernel backends ("xla" is plain jax.numpy).
    """
    if lhs.ndim != 2:
        raise ValueError(f"lhs must be 2-D [m, k], got shape {lhs.shape}.")
    if grad.ndim != 2:
        raise ValueError(f"grad must be 2-D [m, n], got shape {grad.shape}.")
    _check_float("lhs", lhs)
    _check_float("grad", grad)
    if lhs.dtype != grad.dtype:
        raise ValueError(f"lhs dtype {lhs.dtype} and grad dtype {grad.dtype} must match.")
    if lhs.shape[0] != grad.shape[0]:
        raise ValueError(
            f"lhs has m={lhs.shape[0]} rows but grad has {grad.shape[0]}; they must match."
        )
    _check_group_sizes(group_sizes, None, "group_sizes")
    out_dtype = _out_dtype(preferred_element_type, lhs.dtype)
    backend_ = _resolve_backend(backend, interpret)
    _check_tiling(tiling, backend_)
    tiling_ = None if tiling is None else tuple(int(t) for t in tiling)
    return _tgmm_kernel(lhs, grad, group_sizes, out_dtype, tiling_, backend_, bool(interpret))
