"""Multi-head self-attention with grouped-query heads, RoPE and packed-sequence masking.

`kind="dense"` uses `jax.nn.dot_product_attention` (the best implementation on the device),
optionally within a causal sliding window (`window` > 0: query i sees keys i - window < j <= i,
Mistral's definition); `kind="block_sparse"` calls the Pallas block-sparse attention op with a
gin-chosen mask; `kind="nsa"` is Native Sparse Attention (models/nsa.py: compressed, selected
and sliding-window branches, each with its own keys and values, mixed by learned gates).

Before RoPE, q and k may be RMS-normalized (`qk_norm`: 'head' normalizes each head's q and k
over head_dim, Qwen3; 'projection' the whole q and k projections, OLMoE) and q, k, v clipped
to [-clip_qkv, clip_qkv] after the norms (OLMoE).

`out_bias` adds a bias to the output projection (gpt-oss's attention_bias, with `qkv_bias`).
`attention_sinks` gives each head a learned logit that joins its softmax denominator and attends to
nothing (gpt-oss's attention sinks): a query's weights then sum to less than one.

With `decode=True` the layer reads and appends to a KV cache in the 'cache' collection (made
by `sparsejax.infer.cache.init_cache`): key/value [batch, cache_len, kv_heads, head_dim], the
position of each slot (-1: empty or padding) and the next free slot. Queries attend to the
filled slots whose position is not after theirs, so left-padded batched prompts work. A cache
with page bounds (Quest, models/quest.py) makes each single-token decode step attend over the
query-chosen pages only.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.models.formats import FormatSpec, Projection, module_path
from sparsejax.models.layers import (DEFAULT_KERNEL_INIT, Dtype, RMSNorm, as_tokens,
                                     rotary_embedding)
from sparsejax.models.nsa import NativeSparseAttention, NSAConfig
from sparsejax.models.qkv_capture import COLLECTION as QKV_COLLECTION
from sparsejax.models.quest import (QuestDecode, page_scores, paged_attention, select_pages,
                                    update_pages)
from sparsejax.models.remat import tag
from sparsejax.models.sparse_attention import (BlockSparseSelfAttention, decode_rule,
                                               prefill_attention, prefill_spec)
from sparsejax.models.sparse_mlp import project, shared_slots
from sparsejax.models.streaming_heads import (StreamingHeads, query_heads, split_heads,
                                              streaming_attention)
from sparsejax.models.thresholds import apply_site, keep_mask, site

ATTENTION_KINDS = ("dense", "block_sparse", "nsa")
QK_NORMS = ("none", "head", "projection")


def causal_segment_mask(segment_ids: jax.Array, window: int = 0) -> jax.Array:
    """[batch, seq] segment ids -> boolean [batch, 1, seq, seq]: causal, same segment and, if
    `window` > 0, at most `window - 1` tokens back."""
    seq = segment_ids.shape[-1]
    idx = jnp.arange(seq)
    causal = idx[None, :] <= idx[:, None]
    if window > 0:
        causal = causal & (idx[:, None] - idx[None, :] < window)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal[None] & same)[:, None]


def sink_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                   sinks: jax.Array) -> jax.Array:
    """Softmax attention whose denominator also holds one learned logit per head (gpt-oss;
    transformers' `eager_attention_forward` with `s_aux`). q [b, s, heads, d], k/v [b, L,
    kv_heads, d] (head i reads kv head i // (heads / kv_heads)), mask [b, 1, s, L] bool,
    sinks [heads] -> [b, s, heads, d]. Computed in float32."""
    b, s, h, d = q.shape
    kv = k.shape[2]
    qg = q.astype(jnp.float32).reshape(b, s, kv, h // kv, d)
    logits = jnp.einsum("bsngd,blnd->bngsl", qg, k.astype(jnp.float32)) / jnp.sqrt(
        jnp.float32(d))
    logits = jnp.where(mask[:, :, None], logits, -jnp.inf)  # [b, kv, g, s, L]
    sink = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(1, kv, h // kv, 1, 1),
                            logits.shape[:-1] + (1,))
    probs = jax.nn.softmax(jnp.concatenate([logits, sink], axis=-1), axis=-1)[..., :-1]
    out = jnp.einsum("bngsl,blnd->bsngd", probs, v.astype(jnp.float32))
    return out.reshape(b, s, h, d).astype(q.dtype)


def cache_mask(q_slots: jax.Array, slot_pos: jax.Array, positions: jax.Array, window: int,
               rule: Any = None) -> jax.Array:
    """Visibility [batch, 1, seq, cache_len] of cache slots for the queries at `positions`
    [batch, seq] (stored in slots `q_slots` [seq]); slot_pos [batch, cache_len] is -1 where
    empty. `rule`: a block-sparse token rule applied to slot indices (as the kernel does)."""
    kpos = slot_pos[:, None, :]  # [b, 1, L]
    qpos = positions[:, :, None]  # [b, s, 1]
    vis = (kpos >= 0) & (kpos <= qpos)
    if window > 0:
        vis = vis & (qpos - kpos < window)
    if rule is not None:
        k_slots = jnp.arange(slot_pos.shape[-1])
        vis = vis & rule.token_mask(q_slots[:, None], k_slots[None, :])[None]
    return vis[:, None]


class Attention(nn.Module):
    """Causal self-attention. x: [batch, seq, embed] -> [batch, seq, embed]."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    kind: str = "dense"
    sparse_mask: Any = None  # a block-sparse mask spec (dict of kwargs) when kind == "block_sparse"
    qkv_bias: bool = False
    window: int = 0  # dense sliding window (0: full causal)
    rope_scaling: Any = None  # a ModelConfig.rope_scaling dict
    qk_norm: str = "none"  # one of QK_NORMS (module docstring)
    clip_qkv: float = 0.0  # > 0: q, k, v clipped to [-clip_qkv, clip_qkv]
    out_bias: bool = False  # a bias on the output projection
    attention_sinks: bool = False  # a learned softmax-denominator logit per head (module docstring)
    norm_epsilon: float = 1e-6  # of the q/k norms
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    formats: FormatSpec = FormatSpec()
    layer: int = -1  # the layer's index (its streaming heads, models/streaming_heads.py)
    nsa: Any = None  # an NSAConfig when kind == "nsa" (None: NSAConfig() from gin)

    def _compact(self, name: str) -> bool:
        """Is projection `name` stored in a format other than dense (a `Projection` submodule
        of that name, models/formats/)? Dense kernels stay params of this module."""
        return self.formats.format_at(module_path(self, name)) != "dense"

    def _formatted(self, name, x, features, axes, use_bias=False):
        """x [tokens, in] @ the projection `name` in its weight format."""
        return Projection(features, axes, dtype=self.dtype, param_dtype=self.param_dtype,
                          use_bias=use_bias, formats=self.formats, name=name)(x)

    def _proj(self, x, heads, name, decode=False, slots=None):
        """x: [b, s, embed] -> [b, s, heads, head_dim]. Kernels are 2-D [in, out] like every
        other linear layer, so sparsity (ERK, N:M along the input dim) treats them alike."""
        if self._compact(name):
            y = self._formatted(name, as_tokens(x), heads * self.head_dim, ("embed", "heads"))
            if self.qkv_bias:
                y = y + self.param(f"{name}_bias", nn.with_logical_partitioning(
                    nn.initializers.zeros, ("heads",)), (heads * self.head_dim,),
                    self.param_dtype).astype(self.dtype)
            return y.reshape(*x.shape[:-1], heads, self.head_dim)
        kernel = self.param(
            name, nn.with_logical_partitioning(DEFAULT_KERNEL_INIT, ("embed", "heads")),
            (x.shape[-1], heads * self.head_dim), self.param_dtype)
        y = self._sited_matmul(f"{name}_in", as_tokens(x), kernel.astype(self.dtype), decode,
                               slots)
        if self.qkv_bias:
            bias = self.param(f"{name}_bias", nn.with_logical_partitioning(
                nn.initializers.zeros, ("heads",)), (heads * self.head_dim,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y.reshape(*x.shape[:-1], heads, self.head_dim)

    def _normalized(self, q, k, v):
        """q, k, v [b, s, heads, head_dim] after the q/k norms of `qk_norm` and the clipping of
        `clip_qkv`."""
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"Attention.qk_norm={self.qk_norm!r} is unknown; valid: {QK_NORMS}")
        if self.qk_norm != "none":
            q, k = self._qk_norm(q, "query_norm"), self._qk_norm(k, "key_norm")
        if self.clip_qkv > 0:
            q, k, v = (jnp.clip(t, -self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        return q, k, v

    def _qk_norm(self, x, name):
        """RMSNorm `name` of x [b, s, heads, head_dim]: over head_dim with one scale shared by
        the heads ('head'), or over heads * head_dim ('projection')."""
        if self.qk_norm == "head":
            return RMSNorm(self.norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                           axis_name="kv", name=name)(x)
        y = RMSNorm(self.norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                    axis_name="heads", name=name)(x.reshape(*x.shape[:-2], -1))
        return y.reshape(x.shape)

    def _sited_matmul(self, name, x, kernel, decode, slots=None):
        """x [tokens, in] @ kernel through the site `name` (thresholds: models/thresholds.py;
        at a decode step, the sparse path of models/sparse_mlp.py reads only kept rows)."""
        xs, keep = apply_site(self, name, x)
        if decode and keep is not None:
            return project(xs, kernel, keep, site(self, name), slots)
        return xs @ kernel

    def _qkv_slots(self, x):
        """At a decode step: one sparse-decode slot list for q, k and v (their common input
        x), or None (models/sparse_mlp.shared_slots)."""
        sites = [site(self, f"{n}_in") for n in ("query", "key", "value")]
        if any(s is None for s in sites):
            return None
        t = as_tokens(x)
        return shared_slots([keep_mask(s, t) for s in sites], sites, t.shape[0])

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                 decode: bool = False) -> jax.Array:
        slots = self._qkv_slots(x) if decode else None
        q = self._proj(x, self.num_heads, "query", decode, slots)  # [b, s, h, d]
        k = self._proj(x, self.num_kv_heads, "key", decode, slots)  # [b, s, kv_h, d]
        v = self._proj(x, self.num_kv_heads, "value", decode, slots)
        q, k, v = self._normalized(q, k, v)
        q = tag(rotary_embedding(q, positions, self.rope_theta, self.rope_scaling), "query_proj")
        k = tag(rotary_embedding(k, positions, self.rope_theta, self.rope_scaling), "key_proj")
        v = tag(v, "value_proj")
        q = nn.with_logical_constraint(q, ("batch", "seq", "heads", "kv"))
        sinks = None
        if self.attention_sinks:
            sinks = self.param("sinks", nn.with_logical_partitioning(
                nn.initializers.zeros, ("heads",)), (self.num_heads,), self.param_dtype)
        if self.is_mutable_collection(QKV_COLLECTION):  # head calibrations read these
            self.sow(QKV_COLLECTION, "qkv", (q, k, v))
        if decode and self.kind == "nsa":
            raise ValueError("decode=True: 'nsa' layers (ModelConfig.attention_kinds) do not "
                             "decode with a KV cache yet (sample, longeval, generation); "
                             "valid: 'dense' or 'block_sparse' layers")
        if decode:
            out = self._cached_attention(q, k, v, positions, segment_ids, sinks)
        elif self._prefill_method(sinks):
            out = prefill_attention(q, k, v, segment_ids, self.layer)
        elif self.kind == "dense" and sinks is not None:
            out = sink_attention(q, k, v, causal_segment_mask(segment_ids, self.window), sinks)
        elif self.kind == "dense":
            out = jax.nn.dot_product_attention(
                q, k, v, mask=causal_segment_mask(segment_ids, self.window))
        elif self.kind == "block_sparse":
            if sinks is not None:
                raise ValueError("Attention.attention_sinks=True needs dense attention, not block_sparse")
            out = BlockSparseSelfAttention(self.sparse_mask, name="block_sparse")(
                q, k, v, segment_ids)
        elif self.kind == "nsa":
            if sinks is not None:
                raise ValueError("Attention.attention_sinks=True needs dense attention, not nsa")
            out = self._nsa_attention(x, q, (k, v), positions, segment_ids)
        else:
            raise ValueError(f"attention kind={self.kind!r} is unknown; valid: {ATTENTION_KINDS}")
        out = tag(nn.with_logical_constraint(out, ("batch", "seq", "heads", "kv")), "attention_out")
        return self._out_proj(out.reshape(-1, self.num_heads * self.head_dim), x.shape, decode)

    def _prefill_method(self, sinks) -> bool:
        """Whether `attention_kernel.prefill_method` runs this layer: a dense layer with full
        causal attention (windowed layers keep their window)."""
        if self.kind != "dense" or self.window > 0 or prefill_spec() is None:
            return False
        if sinks is not None:
            raise ValueError(f"attention_kernel.prefill_method={prefill_spec()!r} does not "
                             f"support ModelConfig.attention_sinks=True (gpt-oss): the sinks "
                             f"need dense attention")
        return True

    def _nsa_attention(self, x, q, selected, positions, segment_ids):
        """NSA (models/nsa.py) over q and the selected branch's (k, v), projecting the
        compressed and window branches' own keys and values from x (with the same q/k norms
        and clipping; RoPE on the window keys here, on the compressed keys after
        compression)."""
        if self.window > 0:
            raise ValueError(f"ModelConfig.sliding_window={self.window} applies to dense "
                             f"layers; an 'nsa' layer's window is NSAConfig.window")
        branches = {}
        for branch in ("compressed", "window"):
            k = self._proj(x, self.num_kv_heads, f"key_{branch}")
            v = self._proj(x, self.num_kv_heads, f"value_{branch}")
            if self.qk_norm != "none":
                k = self._qk_norm(k, f"key_norm_{branch}")
            if self.clip_qkv > 0:
                k, v = (jnp.clip(t, -self.clip_qkv, self.clip_qkv) for t in (k, v))
            branches[branch] = (k, v)
        k, v = branches["window"]
        branches["window"] = (rotary_embedding(k, positions, self.rope_theta,
                                               self.rope_scaling), v)
        settings = self.nsa if self.nsa is not None else NSAConfig()
        return NativeSparseAttention(settings, self.rope_theta, self.rope_scaling,
                                     dtype=self.dtype, param_dtype=self.param_dtype,
                                     name="nsa")(x, q, selected, branches["compressed"],
                                                 branches["window"], positions, segment_ids)

    def _out_proj(self, out: jax.Array, shape: tuple[int, ...], decode: bool = False) -> jax.Array:
        """out: [tokens, heads * head_dim] -> [*shape] (a method of its own, so that
        post-training calibration can read the projection's input with
        `nn.intercept_methods`, as it reads `_proj`'s)."""
        if self._compact("out"):
            y = self._formatted("out", out.astype(self.dtype), shape[-1], ("heads", "embed"))
        else:
            out_kernel = self.param(
                "out", nn.with_logical_partitioning(DEFAULT_KERNEL_INIT, ("heads", "embed")),
                (self.num_heads * self.head_dim, shape[-1]), self.param_dtype)
            y = self._sited_matmul("out_in", out.astype(self.dtype),
                                   out_kernel.astype(self.dtype), decode)
        if self.out_bias:
            bias = self.param("out_bias", nn.with_logical_partitioning(
                nn.initializers.zeros, ("embed",)), (shape[-1],), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y.reshape(shape)

    def _cached_attention(self, q, k, v, positions, segment_ids, sinks=None):
        """Appends k/v to the cache and attends over it: the retrieval heads over the whole
        cache (`_full_cache_attention`), the streaming heads of this layer, if any, over their
        sink + recent ring (models/streaming_heads.py). `sinks` [heads]: learned sink logits
        (gpt-oss), for the whole-cache attention only."""
        if not self.has_variable("cache", "cached_key"):
            raise ValueError("decode=True needs a KV cache in the 'cache' collection; build it "
                             "with sparsejax.infer.cache.init_cache")
        if sinks is not None and (self.has_variable("cache", "stream_key")
                                  or self.has_variable("cache", "page_min")):
            raise ValueError("ModelConfig.attention_sinks=True is not supported with streaming "
                             "heads or Quest decoding; decode with the full KV cache")
        if not self.has_variable("cache", "stream_key"):
            return self._full_cache_attention(q, k, v, positions, segment_ids, sinks)
        settings = StreamingHeads()
        group = self.num_heads // self.num_kv_heads
        full, stream = split_heads(self.num_kv_heads, settings.of_layer(self.layer))
        if len(stream) != self.get_variable("cache", "stream_key").shape[2]:
            raise ValueError(f"the cache of layer {self.layer} was built for other streaming "
                             f"heads than StreamingHeads.heads={settings.heads!r}")
        idx = self.get_variable("cache", "index")
        slot_pos = jnp.where(segment_ids != 0, positions, -1).astype(jnp.int32)
        ring = {n: self.variable("cache", n) for n in
                ("stream_key", "stream_value", "stream_pos", "stream_slot")}
        out_s, new = streaming_attention(q[:, :, query_heads(stream, group)], k[:, :, stream],
                                         v[:, :, stream], {n: r.value for n, r in ring.items()},
                                         slot_pos, positions, idx, settings, self.window)
        for n, r in ring.items():
            r.value = new[n]
        out_f = self._full_cache_attention(q[:, :, query_heads(full, group)], k[:, :, full],
                                           v[:, :, full], positions, segment_ids)
        order = query_heads(full, group) + query_heads(stream, group)
        inverse = [order.index(h) for h in range(self.num_heads)]
        return jnp.concatenate([out_f, out_s], axis=2)[:, :, inverse]

    def _full_cache_attention(self, q, k, v, positions, segment_ids, sinks=None):
        """Appends k/v at the cache's next free slot and attends over the whole cache (no
        attention when every KV head of the layer streams); `sinks`: as `sink_attention`."""
        ck = self.variable("cache", "cached_key", None)
        cv = self.variable("cache", "cached_value", None)
        cpos, cidx = self.variable("cache", "pos", None), self.variable("cache", "index", None)
        rule = None
        if self.kind == "block_sparse":
            rule = decode_rule(self.sparse_mask)
        idx = cidx.value
        s = q.shape[1]
        slot_pos = jnp.where(segment_ids != 0, positions, -1).astype(jnp.int32)
        ck.value = jax.lax.dynamic_update_slice(ck.value, k.astype(ck.value.dtype), (0, idx, 0, 0))
        cv.value = jax.lax.dynamic_update_slice(cv.value, v.astype(cv.value.dtype), (0, idx, 0, 0))
        cpos.value = jax.lax.dynamic_update_slice(cpos.value, slot_pos, (0, idx))
        cidx.value = idx + s
        if k.shape[2] == 0:  # every KV head streams: only the slot bookkeeping above
            return q
        if self.has_variable("cache", "page_min"):  # Quest decoding (models/quest.py)
            quest = QuestDecode()
            quest.check_cache(ck.value.shape[1])
            pmin, pmax = self.variable("cache", "page_min"), self.variable("cache", "page_max")
            pmin.value, pmax.value = update_pages(pmin.value, pmax.value, k, slot_pos, idx,
                                                  quest.page_size)
            if s == 1:  # a decode step: the chosen pages only
                b, kvh = q.shape[0], ck.value.shape[2]
                qg = q[:, 0].reshape(b, kvh, q.shape[2] // kvh, q.shape[3])
                chosen = select_pages(page_scores(qg, pmin.value, pmax.value),
                                      idx // quest.page_size, quest)
                return paged_attention(q, ck.value, cv.value, cpos.value, chosen, positions,
                                       quest.page_size, self.window, rule, q_slot=idx)
        if s > 1 and self._prefill_method(sinks):  # the prompt pass: the cache held nothing
            return prefill_attention(q, k, v, segment_ids, self.layer)
        mask = cache_mask(idx + jnp.arange(s), cpos.value, positions, self.window, rule)
        if sinks is not None:
            return sink_attention(q, ck.value.astype(q.dtype), cv.value.astype(q.dtype), mask,
                                  sinks)
        return jax.nn.dot_product_attention(q, ck.value.astype(q.dtype),
                                            cv.value.astype(q.dtype), mask=mask)
