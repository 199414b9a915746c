"""Cross-lowering: lower a kernel for CUDA or TPU on this CPU machine.

Interpret mode checks a kernel's numbers but never runs its Triton or Mosaic
lowering; lowering for the real platform does, so an op or block shape the
compiler cannot take fails here rather than first on an accelerator. Mosaic
lowering asks for the chip, so TPU lowering is done as for a TPU v5e.
"""
import jax
import pytest
from jax._src.pallas.mosaic import tpu_info

CUSTOM_CALL = {"cuda": "xla.gpu.triton", "tpu": "tpu_custom_call"}


@pytest.fixture
def kernel_calls(monkeypatch):
    """``kernel_calls(platform, fn, *args)``: lower ``jax.jit(fn)`` for ``platform``
    ('cuda' or 'tpu') and return how many Pallas kernel calls the program holds."""
    monkeypatch.setitem(tpu_info.registry, jax.devices()[0].device_kind,
                        lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5E, 1))
    tpu_info.get_tpu_info.cache_clear()

    def count(platform, fn, *args):
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
        return text.count(CUSTOM_CALL[platform])

    yield count
    tpu_info.get_tpu_info.cache_clear()
