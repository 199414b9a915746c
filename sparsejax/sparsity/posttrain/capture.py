"""Running the transformer one block at a time, and reading the inputs of its linear layers.

Post-training pruning calibrates each block on the hidden states that the blocks before it
produce, so the model runs in pieces: `embed` -> `apply_block` for every layer -> `head`.
Each piece applies the model's own modules (`Block`, `Embed`, `RMSNorm`, the LM head), so
their numerics are the model's (tests check that the pieces compose to `Transformer.apply`).

`capture_block` runs a block under `nn.intercept_methods` and records the input of every
linear layer as it is called: `nn.Dense.__call__` and `Projection.__call__` (MLP, LM head:
`layers.dense` builds a `Projection`, in the dense format a 'kernel'), `Attention._proj` (q,
k, v, one shared input) and `Attention._out_proj`, and the input of every `MoeMlp` (its
experts' per-expert inputs are derived in stats.py from the routing). Recorded inputs are
keyed by the path of the kernel they multiply, relative to the block ('attn/query',
'mlp/wo/kernel').
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.models.attention import Attention
from sparsejax.models.formats import Projection
from sparsejax.models.layers import Embed, RMSNorm, as_tokens, dense, dtype_from_name
from sparsejax.models.transformer import Block, ModelConfig

PyTree = Any


def layer_name(i: int) -> str:
    """The params key of block `i`."""
    return f"layer_{i}"


def check_layout(cfg: ModelConfig, params: PyTree) -> None:
    """Raises a ValueError unless params hold one subtree per block ('layer_0', ...)."""
    missing = [layer_name(i) for i in range(cfg.num_layers) if layer_name(i) not in params]
    if missing:
        raise ValueError(f"post-training pruning runs the model block by block and needs the "
                         f"params of each block under 'layer_<i>'; missing {missing[:3]} "
                         f"(params have {sorted(params)[:6]})")


def _dtypes(cfg: ModelConfig):
    return dtype_from_name(cfg.dtype), dtype_from_name(cfg.param_dtype)


def _embed_module(cfg: ModelConfig) -> Embed:
    dtype, pdtype = _dtypes(cfg)
    return Embed(cfg.padded_vocab_size, cfg.embed_dim, dtype=dtype, param_dtype=pdtype,
                 real_vocab_size=cfg.vocab_size)


def embed(cfg: ModelConfig, params: PyTree, tokens: jax.Array) -> jax.Array:
    """tokens [b, s] -> the first block's input [b, s, embed] (as `Transformer` computes it)."""
    dtype, _ = _dtypes(cfg)
    x = _embed_module(cfg).apply({"params": params["embed"]}, tokens)
    if cfg.scale_embeddings:
        x = x * jnp.sqrt(cfg.embed_dim).astype(dtype)
    return x


def head_input(cfg: ModelConfig, params: PyTree, x: jax.Array) -> jax.Array:
    """The last block's output -> the LM head's input (final RMSNorm), [b, s, embed]."""
    dtype, pdtype = _dtypes(cfg)
    return RMSNorm(float(cfg.norm_epsilon), dtype=dtype, param_dtype=pdtype).apply(
        {"params": params["final_norm"]}, x)


def head(cfg: ModelConfig, params: PyTree, h: jax.Array) -> jax.Array:
    """The LM head's input [b, s, embed] -> logits [b, s, vocab] (float32)."""
    dtype, pdtype = _dtypes(cfg)
    if cfg.tie_embeddings:
        logits = _embed_module(cfg).apply({"params": params["embed"]}, h, method=Embed.attend)
        if cfg.scale_embeddings:
            logits = logits / jnp.sqrt(cfg.embed_dim).astype(dtype)
    else:
        lm = dense(cfg.padded_vocab_size, ("embed", "vocab"), "lm_head", dtype, pdtype,
                   real_features=cfg.vocab_size)
        logits = lm.apply({"params": params["lm_head"]}, as_tokens(h)).reshape(
            h.shape[:-1] + (-1,))
    return logits[..., :cfg.vocab_size].astype(jnp.float32)


def _variables(block_params: PyTree, moe_state: PyTree | None) -> dict:
    out = {"params": block_params}
    if moe_state:
        out["moe_state"] = moe_state
    return out


