"""Gathered matmuls for activation-sparse decode (only the active rows or columns of a
weight are read); see ops.py."""

from pallas_kernels.gather_matmul.ops import gather_matmul

__all__ = ["gather_matmul"]
