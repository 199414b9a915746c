"""Block-sparse weight matmul (constant fan-in of stored blocks per output block column); see
ops.py."""

from pallas_kernels.block_sparse_matmul.ops import block_sparse_matmul, check_indices

__all__ = ["block_sparse_matmul", "check_indices"]