class Recorder:
    """An interceptor that records linear-layer inputs ({kernel path: [tokens, in]}) and
    MoE-layer inputs ({module path: (module, x [b, s, embed])}) of one apply."""

    def __init__(self, moe_override: Callable | None = None):
        self.inputs: dict[str, jax.Array] = {}
        self.moe: dict[str, tuple[Any, jax.Array]] = {}
        self.moe_override = moe_override
        self._busy = False  # inside an override's own apply: record nothing
        self._flat: dict[int, tuple[jax.Array, jax.Array]] = {}

    def _tokens(self, x: jax.Array) -> jax.Array:
        """x as [tokens, features]; layers called on the same array (q/k/v, gate/up) get the
        same flattened array, so their statistics are computed once (stats.group_inputs)."""
        if id(x) not in self._flat:
            self._flat[id(x)] = (x, as_tokens(x))  # x kept alive: its id stays unique
        return self._flat[id(x)][1]

    def __call__(self, next_fun, args, kwargs, context):
        if self._busy:
            return next_fun(*args, **kwargs)
        mod, method = context.module, context.method_name
        path = "/".join(mod.path)
        join = (lambda name: f"{path}/{name}" if path else name)
        if isinstance(mod, (nn.Dense, Projection)) and method == "__call__":
            self.inputs[join("kernel")] = self._tokens(args[0])
        elif isinstance(mod, Attention) and method == "_proj":
            name = args[2] if len(args) > 2 else kwargs["name"]
            self.inputs[join(name)] = self._tokens(args[0])
        elif isinstance(mod, Attention) and method == "_out_proj":
            self.inputs[join("out")] = args[0]
        elif type(mod).__name__ == "MoeMlp" and method == "__call__":
            self.moe[path] = (mod.clone(parent=None), args[0])
            if self.moe_override is not None:
                self._busy = True
                try:
                    return self.moe_override(path, mod, args, kwargs)
                finally:
                    self._busy = False
        return next_fun(*args, **kwargs)


def moe_override_for(block_params: PyTree, moe_state: PyTree | None,
                     num_experts: int) -> Callable:
    """An override that runs a block's MoE layers with `num_experts` experts (after expert
    pruning or merging, whose params have that many) while gin still configures the model's
    MoE layers with the original count."""

    def run(path, mod, args, kwargs):
        node, state = block_params, moe_state or {}
        for part in path.split("/"):
            node = node[part]
            state = state.get(part, {}) if isinstance(state, dict) else {}
        reduced = mod.clone(parent=None, num_experts=num_experts)
        return reduced.apply(_variables(node, state or None), *args, **kwargs)

    return run


def apply_block(cfg: ModelConfig, layer: int, block_params: PyTree, x: jax.Array,
                positions: jax.Array, segment_ids: jax.Array, moe_state: PyTree | None = None,
                num_experts: int | None = None) -> jax.Array:
    """One block (deterministic, as eval runs it): x [b, s, embed] -> [b, s, embed].
    `num_experts`: the block's MoE layers hold that many experts (reduced)."""
    y, _ = capture_block(cfg, layer, block_params, x, positions, segment_ids, moe_state,
                         num_experts)
    return y


def capture_block(cfg: ModelConfig, layer: int, block_params: PyTree, x: jax.Array,
                  positions: jax.Array, segment_ids: jax.Array, moe_state: PyTree | None = None,
                  num_experts: int | None = None) -> tuple[jax.Array, Recorder]:
    """Applies block `layer` and returns (output, the Recorder with its layers' inputs)."""
    override = None if num_experts is None else moe_override_for(block_params, moe_state,
                                                                 num_experts)
    rec = Recorder(override)
    with nn.intercept_methods(rec):
        y = Block(cfg, layer).apply(_variables(block_params, moe_state), x, positions,
                                    segment_ids, True)
    return y, rec


def capture_head(cfg: ModelConfig, params: PyTree, x: jax.Array) -> tuple[jax.Array, dict]:
    """(logits, {'lm_head/kernel': the head's input [tokens, embed]}) from the last block's
    output (an untied head is a Dense layer; a tied head reads the embedding, never pruned)."""
    h = head_input(cfg, params, x)
    return head(cfg, params, h), {"lm_head/kernel": as_tokens(h)}


def forward(cfg: ModelConfig, params: PyTree, tokens: jax.Array, positions: jax.Array,
            segment_ids: jax.Array, moe_state: PyTree | None = None) -> jax.Array:
    """The whole model through the pieces above (tests compare it with Transformer.apply)."""
    x = embed(cfg, params, tokens)
    for i in range(cfg.num_layers):
        name = layer_name(i)
        x = apply_block(cfg, i, params[name], x, positions, segment_ids,
                        (moe_state or {}).get(name))
    return head(cfg, params, head_input(cfg, params, x))
