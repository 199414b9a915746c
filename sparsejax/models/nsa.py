"""Native Sparse Attention (NSA; Yuan et al. 2025, arXiv 2502.11089), trainable from scratch:
`ModelConfig.attention_kinds = ('nsa',)` with the settings of `NSAConfig`.

Each query attends over its causal context through three branches whose outputs are mixed by
per-head sigmoid gates computed from the layer input (a linear map x -> [heads, 3]; the
paper's g^cmp, g^slc, g^win):

* **compressed**: the keys and values of every block of `compress_block` (l) tokens, taken
  every `compress_stride` (d) tokens, are mapped to one key and value by a learned MLP over
  the flattened block plus a learned intra-block position embedding (the paper's phi;
  hidden width head_dim, SiLU; one map per k and v, shared by the KV heads). The compressed
  key gets RoPE at the position of its block's last token. A query attends to the blocks
  that end at or before it and lie inside its own segment (blocks that cross a segment
  boundary are masked out for every query).
* **selected**: the compressed branch's attention probabilities, summed over the heads of a
  GQA group and over the queries of a query block of `select_block` (l') tokens, score the
  key blocks of l' tokens: compressed block i adds its probability to selection block j
  times the number of stride-d pieces they share (the paper's Eq. 9, with each compressed
  block counted where its tokens lie; select_block and compress_block are multiples of
  compress_stride). Each query block keeps `select_blocks` (n) key blocks, counting the
  first block (sink) and its `local_blocks` most recent ones (its own included), which are
  always kept; the rest are the causal blocks of highest score. The branch attends at token
  level over the kept blocks, causally and within segments, through the block-sparse
  attention op with that per-query-block layout, so it costs only the kept blocks. The
  selection is under stop_gradient (top-n is not differentiable): the scores are trained
  through the compressed branch's own output, as in the paper.
* **window**: causal sliding-window attention over the last `window` tokens (the
  block-sparse op with `SlidingWindowMask`), within segments.

Every branch has its own keys and values (the paper's remedy against shortcut learning
between branches); the query is shared. `Attention` projects them: 'key'/'value' for the
selected branch, 'key_compressed'/'value_compressed', 'key_window'/'value_window'.

A sequence whose length is not a multiple of `select_block` is padded at its end for the
selected and window branches (causality keeps the padding invisible to real tokens, and
padded queries do not score blocks), so any length runs. Decoding with a KV cache is not
supported for NSA layers (refused by `Attention`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse_attention import (BlockMask, CausalMask, SlidingWindowMask,
                                                   block_sparse_attention)
from pallas_kernels.block_sparse_attention.dynamic import cap_rows
from sparsejax.models.init import DEFAULT_KERNEL_INIT
from sparsejax.models.layers import rotary_embedding
from sparsejax.models.sparse_attention import kernel_options

Dtype = Any
BRANCHES = ("compressed", "selected", "window")  # the order of the gates
MASK_VALUE = -1e30  # finite: no NaN in softmax or its gradient when a row sees nothing


@gin.configurable
@dataclasses.dataclass(frozen=True)
class NSAConfig:
    """Settings of every 'nsa' attention layer (module docstring): compression blocks of
    `compress_block` tokens every `compress_stride` tokens; selection blocks of
    `select_block` tokens, `select_blocks` of them per query block counting the first block
    and the `local_blocks` most recent ones; a sliding window of `window` tokens."""

    compress_block: int = 32
    compress_stride: int = 16
    select_block: int = 64
    select_blocks: int = 16
    local_blocks: int = 2
    window: int = 512

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"NSAConfig.{f.name}={v!r} must be an int >= 1")
        if self.compress_block % self.compress_stride:
            raise ValueError(f"NSAConfig.compress_stride={self.compress_stride} must divide "
                             f"compress_block={self.compress_block}")
        if self.select_block % self.compress_stride:
            raise ValueError(f"NSAConfig.select_block={self.select_block} must be a multiple of "
                             f"compress_stride={self.compress_stride}")
        if self.select_blocks < self.local_blocks + 1:
            raise ValueError(f"NSAConfig.select_blocks={self.select_blocks} must be >= "
                             f"local_blocks + 1 = {self.local_blocks + 1}: it counts the first "
                             f"block and the local_blocks most recent ones")


# --- the compressed branch --------------------------------------------------------------------


def compressed_count(seq: int, cfg: NSAConfig) -> int:
    """Number of compression blocks that fit in `seq` tokens."""
    return max(0, (seq - cfg.compress_block) // cfg.compress_stride + 1)


def compressed_spans(seq: int, cfg: NSAConfig) -> np.ndarray:
    """Token indices of each compression block, [blocks, compress_block]."""
    starts = np.arange(compressed_count(seq, cfg)) * cfg.compress_stride
    return starts[:, None] + np.arange(cfg.compress_block)[None, :]


def compressed_visibility(segment_ids: jax.Array, cfg: NSAConfig) -> jax.Array:
    """[b, s] segment ids -> bool [b, s, blocks]: query t sees compression block i when the
    block ends at or before t and all its tokens are in t's segment."""
    seq = segment_ids.shape[1]
    spans = compressed_spans(seq, cfg)
    block_seg = segment_ids[:, spans]  # [b, blocks, l]
    whole = jnp.all(block_seg == block_seg[:, :, :1], axis=-1)  # [b, blocks]
    ends_before = spans[None, :, -1] <= np.arange(seq)[:, None]  # [s, blocks]
    same = segment_ids[:, :, None] == block_seg[:, None, :, 0]  # [b, s, blocks]
    return ends_before[None] & same & whole[:, None, :]


