"""Multi-head latent attention (MLA, DeepSeek-V2 / V3), on when `ModelConfig.kv_lora_rank` > 0.

Per token, keys and values come from one compressed latent: `kv_a` projects x to
[kv_lora_rank + qk_rope_head_dim]; the first part, RMS-normalized (`kv_a_norm`), is the latent
c, the rest one rotary key k_rot shared by every head. `kv_b` expands c to each head's
non-rotary key (head_dim - qk_rope_head_dim wide) and value (`v_head_dim`); a head's key is
[k_nope, k_rot]. Queries come from `query` (x -> heads * head_dim) or, with `q_lora_rank` > 0,
from the low-rank `query_a` -> RMSNorm `query_a_norm` -> `query_b`; their last
qk_rope_head_dim dims get RoPE (`rope_interleave`: those dims are laid out as interleaved
pairs, DeepSeek's layout; they are de-interleaved first, which changes no score since q and k
are permuted alike). Scores are scaled by head_dim ** -0.5, times mscale(factor,
mscale_all_dim) ** 2 under a YaRN `rope_scaling` with `mscale_all_dim` (transformers'
`yarn_apply_mscale`). Every projection goes through `Projection`, so weight formats, masks and
post-training pruning apply to all five.

With `decode=True` the 'cache' collection (sparsejax.infer.cache.init_cache) holds only the
latent c [batch, cache_len, kv_lora_rank] (after its norm) and the rotated k_rot [batch,
cache_len, qk_rope_head_dim], plus slot positions and the next free slot; every step expands
the cached latents through `kv_b`. Per token and layer that is kv_lora_rank +
qk_rope_head_dim numbers instead of a full cache's heads * (head_dim + v_head_dim):
DeepSeek-V2-Lite (16 heads, 512 + 64 vs 16 * (192 + 128)) stores 576 / 5120 = 11.25% (8.9x
less), DeepSeek-V3 and V2 (128 heads) 576 / 40960 = 1.41% (71x less).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.models.attention import cache_mask, causal_segment_mask
from sparsejax.models.formats import FormatSpec, Projection
from sparsejax.models.layers import Dtype, RMSNorm, as_tokens, rotary_embedding
from sparsejax.models.remat import tag
from sparsejax.models.rope import _yarn_mscale
from sparsejax.models.sparse_attention import prefill_spec

# ModelConfig settings of MLA and their values with MLA off
SETTINGS = {"q_lora_rank": 0, "qk_rope_head_dim": 0, "v_head_dim": 0,
            "rope_interleave": False}


def check_latent_attention(cfg: Any) -> None:
    """ValueError naming the ModelConfig setting when MLA's settings do not fit together."""
    rank = int(cfg.kv_lora_rank)
    if rank < 0:
        raise ValueError(f"ModelConfig.kv_lora_rank={rank} must be >= 0 (0: standard "
                         f"attention, > 0: multi-head latent attention)")
    if rank == 0:
        for name, off in SETTINGS.items():
            if getattr(cfg, name) != off:
                raise ValueError(f"ModelConfig.{name}={getattr(cfg, name)!r} needs multi-head "
                                 f"latent attention (ModelConfig.kv_lora_rank > 0)")
        return
    rope, head = int(cfg.qk_rope_head_dim), int(cfg.head_dim)
    if rope < 2 or rope % 2 or rope >= head:
        raise ValueError(f"ModelConfig.qk_rope_head_dim={rope} must be even, >= 2 and below "
                         f"head_dim={head} (head_dim = qk_nope_head_dim + qk_rope_head_dim)")
    if int(cfg.v_head_dim) < 1:
        raise ValueError(f"ModelConfig.v_head_dim={cfg.v_head_dim} must be >= 1 with "
                         f"kv_lora_rank > 0")
    if int(cfg.q_lora_rank) < 0:
        raise ValueError(f"ModelConfig.q_lora_rank={cfg.q_lora_rank} must be >= 0 (0: one "
                         f"query projection)")
    if not isinstance(cfg.rope_interleave, bool):
        raise ValueError(f"ModelConfig.rope_interleave={cfg.rope_interleave!r} must be True "
                         f"or False")
    if cfg.num_kv_heads != cfg.num_heads:
        raise ValueError(f"ModelConfig.num_kv_heads={cfg.num_kv_heads} must equal num_heads="
                         f"{cfg.num_heads} with multi-head latent attention (each head "
                         f"expands its own key and value from the latent)")
    given = {"qkv_bias": cfg.qkv_bias, "qk_norm": cfg.qk_norm != "none",
             "clip_qkv": cfg.clip_qkv, "sliding_window": cfg.sliding_window,
             "attention_kinds": any(k != "dense" for k in cfg.attention_kinds),
             "out_bias": getattr(cfg, "out_bias", False),
             "attention_sinks": getattr(cfg, "attention_sinks", False)}
    for name, on in given.items():
        if on:
            raise ValueError(f"ModelConfig.{name}={getattr(cfg, name)!r} is not supported with "
                             f"multi-head latent attention (kv_lora_rank > 0)")


def softmax_scale(head_dim: int, rope_scaling: Any) -> float:
    """head_dim ** -0.5, times mscale(factor, mscale_all_dim) ** 2 under a scaling with
    `mscale_all_dim` (YaRN's correction of the whole score, as DeepSeek applies it)."""
    scale = head_dim ** -0.5
    m_all = (rope_scaling or {}).get("mscale_all_dim")
    if m_all:
        m = _yarn_mscale(float(rope_scaling["factor"]), float(m_all))
        scale = scale * m * m
    return scale


