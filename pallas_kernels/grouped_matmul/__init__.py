"""Grouped matmul (MoE expert matmul) with Pallas kernels for GPU and TPU; see ops.py."""

from pallas_kernels.grouped_matmul.ops import gmm, gmm_default_tiling, tgmm

__all__ = ["gmm", "tgmm", "gmm_default_tiling"]
