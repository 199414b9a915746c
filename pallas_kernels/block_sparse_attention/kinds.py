"""Mask kinds by name: `make_mask(kind=..., **kwargs)` builds any registered `BlockMask`
(gin: `ModelConfig.sparse_attention_mask = {'kind': 'sliding_window', 'window': 256}`).

A new kind is one `BlockMask` subclass registered here with `MASK_KINDS.register(name)`
(from its own module, like `topk.py`); nothing else changes.
"""
from __future__ import annotations

import dataclasses

import gin

from pallas_kernels.block_sparse_attention import flexprefill, masks, minference, topk, xattention
from sparsejax.registry import Registry

MASK_KINDS: Registry[type[masks.BlockMask]] = Registry("attention mask kind")
for _name, _cls in (("causal", masks.CausalMask), ("sliding_window", masks.SlidingWindowMask),
                    ("global_local", masks.GlobalLocalMask), ("strided", masks.StridedMask),
                    ("chunked", masks.ChunkedMask), ("block_layout", masks.BlockLayoutMask),
                    ("top_k", topk.TopKBlockMask), ("minference", minference.MInferenceMask),
                    ("flexprefill", flexprefill.FlexPrefillMask),
                    ("xattention", xattention.XAttentionMask)):
    MASK_KINDS.register(_name, _cls)


@gin.configurable
def make_mask(kind: str = "causal", seq_len: int | None = None, block_size: int | None = None,
              **kwargs) -> masks.BlockMask:
    """Build a mask from keyword arguments (for gin bindings).

    ``seq_len`` / ``block_size`` are accepted for convenience and checked
    (``block_size`` must divide ``seq_len``); the op picks block sizes itself.
    """
    cls = MASK_KINDS.get(kind, "make_mask: kind")
    if seq_len is not None and block_size is not None and (block_size <= 0 or seq_len % block_size):
        raise ValueError(f"make_mask: block_size={block_size} must be positive and divide "
                         f"seq_len={seq_len}.")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(kwargs) - fields
    if unknown:
        raise ValueError(f"make_mask: unknown arguments {sorted(unknown)} for kind={kind!r}; "
                         f"valid: {sorted(fields)}.")
    return cls(**kwargs)