def deinterleave(x: jax.Array) -> jax.Array:
    """[..., d] with rotary pairs (x0, x1), (x2, x3), ... -> [x0, x2, ..., x1, x3, ...], the
    half-split layout `rotary_embedding` rotates."""
    return jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


class LatentAttention(nn.Module):
    """Causal multi-head latent attention. x: [batch, seq, embed] -> [batch, seq, embed]."""

    num_heads: int
    head_dim: int  # of q and k: qk_nope_head_dim + qk_rope_head_dim
    qk_rope_head_dim: int
    v_head_dim: int
    kv_lora_rank: int
    q_lora_rank: int = 0
    rope_interleave: bool = False
    rope_theta: float = 10000.0
    rope_scaling: Any = None
    norm_epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    formats: FormatSpec = FormatSpec()

    def _dense(self, name: str, x: jax.Array, features: int, axes: tuple[str, str]):
        return Projection(features, axes, dtype=self.dtype, param_dtype=self.param_dtype,
                          formats=self.formats, name=name)(x.astype(self.dtype))

    def _norm(self, name: str, x: jax.Array) -> jax.Array:
        return RMSNorm(self.norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                       axis_name="kv", name=name)(x)

    def _rope(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        if self.rope_interleave:
            x = deinterleave(x)
        return rotary_embedding(x, positions, self.rope_theta, self.rope_scaling)

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                 decode: bool = False) -> jax.Array:
        if prefill_spec() is not None:
            raise ValueError(f"attention_kernel.prefill_method={prefill_spec()!r} is not "
                             f"supported with multi-head latent attention "
                             f"(ModelConfig.kv_lora_rank > 0)")
        b, s, _ = x.shape
        h, d, r, rope = self.num_heads, self.head_dim, self.kv_lora_rank, self.qk_rope_head_dim
        t = as_tokens(x)
        if self.q_lora_rank:
            q = self._norm("query_a_norm", self._dense("query_a", t, self.q_lora_rank,
                                                       ("embed", "kv")))
            q = self._dense("query_b", q, h * d, ("kv", "heads"))
        else:
            q = self._dense("query", t, h * d, ("embed", "heads"))
        q = q.reshape(b, s, h, d)
        q = jnp.concatenate([q[..., :d - rope], self._rope(q[..., d - rope:], positions)], -1)
        kv = self._dense("kv_a", t, r + rope, ("embed", "kv")).reshape(b, s, r + rope)
        latent = self._norm("kv_a_norm", kv[..., :r])  # [b, s, r]
        k_rot = self._rope(kv[..., None, r:], positions)[:, :, 0]  # [b, s, rope]
        q = tag(nn.with_logical_constraint(q, ("batch", "seq", "heads", "kv")), "query_proj")
        if decode:
            latent, k_rot, mask = self._cached(latent, k_rot, positions, segment_ids)
        else:
            mask = causal_segment_mask(segment_ids)
        n = latent.shape[1]
        kvb = self._dense("kv_b", as_tokens(latent), h * (d - rope + self.v_head_dim),
                          ("kv", "heads")).reshape(b, n, h, d - rope + self.v_head_dim)
        k = jnp.concatenate([kvb[..., :d - rope],
                             jnp.broadcast_to(k_rot[:, :, None].astype(kvb.dtype),
                                              (b, n, h, rope))], axis=-1)
        v = tag(kvb[..., d - rope:], "value_proj")
        k = tag(k, "key_proj")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
        scores = scores * softmax_scale(d, self.rope_scaling)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(self.dtype))
        out = tag(nn.with_logical_constraint(out, ("batch", "seq", "heads", "kv")),
                  "attention_out")
        y = self._dense("out", out.reshape(-1, h * self.v_head_dim), x.shape[-1],
                        ("heads", "embed"))
        return y.reshape(x.shape)

    def _cached(self, latent, k_rot, positions, segment_ids):
        """Writes this step's latents and rotary keys at the cache's next free slot; returns
        the whole cache's and the queries' visibility mask [b, 1, s, cache_len]."""
        if not self.has_variable("cache", "cached_latent"):
            raise ValueError("decode=True needs a latent KV cache in the 'cache' collection; "
                             "build it with sparsejax.infer.cache.init_cache")
        cl = self.variable("cache", "cached_latent", None)
        cr = self.variable("cache", "cached_rope_key", None)
        cpos, cidx = self.variable("cache", "pos", None), self.variable("cache", "index", None)
        idx, s = cidx.value, latent.shape[1]
        slot_pos = jnp.where(segment_ids != 0, positions, -1).astype(jnp.int32)
        cl.value = jax.lax.dynamic_update_slice(cl.value, latent.astype(cl.value.dtype),
                                                (0, idx, 0))
        cr.value = jax.lax.dynamic_update_slice(cr.value, k_rot.astype(cr.value.dtype),
                                                (0, idx, 0))
        cpos.value = jax.lax.dynamic_update_slice(cpos.value, slot_pos, (0, idx))
        cidx.value = idx + s
        mask = cache_mask(idx + jnp.arange(s), cpos.value, positions, 0)
        return cl.value.astype(self.dtype), cr.value.astype(self.dtype), mask


def cache_numbers(cfg: Any) -> tuple[int, int]:
    """(numbers cached per token and layer by MLA, by a full key/value cache of the same
    heads): kv_lora_rank + qk_rope_head_dim vs heads * (head_dim + v_head_dim)."""
    return (int(cfg.kv_lora_rank) + int(cfg.qk_rope_head_dim),
            int(cfg.num_heads) * (int(cfg.head_dim) + int(cfg.v_head_dim)))

