"""Block-sparse self-attention for the decoder: builds the gin-chosen mask and calls the
Pallas block-sparse attention op. A learned top-k mask (SeerAttention-style) owns small gate
projections that are trained by distilling the block-pooled dense attention map.

`attention_kernel.prefill_method` runs the full-attention layers of a dense model through a
dynamic prefill mask (MInference, FlexPrefill, XAttention: `prefill_attention`) in every
forward pass (eval, scoring, training if set there) and in the prompt pass of `sample`;
decode steps after it attend densely over the cache, as the papers do."""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse_attention import (BlockLayoutMask, BlockMask, TopKBlockMask,
                                                   block_sparse_attention, make_mask,
                                                   topk_gate_distillation_loss)
from pallas_kernels.block_sparse_attention.dynamic import PrefillMask

DEFAULT_BLOCK = 64


@gin.configurable
def attention_kernel(backend: str | None = None, interpret: bool = False,
                     prefill_method: Any = None) -> dict:
    """Which block-sparse attention kernel the model calls: by default the device's
    (Triton on GPU, Mosaic on TPU, the XLA path on CPU); ``backend='gpu',
    interpret=True`` runs the Triton kernel in interpret mode on CPU.

    ``prefill_method``: a dynamic prefill mask spec for the full-attention layers of a dense
    model, e.g. ``{'kind': 'xattention', 'threshold': 0.9, 'stride': 8, 'block_size': 64}``
    (kinds 'minference', 'flexprefill', 'xattention'; see `prefill_attention`)."""
    return {"backend": backend, "interpret": interpret, "prefill_method": prefill_method}


def kernel_options() -> dict:
    """The op's backend keywords from `attention_kernel`."""
    opts = attention_kernel()
    return {"backend": opts["backend"], "interpret": opts["interpret"]}


def prefill_spec() -> Any:
    """The gin-chosen prefill method (None: dense attention)."""
    return attention_kernel()["prefill_method"]


def check_scanned_prefill() -> None:
    """Scanned layers run one program per position in the layer period, so a prefill method
    with one entry per layer (`MInferenceMask.layer_patterns`) cannot tell them apart."""
    spec = prefill_spec()
    if isinstance(spec, Mapping) and spec.get("layer_patterns"):
        raise ValueError(f"attention_kernel.prefill_method={spec!r}: layer_patterns (one entry "
                         f"per layer) needs ModelConfig.scan_layers=False")


def prefill_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
                      layer: int) -> jax.Array:
    """Causal attention of q ``[b, s, h, d]`` over k, v ``[b, s, kv_h, d]`` through the
    `prefill_spec` mask, whose layout the method estimates from q and k. The sequence is
    padded on the right to whole blocks (padding is its own segment and never seen by the
    real tokens); the estimators read the last real queries."""
    spec = prefill_spec()
    mask, block = build_mask(spec)
    if not isinstance(mask, PrefillMask):
        raise ValueError(f"attention_kernel.prefill_method={spec!r}: kind must be a prefill "
                         f"method ('minference', 'flexprefill', 'xattention')")
    b, s = q.shape[:2]
    mask = mask.bind(layer, s)
    seg = jnp.ones((b, s), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    pad = -s % block
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        seg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=-1)
    out = block_sparse_attention(q, k, v, mask, segment_ids=seg, block_q=block, block_k=block,
                                 **kernel_options())
    return out[:, :s]


def build_mask(spec: Mapping[str, Any] | BlockMask | None) -> tuple[BlockMask, int]:
    """A mask object and block size from a spec such as
    {"kind": "sliding_window", "window": 128, "block_size": 64}."""
    if spec is None:
        raise ValueError("ModelConfig.sparse_attention_mask must be set when an attention layer "
                         "is 'block_sparse', e.g. {'kind': 'sliding_window', 'window': 128}")
    if isinstance(spec, BlockMask):
        return spec, DEFAULT_BLOCK
    spec = dict(spec)
    block = int(spec.pop("block_size", DEFAULT_BLOCK))
    spec.pop("gate_dim", None)
    spec.pop("distill_weight", None)
    return make_mask(**spec), block


def check_causal(mask: BlockMask, seq_len: int) -> None:
    """A decoder must never see the future: reject masks that allow k > q."""
    if isinstance(mask, TopKBlockMask):
        ok = mask.causal
    else:
        pos = np.arange(min(seq_len, 256))
        ok = not np.any(np.asarray(mask.token_mask(pos[:, None], pos[None, :]))[np.triu_indices(len(pos), 1)])
    if not ok:
        raise ValueError(f"ModelConfig.sparse_attention_mask={mask!r} lets tokens attend to later "
                         f"positions; a decoder needs a causal mask (set causal=True)")


class BlockSparseSelfAttention(nn.Module):
    """q: [b, s, h, d], k/v: [b, s, kv_h, d] -> [b, s, h, d]."""

    spec: Any

    @nn.compact
    def __call__(self, q, k, v, segment_ids):
        mask, block = build_mask(self.spec)
        seq = q.shape[1]
        block = min(block, seq)
        if seq % block:
            raise ValueError(f"sequence length {seq} is not divisible by the block-sparse attention "
                             f"block_size={block}; pick a block size dividing it")
        check_causal(mask, seq)
        if isinstance(mask, TopKBlockMask):
            spec = dict(self.spec) if isinstance(self.spec, Mapping) else {}
            gate_dim = int(spec.get("gate_dim", 32))
            h, kvh, d = q.shape[2], k.shape[2], q.shape[3]
            init = nn.initializers.normal(stddev=1.0 / np.sqrt(d))
            gate = {"wq": self.param("gate_wq", init, (h, d, gate_dim), jnp.float32),
                    "wk": self.param("gate_wk", init, (kvh, d, gate_dim), jnp.float32)}
            mask = mask.with_params(gate)
            weight = float(spec.get("distill_weight", 1.0))
            if weight > 0 and self.is_mutable_collection("aux_loss"):
                loss = topk_gate_distillation_loss(q, k, mask, block_q=block, block_k=block,
                                                   segment_ids=segment_ids)
                self.sow("aux_loss", "gate_distill_loss", weight * loss)
                self.sow("metrics", "gate_distill_loss", loss)
        return block_sparse_attention(q, k, v, mask, segment_ids=segment_ids, block_q=block,
                                      block_k=block, **kernel_options())


def decode_rule(spec: Any) -> BlockMask:
    """The token rule a KV-cache decode applies for a block-sparse layer (the kernel's rule on
    token indices). Data-dependent and block-granular layouts have no token rule."""
    mask, _ = build_mask(spec)
    if isinstance(mask, PrefillMask):  # prefill methods: decode steps attend densely
        return mask.token_rule
    if isinstance(mask, (TopKBlockMask, BlockLayoutMask)):
        raise ValueError(f"ModelConfig.sparse_attention_mask={spec!r}: decoding with a KV cache "
                         f"supports token-rule masks (causal, sliding_window, global_local, "
                         f"strided, chunked), not {type(mask).__name__}")
    return mask
