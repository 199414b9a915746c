"""Cross-lowering: lower a kernel for CUDA or TPU on this CPU machine.

Interpret mode checks a kernel's numbers but never runs its Triton or Mosaic
lowering; lowering for the real platform does, so an op or block shape the
compiler cannot take fails here rather than first on an accelerator. Mosaic
lowering asks for the chip, so TPU lowering is done as for a TPU v5e; Mosaic
GPU kernels lower for CUDA as for Hopper (sm_90, its default without a GPU)
and are counted by their own custom call ("mosaic_gpu" below).
"""
import jax
import pytest
from jax._src.pallas.mosaic import tpu_info

CUSTOM_CALL = {"cuda": "xla.gpu.triton", "tpu": "tpu_custom_call", "mosaic_gpu": "mosaic_gpu_v2"}
LOWERING_PLATFORM = {"mosaic_gpu": "cuda"}


@pytest.fixture
def kernel_calls(monkeypatch):
    """``kernel_calls(platform, fn, *args)``: lower ``jax.jit(fn)`` for ``platform``
    ('cuda' for Triton kernels, 'mosaic_gpu' for Mosaic GPU ones, or 'tpu') and return
    how many Pallas kernel calls the program holds."""
    monkeypatch.setitem(tpu_info.registry, jax.devices()[0].device_kind,
                        lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5E, 1))
    tpu_info.get_tpu_info.cache_clear()

    def count(platform, fn, *args):
        target = LOWERING_PLATFORM.get(platform, platform)
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=(target,)).as_text()
        return text.count(CUSTOM_CALL[platform])

    yield count
    tpu_info.get_tpu_info.cache_clear()