def compressed_attention(q: jax.Array, kc: jax.Array, vc: jax.Array, visible: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
    """q [b, s, h, d] over compressed keys/values [b, blocks, kv_heads, d] where `visible`
    [b, s, blocks] -> (output [b, s, h, d] in q's dtype, probabilities [b, h, s, blocks]
    float32). Rows that see no block give zeros."""
    b, s, h, d = q.shape
    kvh = kc.shape[2]
    qg = q.astype(jnp.float32).reshape(b, s, kvh, h // kvh, d)
    logits = jnp.einsum("bsngd,bcnd->bngsc", qg, kc.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST) / math.sqrt(d)
    vis = visible[:, None, None]  # [b, 1, 1, s, blocks]
    probs = jnp.where(vis, jax.nn.softmax(jnp.where(vis, logits, MASK_VALUE), axis=-1), 0.0)
    out = jnp.einsum("bngsc,bcnd->bsngd", probs, vc.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    return out.reshape(b, s, h, d).astype(q.dtype), probs.reshape(b, h, s, -1)


# --- the selection ----------------------------------------------------------------------------


def overlap_weights(blocks: int, select_count: int, cfg: NSAConfig) -> np.ndarray:
    """[compression blocks, selection blocks]: how many stride-long pieces of tokens
    compression block i shares with selection block j (Eq. 9's weights)."""
    start = np.arange(blocks)[:, None] * cfg.compress_stride
    sel = np.arange(select_count)[None, :] * cfg.select_block
    shared = (np.minimum(start + cfg.compress_block, sel + cfg.select_block)
              - np.maximum(start, sel))
    return (np.maximum(shared, 0) // cfg.compress_stride).astype(np.float32)


def selection_scores(probs: jax.Array, kv_heads: int, padded_len: int, cfg: NSAConfig
                     ) -> jax.Array:
    """Compressed-branch probabilities [b, h, s, blocks] -> selection-block scores
    [b, kv_heads, query blocks, key blocks] of a sequence padded to `padded_len`: summed over
    each GQA group's heads and each query block's queries, spread over the selection blocks
    by `overlap_weights`."""
    b, h, s, blocks = probs.shape
    p = probs.reshape(b, kv_heads, h // kv_heads, s, blocks).sum(2)
    p = jnp.pad(p, ((0, 0), (0, 0), (0, padded_len - s), (0, 0)))
    nb = padded_len // cfg.select_block
    p = p.reshape(b, kv_heads, nb, cfg.select_block, blocks).sum(3)
    w = jnp.asarray(overlap_weights(blocks, nb, cfg))
    return jnp.einsum("bnqc,ck->bnqk", p, w, precision=jax.lax.Precision.HIGHEST)


def select_layout(scores: jax.Array, cfg: NSAConfig) -> jax.Array:
    """Scores [b, kv_heads, qb, kb] -> the kept key blocks, bool [b, kv_heads, qb, kb]: the
    first block, the `local_blocks` most recent causal ones and the highest-scoring other
    causal blocks, `select_blocks` in all (fewer when fewer are causal). Ties go to the
    earlier block."""
    qb, kb = scores.shape[-2:]
    qi, kj = np.arange(qb)[:, None], np.arange(kb)[None, :]
    causal = kj <= qi
    forced = causal & ((kj == 0) | (kj > qi - cfg.local_blocks))
    return cap_rows(jnp.broadcast_to(causal, scores.shape), scores, forced, cfg.select_blocks)


@dataclasses.dataclass(frozen=True, eq=False)
class SelectedBlocksMask(BlockMask):
    """A causal block-sparse mask whose layout [b, heads, qb, kb] was computed in the trace
    (NSA's selection), listing at most `max_blocks` key blocks per query block."""

    layout: Any = None
    max_blocks: int = 1

    dynamic = True

    def token_mask(self, q_pos, k_pos):
        return k_pos <= q_pos

    @property
    def token_rule(self):
        return CausalMask()

    def max_blocks_per_row(self, seq_q: int, seq_k: int, block_q: int, block_k: int) -> int:
        return min(self.max_blocks, seq_k // block_k)

    def block_layout_dynamic(self, q, k, block_q, block_k):
        return self.layout

    def block_layout(self, seq_q, seq_k, block_q, block_k):
        raise ValueError("SelectedBlocksMask: the layout is traced; use block_layout_dynamic.")


# --- the module -------------------------------------------------------------------------------


class BlockCompressor(nn.Module):
    """phi: [b, s, kv_heads, d] -> one vector per compression block [b, blocks, kv_heads, d]:
    an MLP (hidden width d, SiLU) over the block's flattened tokens plus a learned
    intra-block position embedding, shared by the KV heads."""

    cfg: NSAConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d, l = x.shape[-1], self.cfg.compress_block
        axes = (None, None)
        pos = self.param("position_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(stddev=0.02), axes), (l, d), self.param_dtype)
        w1 = self.param("hidden", nn.with_logical_partitioning(DEFAULT_KERNEL_INIT, axes),
                        (l * d, d), self.param_dtype)
        b1 = self.param("hidden_bias", nn.with_logical_partitioning(
            nn.initializers.zeros, (None,)), (d,), self.param_dtype)
        w2 = self.param("out", nn.with_logical_partitioning(DEFAULT_KERNEL_INIT, axes),
                        (d, d), self.param_dtype)
        b2 = self.param("out_bias", nn.with_logical_partitioning(
            nn.initializers.zeros, (None,)), (d,), self.param_dtype)
        blocks = x[:, compressed_spans(x.shape[1], self.cfg)]  # [b, blocks, l, kv_heads, d]
        blocks = blocks + pos.astype(self.dtype)[None, None, :, None, :]
        b, n, _, kvh, _ = blocks.shape
        flat = jnp.moveaxis(blocks, 3, 2).reshape(b, n, kvh, l * d).astype(self.dtype)
        hidden = jax.nn.silu(flat @ w1.astype(self.dtype) + b1.astype(self.dtype))
        return hidden @ w2.astype(self.dtype) + b2.astype(self.dtype)


class NativeSparseAttention(nn.Module):
    """The three NSA branches and their gates (module docstring). x: the layer input
    [b, s, embed]; q [b, s, heads, d] with RoPE; `selected` and `window`: (k, v) [b, s,
    kv_heads, d] with RoPE on k; `compressed`: (k, v) before RoPE (the compressed keys get
    it at their block's end). -> [b, s, heads, d], or with `return_branches` a dict of the
    branch outputs, the gates [b, s, heads, 3], the selection scores and layout."""

    cfg: NSAConfig
    rope_theta: float = 10000.0
    rope_scaling: Any = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, q, selected, compressed, window, positions, segment_ids,
                 return_branches: bool = False):
        cfg = self.cfg
        b, s, h, d = q.shape
        kvh = selected[0].shape[2]
        if segment_ids is None:
            segment_ids = jnp.ones((b, s), jnp.int32)
        gate_kernel = self.param("gate", nn.with_logical_partitioning(
            DEFAULT_KERNEL_INIT, ("embed", "heads")), (x.shape[-1], h * 3), self.param_dtype)
        gate_bias = self.param("gate_bias", nn.with_logical_partitioning(
            nn.initializers.zeros, ("heads",)), (h * 3,), self.param_dtype)
        gates = jax.nn.sigmoid((x.astype(jnp.float32) @ gate_kernel.astype(jnp.float32)
                                + gate_bias.astype(jnp.float32)).reshape(b, s, h, 3))

        kc = BlockCompressor(cfg, self.dtype, self.param_dtype, name="compress_key")(
            compressed[0])
        vc = BlockCompressor(cfg, self.dtype, self.param_dtype, name="compress_value")(
            compressed[1])
        ends = compressed_spans(s, cfg)[:, -1]
        kc = rotary_embedding(kc, positions[:, ends], self.rope_theta, self.rope_scaling)
        out_c, probs = compressed_attention(q, kc, vc, compressed_visibility(segment_ids, cfg))

        blk = cfg.select_block
        padded = -(-s // blk) * blk
        scores = jax.lax.stop_gradient(selection_scores(probs, kvh, padded, cfg))
        layout = select_layout(scores, cfg)
        pad = ((0, 0), (0, padded - s), (0, 0), (0, 0))
        qp = jnp.pad(q, pad)
        seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, padded - s)),
                      constant_values=-1)
        kernel = kernel_options()
        mask = SelectedBlocksMask(jnp.repeat(layout, h // kvh, axis=1), cfg.select_blocks)
        out_s = block_sparse_attention(qp, jnp.pad(selected[0], pad), jnp.pad(selected[1], pad),
                                       mask, segment_ids=seg, block_q=blk, block_k=blk,
                                       **kernel)[:, :s]
        out_w = block_sparse_attention(qp, jnp.pad(window[0], pad), jnp.pad(window[1], pad),
                                       SlidingWindowMask(cfg.window), segment_ids=seg,
                                       block_q=blk, block_k=blk, **kernel)[:, :s]
        outs = (out_c, out_s, out_w)
        if return_branches:
            return {**dict(zip(BRANCHES, outs)), "gates": gates, "scores": scores,
                    "layout": layout}
        mixed = sum(gates[..., i:i + 1] * o.astype(jnp.float32) for i, o in enumerate(outs))
        return mixed.astype(q.dtype)
