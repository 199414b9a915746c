"""The transformer: shapes, logical axes, causality, packed-sequence isolation, weight tying,
and block-sparse attention layers against dense ones."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.models.transformer import ModelConfig, Transformer

CFG = ModelConfig(num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8,
                  mlp_dim=64, max_seq_len=64)
TOKENS = jax.random.randint(jax.random.key(0), (2, 32), 0, 259)


def init(cfg, tokens=TOKENS):
    return Transformer(cfg).init(jax.random.key(1), tokens)


def apply(cfg, variables, tokens=TOKENS, **kw):
    return Transformer(cfg).apply(nn.meta.unbox(variables), tokens, **kw)


def test_shapes_and_every_param_has_logical_axes():
    variables = init(CFG)
    boxed = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert boxed and all(isinstance(b, nn.LogicallyPartitioned) for b in boxed)
    for b in boxed:
        assert len(b.names) == b.value.ndim
        assert set(b.names) <= {"embed", "mlp", "heads", "kv", "vocab", "expert", "layers"}
    logits = apply(CFG, variables)
    assert logits.shape == (2, 32, 259) and logits.dtype == jnp.float32


def test_causal_future_tokens_do_not_change_past_logits():
    variables = init(CFG)
    changed = TOKENS.at[:, 20:].set((TOKENS[:, 20:] + 7) % 259)
    a, b = apply(CFG, variables), apply(CFG, variables, changed)
    np.testing.assert_allclose(a[:, :20], b[:, :20], rtol=1e-5, atol=1e-5)
    assert not np.allclose(a[:, 20:], b[:, 20:])


def test_packed_documents_do_not_see_each_other():
    variables = init(CFG)
    seg = jnp.concatenate([jnp.ones((2, 12), jnp.int32), 2 * jnp.ones((2, 20), jnp.int32)], 1)
    pos = jnp.concatenate([jnp.arange(12), jnp.arange(20)])[None].repeat(2, 0)
    packed = apply(CFG, variables, TOKENS, positions=pos, segment_ids=seg)
    alone = apply(CFG, variables, TOKENS[:, 12:])
    np.testing.assert_allclose(packed[:, 12:], alone, rtol=1e-4, atol=1e-4)


def test_weight_tying_removes_lm_head():
    cfg = ModelConfig(**{**CFG.__dict__, "tie_embeddings": True})
    params = init(cfg)["params"]
    assert "lm_head" not in params and "lm_head" in init(CFG)["params"]


def test_sequence_over_max_is_rejected():
    with pytest.raises(ValueError, match="max_seq_len=64"):
        init(CFG, jnp.zeros((1, 65), jnp.int32))


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_kv_heads=3), "num_kv_heads=3"),
    (dict(mlp_kinds=("dense", "sparse")), "mlp_kinds"),
    (dict(attention_kinds="dense"), "attention_kinds"),
    (dict(dtype="float8"), "float8"),
    (dict(embed_dim=0), "embed_dim=0"),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**CFG.__dict__, **kwargs})


def test_block_sparse_causal_layer_equals_dense():
    """A block-sparse layer with the plain causal mask computes exactly dense causal attention."""
    sparse = ModelConfig(**{**CFG.__dict__, "attention_kinds": ("block_sparse",),
                            "sparse_attention_mask": {"kind": "causal", "block_size": 8}})
    variables = init(CFG)
    seg = jnp.concatenate([jnp.ones((2, 16), jnp.int32), 2 * jnp.ones((2, 16), jnp.int32)], 1)
    dense_out = apply(CFG, variables, segment_ids=seg)
    sparse_out = apply(sparse, variables, segment_ids=seg)
    np.testing.assert_allclose(sparse_out, dense_out, rtol=1e-4, atol=1e-4)


def test_sliding_window_differs_from_dense_only_beyond_the_window():
    window = {"kind": "sliding_window", "window": 8, "block_size": 8}
    sparse = ModelConfig(**{**CFG.__dict__, "num_layers": 1, "attention_kinds": ("block_sparse",),
                            "sparse_attention_mask": window})
    dense = ModelConfig(**{**CFG.__dict__, "num_layers": 1})
    variables = init(dense)
    a, b = apply(dense, variables), apply(sparse, variables)
    np.testing.assert_allclose(a[:, :8], b[:, :8], rtol=1e-4, atol=1e-4)  # window covers all
    assert not np.allclose(a[:, 16:], b[:, 16:], atol=1e-3)


def test_non_causal_mask_is_rejected():
    cfg = ModelConfig(**{**CFG.__dict__, "attention_kinds": ("block_sparse",),
                         "sparse_attention_mask": {"kind": "chunked", "chunk_size": 16,
                                                   "causal": False, "block_size": 8}})
    with pytest.raises(ValueError, match="causal"):
        init(cfg)


def test_learned_topk_gate_trains_from_distillation_only():
    cfg = ModelConfig(**{**CFG.__dict__, "attention_kinds": ("block_sparse",),
                         "sparse_attention_mask": {"kind": "top_k", "top_k": 1, "block_size": 8,
                                                   "gate_dim": 4, "distill_weight": 1.0}})
    variables = nn.meta.unbox(init(cfg))
    gate = variables["params"]["layer_0"]["attn"]["block_sparse"]
    assert gate["gate_wq"].shape == (4, 8, 4) and gate["gate_wk"].shape == (2, 8, 4)

    def losses(params):
        logits, mut = Transformer(cfg).apply({"params": params}, TOKENS, mutable=["aux_loss"])
        aux = sum(jnp.sum(v) for v in jax.tree.leaves(mut["aux_loss"]))
        return jnp.mean(logits), aux

    g_main = jax.grad(lambda p: losses(p)[0])(variables["params"])
    g_aux = jax.grad(lambda p: losses(p)[1])(variables["params"])
    gate_main = g_main["layer_0"]["attn"]["block_sparse"]
    gate_aux = g_aux["layer_0"]["attn"]["block_sparse"]
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(gate_main))
    assert all(float(jnp.abs(x).max()) > 0.0 for x in jax.tree.leaves(gate_aux))
    # the distillation loss does not move the model's own weights
    assert float(jnp.abs(g_aux["layer_0"]["mlp"]["wo"]["kernel"]).max()) == 0.0
