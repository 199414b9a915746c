"""Mosaic GPU interpret mode: the one module that touches its private JAX API.

JAX ships a CPU interpreter for Mosaic GPU (`plgpu`) kernels that simulates GMEM, SMEM,
barriers, TMA copies and WGMMA with host callbacks (jax._src.pallas.mosaic_gpu.interpret,
jax 0.10). It is private API, so every Mosaic GPU kernel in pallas_kernels reaches it only
through here: the names it relies on are pinned below and looked up once at import; on a
JAX without them, importing still works (compiled kernels do not need the interpreter) and
asking for interpret mode raises an error naming what is missing.

What the interpreter covers in jax 0.10.2, as the kernels here use it: `plgpu.kernel` with a
static grid whose program coordinates come from `lax.axis_index` of the grid names
(`pl.program_id` reads as 0 and dynamic grid bounds, scalar prefetch and BlockSpec index maps
are refused); scalar reads of GMEM refs; `copy_gmem_to_smem` / `copy_smem_to_gmem` with
dynamic slices into tiled and swizzled SMEM; barriers; `wgmma` on SMEM operands (computed
eagerly as an f32 `np.matmul`) and zero-initialised `plgpu.ACC` accumulators, which must be
allocated by a `run_scoped` of their own. It does not cover a transposed operand view
(`ref.T`, a TransposeTransform) as a WGMMA operand. Reads out of bounds raise by default.
Copies and WGMMAs run eagerly and `wgmma_wait`, `commit_smem` and `wait_smem_to_gmem` do
nothing, so a missing wait that real asynchronous hardware would expose passes here; the
numbers are checked, the synchronisation is not.

If an interpreted kernel raises, the interpreter's global state is left behind and must be
reset with `reset_state()` before the next interpreted kernel in the process.
"""
from __future__ import annotations

import importlib

import jax

# (module, attribute) pairs this module relies on, all from jax 0.10.2.
_PINNED = (
    ("jax._src.pallas.mosaic_gpu.interpret.params", "InterpretGPUParams"),
    ("jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call",
     "reset_gpu_interpret_mode_state"),
)


def _resolve() -> tuple[dict, list[str]]:
    found, missing = {}, []
    for module, name in _PINNED:
        try:
            found[name] = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            missing.append(f"{module}.{name}")
    return found, missing


_API, _MISSING = _resolve()


def available() -> bool:
    """Whether this JAX has the Mosaic GPU interpret mode API pinned above."""
    return not _MISSING


def _require() -> dict:
    if _MISSING:
        raise RuntimeError(
            f"Mosaic GPU interpret mode needs {', '.join(_MISSING)}, which jax "
            f"{jax.__version__} lacks (pallas_kernels/mosaic_gpu_interpret.py pins the private "
            f"API of jax 0.10.2). Run the kernel compiled on a GPU, or use backend='xla'.")
    return _API


def params(**kwargs):
    """An `InterpretGPUParams` (its defaults: out-of-bounds reads raise, fresh SMEM holds
    NaNs, no race detection; `kwargs` override them)."""
    return _require()["InterpretGPUParams"](**kwargs)


def kernel_interpret(interpret: bool):
    """The `interpret=` argument of `plgpu.kernel`: interpret-mode params, or None to
    compile for the GPU."""
    return params() if interpret else None


def reset_state() -> None:
    """Drops the interpreter's global state (needed after an interpreted kernel raised)."""
    _require()["reset_gpu_interpret_mode_state"]()
