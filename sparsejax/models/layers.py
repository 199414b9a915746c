"""Basic transformer layers: RMSNorm, rotary embeddings, token embedding, gated MLP.

Every parameter carries logical axis names (`embed`, `mlp`, `vocab`, ...) so that one
rules table (sparsejax.parallel.rules) can shard it on any mesh.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.models import sparse_mlp
from sparsejax.models.act_record import record
from sparsejax.models.activations import SWIGLU_ALPHA, SWIGLU_LIMIT, gated
from sparsejax.models.formats import FormatSpec, Projection
from sparsejax.models.init import DEFAULT_KERNEL_INIT, zero_padding  # noqa: F401 (re-exported)
from sparsejax.models.rope import rope_frequencies
from sparsejax.models.thresholds import apply_site

Dtype = Any

def dtype_from_name(name: str | Dtype) -> Dtype:
    """Maps 'float32' / 'bfloat16' / a dtype to a jnp dtype, with a clear error."""
    if not isinstance(name, str):
        return jnp.dtype(name)
    valid = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
    if name not in valid:
        raise ValueError(f"dtype={name!r} is not supported; valid: {sorted(valid)}")
    return valid[name]


class RMSNorm(nn.Module):
    """Root-mean-square layer norm over the last axis, computed in float32. `axis_name`: the
    logical axis of its scale ('embed' for the residual stream)."""

    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
            (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


def rotary_embedding(x: jax.Array, positions: jax.Array, theta: float = 10000.0,
                     scaling: Any = None) -> jax.Array:
    """Applies RoPE in the half-split layout (HF's `rotate_half`). x: [batch, seq, heads,
    head_dim]; positions: [batch, seq]; `scaling`: a `ModelConfig.rope_scaling` dict or None."""
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even for rotary embeddings")
    inv_freq, mult = rope_frequencies(head_dim, theta, scaling)  # [d/2]
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [b, s, d/2]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    if mult != 1.0:
        sin, cos = sin * mult, cos * mult
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Embed(nn.Module):
    """Token embedding; `attend` reuses the table as the output projection (weight tying).
    Rows from `real_vocab_size` on are padding and start at zero."""

    vocab_size: int
    embed_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    real_vocab_size: int | None = None

    def setup(self):
        init = zero_padding(nn.initializers.normal(stddev=1.0), 0, self.real_vocab_size)
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(init, ("vocab", "embed")),
            (self.vocab_size, self.embed_dim), self.param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        y = as_tokens(x) @ self.embedding.astype(self.dtype).T
        return y.reshape(x.shape[:-1] + (self.vocab_size,))


def dense(features: int, axes: tuple[str, str], name: str, dtype: Dtype, param_dtype: Dtype,
          use_bias: bool = False, real_features: int | None = None,
          formats: FormatSpec = FormatSpec()) -> Projection:
    """A projection whose weight is annotated with logical axes (in, out) and stored in the
    format `formats` chooses for its path (models/formats/; dense: `nn.Dense`'s 'kernel');
    output columns from `real_features` on are padding and start at zero."""
    return Projection(features, axes, dtype=dtype, param_dtype=param_dtype, use_bias=use_bias,
                      real_features=real_features, formats=formats, name=name)


def as_tokens(x: jax.Array) -> jax.Array:
    """[batch, seq, features] -> [batch * seq, features]. Dense layers run on 2-D activations:
    XLA:CPU's backward matmuls are ~2x faster than with two contracting (batch, seq) dims."""
    return x.reshape(-1, x.shape[-1])


class GatedMlp(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)), SwiGLU by default; `activation` and
    `activation_threshold` as in models/activations.py. x: [batch, seq, embed]."""

    embed_dim: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    activation: str = "silu"
    activation_threshold: float = 0.0
    swiglu: tuple = (SWIGLU_ALPHA, SWIGLU_LIMIT)  # (alpha, limit) of 'clamped_swiglu'
    formats: FormatSpec = FormatSpec()

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool = True,
                 decode: bool = False) -> jax.Array:
        """`decode=True` (a KV-cache step): sites with a sparse decode path read only the
        active weight rows/columns (models/sparse_mlp.py)."""
        del deterministic
        t = as_tokens(x)  # [tokens, embed]
        if decode and not self.is_initializing():
            if sparse_mlp.sparse_decode_applies(self, t.shape[0]):
                y = sparse_mlp.decode_gated_mlp(
                    self, t.astype(self.dtype),
                    gated(self.activation, self.activation_threshold, *self.swiglu), self.dtype)
                return y.reshape(x.shape[:-1] + (self.embed_dim,))
        # Training-free thresholds (TEAL/CATS/WINA) act only where the 'act_sparsity'
        # collection holds a site (models/thresholds.py).
        gate = dense(self.mlp_dim, ("embed", "mlp"), "wi_gate", self.dtype, self.param_dtype,
                     formats=self.formats)(
            apply_site(self, "wi_gate_in", t)[0])
        up = dense(self.mlp_dim, ("embed", "mlp"), "wi_up", self.dtype, self.param_dtype,
                   formats=self.formats)(
            apply_site(self, "wi_up_in", t)[0])
        a, h = gated(self.activation, self.activation_threshold, *self.swiglu)(gate, up)
        keep = apply_site(self, "gate_act", a)[1]
        if keep is not None:
            h = jnp.where(keep, h, jnp.zeros_like(h))
        h = apply_site(self, "wo_in", h)[0]
        record(self, a, h)
        h = nn.with_logical_constraint(h, ("batch", "mlp"))
        y = dense(self.embed_dim, ("mlp", "embed"), "wo", self.dtype, self.param_dtype,
                  formats=self.formats)(h)
        return y.reshape(x.shape[:-1] + (self.embed_dim,))
