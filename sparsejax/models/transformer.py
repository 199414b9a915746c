"""Decoder-only transformer LM whose blocks are chosen per layer (dense or MoE MLP,
dense, block-sparse or NSA attention)."""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from sparsejax.config import check_field_types, refuse_given
from sparsejax.models.activations import (SWIGLU_ALPHA, SWIGLU_LIMIT, check_activation,
                                          check_swiglu)
from sparsejax.models.formats import FormatSpec, Projection, format_spec, module_path
from sparsejax.models.attention import ATTENTION_KINDS, QK_NORMS, Attention
from sparsejax.models.layer_stack import (check_scan_layers, layer_period, scanned_blocks,
                                          stack_layers)
from sparsejax.models.layers import Embed, GatedMlp, RMSNorm, as_tokens, dense, dtype_from_name
from sparsejax.models.mla import LatentAttention, check_latent_attention
from sparsejax.models.moe.layer import MoeMlp
from sparsejax.models.nsa import NSAConfig
from sparsejax.models.remat import check_remat_policy, remat_module
from sparsejax.models.rope import check_rope_scaling
from sparsejax.models.sparse_attention import check_scanned_prefill

MLP_KINDS = ("dense", "moe")
LAYER_TYPES = ("sliding_attention", "full_attention")  # ModelConfig.layer_types (HF's names)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and per-layer structure of the transformer.

    `mlp_kinds` / `attention_kinds` are cycled over the layers: ("dense", "moe") makes every
    other layer an MoE layer, starting with a dense one. Attention kinds: 'dense',
    'block_sparse' (with `sparse_attention_mask`) and 'nsa' (Native Sparse Attention,
    models/nsa.py, settings in `NSAConfig`).

    Scale: `scan_layers` runs the repeating group of layers with `nn.scan` (params stacked on
    a `layers` axis; models/layer_stack.py), `remat_policy` names what a block keeps for the
    backward pass (models/remat.py).

    Options of released checkpoints (defaults keep this repo's own models): `norm_epsilon`
    (RMSNorm), `scale_embeddings` (multiply embeddings by sqrt(embed_dim) and divide tied
    logits by it; Llama-family models do neither), `qkv_bias` (Qwen2), `rope_scaling` (None or
    a dict, see models/rope.py), `sliding_window` (> 0: dense attention sees that many tokens,
    itself included; Mistral), `qk_norm` ('none'; 'head': RMSNorm of each head's q and k
    before RoPE, Qwen3; 'projection': of the whole q and k projections, OLMoE), `clip_qkv`
    (> 0: q, k and v clipped to [-clip_qkv, clip_qkv] after the q/k norms, OLMoE; 0: off),
    `out_bias` (a bias on the attention output projection; with `qkv_bias`, gpt-oss's
    attention_bias), `attention_sinks` (a learned logit per head in each softmax
    denominator, gpt-oss), `layer_types` (() : every layer sees `sliding_window`; else a
    tuple of 'sliding_attention' / 'full_attention' cycled over the layers like `mlp_kinds`:
    only the sliding layers use the window, gpt-oss), `swiglu_alpha` / `swiglu_limit` (of
    `mlp_activation='clamped_swiglu'`, gpt-oss's experts).

    Multi-head latent attention (DeepSeek-V2 / V3, models/mla.py) on every layer when
    `kv_lora_rank` > 0 (0: standard attention): keys and values expanded from a latent of
    that rank, `q_lora_rank` (> 0: low-rank queries), `qk_rope_head_dim` (the rotary part of
    `head_dim`, which is then qk_nope_head_dim + qk_rope_head_dim), `v_head_dim`,
    `rope_interleave` (DeepSeek's interleaved rotary pairs). The KV cache then stores the
    latent and the rotary key only.

    `weight_format` (default 'dense') stores every attention and MLP projection in a
    registered weight format (models/formats/: 'dense', 'block_sparse', 'monarch');
    `weight_format_overrides` ({regex on the projection's path: format}) chooses per
    projection, and is the only way to give the LM head a format other than dense.

    `mlp_activation` (every MLP: dense, routed and shared experts): 'silu' (SwiGLU), 'gelu',
    'relu' (ReLU on the gate: the ReLU-fication of SwiGLU), 'relu2' or 'drelu';
    `activation_threshold` > 0 shifts a ReLU-family activation (ProSparse's FATReLU). See
    models/activations.py.
    """

    vocab_size: int = 259
    num_layers: int = 2
    embed_dim: int = 64
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 16
    mlp_dim: int = 256
    max_seq_len: int = 512
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    dtype: str = "float32"  # compute dtype; params stay in param_dtype
    param_dtype: str = "float32"
    mlp_kinds: tuple = ("dense",)
    attention_kinds: tuple = ("dense",)
    sparse_attention_mask: Any = None
    remat_policy: str = "none"
    scan_layers: bool = False
    norm_epsilon: float = 1e-6
    scale_embeddings: bool = True
    qkv_bias: bool = False
    rope_scaling: Any = None
    sliding_window: int = 0
    qk_norm: str = "none"
    clip_qkv: float = 0.0
    out_bias: bool = False
    attention_sinks: bool = False
    layer_types: tuple = ()
    mlp_activation: str = "silu"
    swiglu_alpha: float = SWIGLU_ALPHA
    swiglu_limit: float = SWIGLU_LIMIT
    activation_threshold: float = 0.0
    weight_format: str = "dense"
    weight_format_overrides: Any = None
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False

    def __post_init__(self):
        check_field_types(self)
        for name in ("vocab_size", "num_layers", "embed_dim", "num_heads", "num_kv_heads",
                     "head_dim", "mlp_dim", "max_seq_len"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)} must be >= 1")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_kv_heads={self.num_kv_heads} must divide "
                             f"num_heads={self.num_heads}")
        dtype_from_name(self.dtype), dtype_from_name(self.param_dtype)
        _check_kinds("mlp_kinds", self.mlp_kinds, MLP_KINDS)
        _check_kinds("attention_kinds", self.attention_kinds, ATTENTION_KINDS)
        if not 0 < float(self.norm_epsilon) < 1:
            raise ValueError(f"ModelConfig.norm_epsilon={self.norm_epsilon} must be in (0, 1)")
        if not float(self.rope_theta) > 1:
            raise ValueError(f"ModelConfig.rope_theta={self.rope_theta} must be > 1")
        if int(self.sliding_window) < 0:
            raise ValueError(f"ModelConfig.sliding_window={self.sliding_window} must be >= 0 "
                             f"(0: full causal attention)")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"ModelConfig.qk_norm={self.qk_norm!r} is unknown; valid: "
                             f"{QK_NORMS}")
        if not 0 <= float(self.clip_qkv) < float("inf"):
            raise ValueError(f"ModelConfig.clip_qkv={self.clip_qkv} must be a finite number >= 0 "
                             f"(0: no clipping)")
        for name in ("scale_embeddings", "qkv_bias", "tie_embeddings", "out_bias",
                     "attention_sinks"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r} must be True or "
                                 f"False")
        check_rope_scaling(self.rope_scaling)
        check_remat_policy(self.remat_policy)
        check_scan_layers(self)
        check_activation(self.mlp_activation, self.activation_threshold)
        check_swiglu(self.swiglu_alpha, self.swiglu_limit)
        if self.mlp_activation != "clamped_swiglu":
            why = f"ModelConfig.mlp_activation={self.mlp_activation!r} is not 'clamped_swiglu'"
            for name, default in (("swiglu_alpha", SWIGLU_ALPHA), ("swiglu_limit", SWIGLU_LIMIT)):
                if getattr(self, name) != default:
                    raise ValueError(f"ModelConfig.{name}={getattr(self, name)} has no effect: "
                                     f"{why}")
                refuse_given(f"ModelConfig.{name}", why)
        self._check_attention_options()
        check_latent_attention(self)
        self.formats()

    def _check_attention_options(self):
        types = self.layer_types
        if isinstance(types, str) or any(t not in LAYER_TYPES for t in types):
            raise ValueError(f"ModelConfig.layer_types={types!r} must be a tuple of "
                             f"{LAYER_TYPES} (or () for the same attention on every layer)")
        if types and not int(self.sliding_window) > 0:
            raise ValueError(f"ModelConfig.layer_types={tuple(types)!r} needs "
                             f"ModelConfig.sliding_window > 0 (the window of its sliding "
                             f"layers); got {self.sliding_window}")
        sparse = [k for k in ("block_sparse", "nsa") if k in tuple(self.attention_kinds)]
        if self.attention_sinks and sparse:
            raise ValueError(f"ModelConfig.attention_sinks=True needs dense attention; "
                             f"attention_kinds={tuple(self.attention_kinds)!r} has {sparse[0]}")
        if "nsa" in tuple(self.attention_kinds):
            NSAConfig()  # its settings are checked before anything compiles
            if any(self.attention_kind(i) == "nsa" and self.window(i) > 0
                   for i in range(self.num_layers)):
                raise ValueError(f"ModelConfig.sliding_window={self.sliding_window} applies to "
                                 f"dense layers; an 'nsa' layer's window is NSAConfig.window")

    def window(self, layer: int) -> int:
        """Layer `layer`'s sliding window (0: full causal attention)."""
        types = tuple(self.layer_types)
        if types and types[layer % len(types)] == "full_attention":
            return 0
        return int(self.sliding_window)

    def formats(self) -> FormatSpec:
        """The projections' weight formats (validated)."""
        return format_spec(self.weight_format, self.weight_format_overrides)

    @property
    def padded_vocab_size(self) -> int:
        """Embedding rows, rounded up to a multiple of 128 so the vocab axis shards evenly."""
        return -(-self.vocab_size // 128) * 128

    def mlp_kind(self, layer: int) -> str:
        kinds = tuple(self.mlp_kinds)
        return kinds[layer % len(kinds)]

    def attention_kind(self, layer: int) -> str:
        kinds = tuple(self.attention_kinds)
        return kinds[layer % len(kinds)]

    def block_kind(self, layer: int) -> tuple[str, str, int]:
        """What sets block `layer`'s computation apart from the other blocks' (blocks of one
        kind can share a compiled program): its MLP kind, attention kind and window."""
        return self.mlp_kind(layer), self.attention_kind(layer), self.window(layer)


def padded_params(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """{param path: (axis, real length)} of the params padded to `padded_vocab_size`: their
    entries past the vocab exist only so the vocab axis shards evenly (sparsity never keeps
    them, parameter counts leave them out)."""
    out = {"embed/embedding": (0, cfg.vocab_size)}
    if not cfg.tie_embeddings:
        out["lm_head/kernel"] = (1, cfg.vocab_size)
    return out


def _check_kinds(name, kinds, valid):
    if isinstance(kinds, str):
        raise ValueError(f"ModelConfig.{name}={kinds!r} must be a tuple such as ({kinds!r},)")
    if not kinds or any(k not in valid for k in kinds):
        raise ValueError(f"ModelConfig.{name}={kinds!r}: each entry must be one of {valid}")


class Block(nn.Module):
    config: ModelConfig
    layer: int
    formats: FormatSpec | None = None  # the model's planned formats (None: config.formats())

    @nn.compact
    def __call__(self, x, positions, segment_ids, deterministic: bool, decode: bool = False):
        cfg = self.config
        formats = self.formats or cfg.formats()
        dtype, pdtype = dtype_from_name(cfg.dtype), dtype_from_name(cfg.param_dtype)
        eps = float(cfg.norm_epsilon)
        h = RMSNorm(eps, dtype=dtype, param_dtype=pdtype, name="attn_norm")(x)
        if cfg.kv_lora_rank:
            attn = LatentAttention(cfg.num_heads, cfg.head_dim, cfg.qk_rope_head_dim,
                                   cfg.v_head_dim, cfg.kv_lora_rank, cfg.q_lora_rank,
                                   cfg.rope_interleave, cfg.rope_theta, cfg.rope_scaling,
                                   norm_epsilon=eps, dtype=dtype, param_dtype=pdtype,
                                   formats=formats, name="attn")
        else:
            attn = Attention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta,
                             kind=cfg.attention_kind(self.layer),
                             sparse_mask=cfg.sparse_attention_mask, qkv_bias=cfg.qkv_bias,
                             window=cfg.window(self.layer), rope_scaling=cfg.rope_scaling,
                             qk_norm=cfg.qk_norm, clip_qkv=float(cfg.clip_qkv),
                             out_bias=cfg.out_bias, attention_sinks=cfg.attention_sinks,
                             norm_epsilon=eps, dtype=dtype, param_dtype=pdtype,
                             formats=formats, layer=self.layer, name="attn")
        h = attn(h, positions, segment_ids, decode)
        x = x + h
        h = RMSNorm(eps, dtype=dtype, param_dtype=pdtype, name="mlp_norm")(x)
        swiglu = (float(cfg.swiglu_alpha), float(cfg.swiglu_limit))
        if cfg.mlp_kind(self.layer) == "moe":
            mlp = MoeMlp(embed_dim=cfg.embed_dim, activation=cfg.mlp_activation,
                         activation_threshold=float(cfg.activation_threshold),
                         swiglu=swiglu, dtype=dtype, param_dtype=pdtype, name="moe")
        else:
            mlp = GatedMlp(cfg.embed_dim, cfg.mlp_dim, dtype=dtype, param_dtype=pdtype,
                           activation=cfg.mlp_activation,
                           activation_threshold=float(cfg.activation_threshold),
                           swiglu=swiglu, formats=formats, name="mlp")
        if isinstance(mlp, GatedMlp):  # (its decode step may skip inactive neurons)
            x = x + mlp(h, deterministic=deterministic, decode=decode)
        else:
            x = x + mlp(h, deterministic=deterministic)
        return nn.with_logical_constraint(x, ("batch", "seq", "embed"))


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """{module path: (in, out)} of every `Projection` of the unscanned model (paths as
    `layer_0/mlp/wi_gate`), from tracing its init without arrays: what a format's `plan`
    spreads its settings over."""
    seen = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, Projection) and context.method_name == "__call__":
            seen[module_path(context.module)] = (int(args[0].shape[-1]),
                                                 int(context.module.features))
        return next_fun(*args, **kwargs)

    flat = Transformer(dataclasses.replace(cfg, scan_layers=False), formats=cfg.formats())
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    key = jax.random.key(0)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda t: flat.init({"params": key, "router": key, "dropout": key}, t),
                       tokens)
    return seen


class Transformer(nn.Module):
    """tokens [batch, seq] -> logits [batch, seq, vocab] (float32).

    Initialization does not depend on the layout: with `scan_layers` the unscanned model is
    initialized and its per-layer variables stacked (`init_with_output`).

    `formats`: the projections' formats with their plans (`FormatSpec.planned`); None means
    `config.formats()`, planned at init where a format asks for it (a block-sparse fan-in
    spread over the layers). After init the params carry every planned shape."""

    config: ModelConfig
    formats: FormatSpec | None = None

    @nn.nowrap
    def init_with_output(self, rngs, *args, **kwargs):
        """Flax's `init_with_output` (which `init` and `lazy_init` call). Scanned, it returns
        the unscanned model's output and its variables (params, MoE state, ...) converted
        with `layer_stack.stack_layers`, so the same rngs give the same model in both
        layouts. Flax derives a param's key from the rng and the param's whole module path
        (`layer_3/attn/...` unscanned, `layers/block_1/attn/...` in a scan step), so keys
        drawn inside the scan cannot reproduce the unscanned ones."""
        spec = self.formats or self.config.formats()
        if self.formats is None and spec.needs_plan:
            planned = spec.planned(projection_shapes(self.config))
            return self.clone(parent=None, formats=planned).init_with_output(rngs, *args,
                                                                             **kwargs)
        if not self.config.scan_layers:
            return super().init_with_output(rngs, *args, **kwargs)
        flat = self.clone(parent=None, formats=spec,
                          config=dataclasses.replace(self.config, scan_layers=False))
        out, variables = flat.init_with_output(rngs, *args, **kwargs)
        return out, stack_layers(variables, layer_period(self.config))

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, *, deterministic: bool = True,
                 decode: bool = False) -> jax.Array:
        """`decode=True` reads and extends the KV cache in the 'cache' collection
        (sparsejax.infer); positions are then required."""
        cfg = self.config
        formats = self.formats or cfg.formats()
        dtype, pdtype = dtype_from_name(cfg.dtype), dtype_from_name(cfg.param_dtype)
        if decode and positions is None:
            raise ValueError("decode=True needs the tokens' positions")
        if tokens.shape[-1] > cfg.max_seq_len:
            raise ValueError(f"sequence length {tokens.shape[-1]} exceeds "
                             f"ModelConfig.max_seq_len={cfg.max_seq_len}")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[-1]), tokens.shape)
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        embed = Embed(cfg.padded_vocab_size, cfg.embed_dim, dtype=dtype, param_dtype=pdtype,
                      real_vocab_size=cfg.vocab_size, name="embed")
        x = embed(tokens)
        if cfg.scale_embeddings:
            x = x * jnp.sqrt(cfg.embed_dim).astype(dtype)
        x = nn.with_logical_constraint(x, ("batch", "seq", "embed"))
        if cfg.scan_layers:
            check_scanned_prefill()
            x = scanned_blocks(cfg, Block, x, positions, segment_ids, deterministic, decode)
        else:
            block_cls = remat_module(Block, cfg.remat_policy, static_argnums=(4, 5))
            for i in range(cfg.num_layers):
                x = block_cls(cfg, i, formats, name=f"layer_{i}")(x, positions, segment_ids,
                                                                  deterministic, decode)
        x = RMSNorm(float(cfg.norm_epsilon), dtype=dtype, param_dtype=pdtype, name="final_norm")(x)
        if cfg.tie_embeddings:
            logits = embed.attend(x)
            if cfg.scale_embeddings:
                logits = logits / jnp.sqrt(cfg.embed_dim).astype(dtype)
        else:
            logits = dense(cfg.padded_vocab_size, ("embed", "vocab"), "lm_head", dtype,
                           pdtype, real_features=cfg.vocab_size, formats=formats)(as_tokens(x)).reshape(x.shape[:-1] + (-1,))
        return logits[..., :cfg.vocab_size].astype(jnp.float32)
