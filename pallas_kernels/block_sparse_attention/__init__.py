"""Block-sparse attention: public op, masks, GPU launch settings and the dense reference."""
from pallas_kernels.block_sparse_attention.gpu_config import GpuConfig, PassConfig
from pallas_kernels.block_sparse_attention.kinds import MASK_KINDS, make_mask
from pallas_kernels.block_sparse_attention.masks import (BlockLayoutMask, BlockMask, CausalMask,
                                                         ChunkedMask, GlobalLocalMask,
                                                         SlidingWindowMask, StridedMask, compress)
from pallas_kernels.block_sparse_attention.ops import block_sparse_attention
from pallas_kernels.block_sparse_attention.reference import reference_attention
from pallas_kernels.block_sparse_attention.topk import (TopKBlockMask, init_gate_params,
                                                        topk_gate_distillation_loss)

__all__ = ["BlockLayoutMask", "BlockMask", "CausalMask", "ChunkedMask", "GlobalLocalMask",
           "GpuConfig", "MASK_KINDS", "PassConfig", "SlidingWindowMask", "StridedMask",
           "TopKBlockMask", "block_sparse_attention", "compress", "init_gate_params",
           "make_mask", "reference_attention", "topk_gate_distillation_loss"]
