"""MLP activations: each against a NumPy formula in the dense MLP, the routed experts (every
dispatch) and the shared experts; the FATReLU threshold shift; bad names and thresholds
refused by setting; Hugging Face hidden_act mapped both ways."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.interop.families import from_hf_config, to_hf_config
from sparsejax.models.activations import ACTIVATIONS, gated
from sparsejax.models.layers import GatedMlp
from sparsejax.models.moe.dispatch import get_dispatch
from sparsejax.models.moe.experts import ExpertWeights, SharedExperts
from sparsejax.models.moe.router import Routing
from sparsejax.models.transformer import ModelConfig, Transformer

_erf = np.vectorize(math.erf)


def np_hidden(name, g, u, t=0.0):
    """The intermediate activation, written out in NumPy (float64)."""
    g, u = np.asarray(g, np.float64), np.asarray(u, np.float64)
    relu_t = np.where(g > np.float64(np.float32(t)), g, 0.0)  # the threshold in float32
    return {"silu": g / (1 + np.exp(-g)) * u,
            "gelu": 0.5 * g * (1 + _erf(g / math.sqrt(2))) * u,
            "relu": relu_t * u,
            "relu2": relu_t ** 2 * u,
            "drelu": relu_t * np.maximum(u, 0.0),
            "clamped_swiglu": np_clamped_swiglu(g, u)}[name]


def np_clamped_swiglu(g, u, alpha=1.702, limit=7.0):
    """gpt-oss's expert activation (transformers' GptOssExperts._apply_gate) in NumPy."""
    g = np.minimum(g, limit)
    return g / (1 + np.exp(-alpha * g)) * (np.clip(u, -limit, limit) + 1)


def rand(key, *shape, scale=1.0):
    return np.asarray(jax.random.normal(jax.random.key(key), shape), np.float32) * scale


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_gated_mlp_matches_numpy(name):
    x = rand(0, 2, 5, 8)
    mlp = GatedMlp(8, 16, activation=name)
    params = nn.meta.unbox(mlp.init(jax.random.key(1), x))["params"]
    y = np.asarray(mlp.apply({"params": params}, x))
    t = x.reshape(-1, 8).astype(np.float64)
    k = {n: np.asarray(params[n]["kernel"], np.float64) for n in ("wi_gate", "wi_up", "wo")}
    ref = np_hidden(name, t @ k["wi_gate"], t @ k["wi_up"]) @ k["wo"]
    np.testing.assert_allclose(y.reshape(-1, 8), ref, rtol=2e-5, atol=2e-5)


def test_clamped_swiglu_clamps_gate_above_and_up_both_sides():
    g = np.array([[-3.0, -0.5, 0.4, 0.9, 2.5]], np.float32)
    u = np.array([[2.0, -2.5, 0.3, 1.5, -0.2]], np.float32)
    a, h = gated("clamped_swiglu", alpha=1.5, limit=1.0)(jnp.asarray(g), jnp.asarray(u))
    np.testing.assert_allclose(np.asarray(h), np_clamped_swiglu(g.astype(np.float64), u, 1.5, 1.0),
                               rtol=1e-6, atol=1e-7)
    assert np.asarray(a)[0, 4] == pytest.approx(1.0 / (1 + np.exp(-1.5)), rel=1e-6)  # gate at 1


@pytest.mark.parametrize("name", ["relu", "relu2", "drelu"])
def test_threshold_shift_zeroes_gate_values_at_or_below_it(name):
    g = np.array([[-1.0, 0.0, 0.05, 0.1, 0.1001, 2.0]], np.float32)
    u = np.array([[1.0, 1.0, 1.0, 1.0, -1.0, 3.0]], np.float32)
    a, h = gated(name, 0.1)(jnp.asarray(g), jnp.asarray(u))
    np.testing.assert_allclose(np.asarray(h), np_hidden(name, g, u, 0.1), rtol=1e-6)
    assert np.all(np.asarray(a)[0, :4] == 0) and np.all(np.asarray(a)[0, 4:] > 0)


def expert_weights(e, d, f, bias=False):
    w = ExpertWeights(jnp.asarray(rand(2, e, d, f, scale=0.5)), jnp.asarray(rand(3, e, d, f, scale=0.5)),
                      jnp.asarray(rand(4, e, f, d, scale=0.5)))
    if not bias:
        return w
    return w._replace(wi_gate_bias=jnp.asarray(rand(8, e, f)), wi_up_bias=jnp.asarray(rand(9, e, f)),
                      wo_bias=jnp.asarray(rand(10, e, d)))


@pytest.mark.parametrize("dispatch, name, bias", [
    ("onehot", "relu", False), ("ragged_dot", "gelu", False), ("pallas_gmm", "relu2", False),
    ("pallas_gmm", "drelu", False),
    # gpt-oss's experts: biased projections (every dispatch) and the clamped SwiGLU
    ("onehot", "clamped_swiglu", True), ("ragged_dot", "clamped_swiglu", True),
    ("pallas_gmm", "clamped_swiglu", True)])
def test_routed_experts_use_the_activation(dispatch, name, bias):
    t, d, f, e = 6, 4, 8, 3
    x = rand(5, t, d)
    w = expert_weights(e, d, f, bias)
    b = {n: np.zeros((e, n_)) if getattr(w, n) is None else np.asarray(getattr(w, n), np.float64)
         for n, n_ in (("wi_gate_bias", f), ("wi_up_bias", f), ("wo_bias", d))}
    idx = np.array([[0, 1], [1, 2], [2, 0], [0, 2], [1, 0], [2, 1]], np.int32)
    weight = np.abs(rand(6, t, 2)) + 0.1
    routing = Routing(expert_index=jnp.asarray(idx.reshape(-1)), token_index=jnp.repeat(jnp.arange(t), 2),
                      weight=jnp.asarray(weight.reshape(-1)), mask=jnp.ones((t * 2,), bool),
                      probs=jnp.ones((t, e)) / e, num_tokens=t, num_experts=e, k=2)
    y, dropped = get_dispatch(dispatch)(jnp.asarray(x), routing, w, 8, gated(name))
    ref = np.zeros((t, d))
    for i in range(t):
        for j in range(2):
            ex = idx[i, j]
            xi = x[i].astype(np.float64)
            h = np_hidden(name, xi @ np.asarray(w.wi_gate[ex]) + b["wi_gate_bias"][ex],
                          xi @ np.asarray(w.wi_up[ex]) + b["wi_up_bias"][ex])
            ref[i] += weight[i, j] * (h @ np.asarray(w.wo[ex], np.float64) + b["wo_bias"][ex])
    assert float(dropped) == 0
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["relu2", "gelu"])
def test_shared_experts_use_the_activation(name):
    x = rand(7, 3, 4)
    mod = SharedExperts(4, 8, 2, activation=name)
    params = mod.init(jax.random.key(0), x)["params"]
    p = {k: np.asarray(nn.meta.unbox(v), np.float64) for k, v in params.items()}
    ref = np_hidden(name, x @ p["wi_gate"], x @ p["wi_up"]) @ p["wo"]
    np.testing.assert_allclose(np.asarray(mod.apply({"params": params}, x)), ref, rtol=1e-4,
                               atol=1e-5)


@pytest.mark.parametrize("kinds", [("dense",), ("moe",)])
def test_model_config_passes_the_activation_to_every_mlp(kinds):
    tokens = jnp.asarray(np.arange(16).reshape(1, 16) % 259)
    base = dict(num_layers=1, embed_dim=16, num_heads=2, num_kv_heads=2, head_dim=8, mlp_dim=32,
                max_seq_len=16, mlp_kinds=kinds)
    variables = Transformer(ModelConfig(**base)).init(
        {"params": jax.random.key(0), "router": jax.random.key(1)}, tokens)
    out = {n: np.asarray(jax.jit(Transformer(ModelConfig(**base, mlp_activation=n)).apply)(
        variables, tokens)) for n in ("silu", "relu")}
    assert not np.allclose(out["silu"], out["relu"], atol=1e-4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(mlp_activation="swish"), r"ModelConfig.mlp_activation='swish' is not a known "
                                   r"activation; valid: \('silu', 'gelu', 'relu', 'relu2', "
                                   r"'drelu', 'clamped_swiglu'\)"),
    (dict(mlp_activation="silu", activation_threshold=0.1),
     r"activation_threshold=0.1 .* no effect with ModelConfig.mlp_activation='silu'"),
    (dict(mlp_activation="relu", activation_threshold=-0.1), r"must be a number >= 0"),
])
def test_bad_activation_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


def test_hugging_face_hidden_act_both_ways():
    cfg = dict(model_type="llama", vocab_size=300, hidden_size=32, intermediate_size=48,
               num_hidden_layers=1, num_attention_heads=4, hidden_act="relu")
    assert from_hf_config(cfg)["ModelConfig.mlp_activation"] == "relu"
    assert from_hf_config({**cfg, "hidden_act": "silu"})["ModelConfig.mlp_activation"] == "silu"
    with pytest.raises(ValueError, match=r"hidden_act='gelu_new' is not supported"):
        from_hf_config({**cfg, "hidden_act": "gelu_new"})
    model = ModelConfig(scale_embeddings=False, mlp_activation="relu2")
    assert to_hf_config(model, None)["hidden_act"] == "relu2"
    with pytest.raises(ValueError, match=r"ModelConfig.mlp_activation='drelu' has no Hugging "
                                         r"Face equivalent"):
        to_hf_config(ModelConfig(scale_embeddings=False, mlp_activation="drelu"), None)
    with pytest.raises(ValueError, match=r"ModelConfig.activation_threshold=0.05 has no"):
        to_hf_config(ModelConfig(scale_embeddings=False, mlp_activation="relu",
                                 activation_threshold=0.05), None)
