"""Architecture options of released checkpoints (norm epsilon, embedding scaling, q/k/v bias,
RoPE scaling, sliding window, q/k norms, q/k/v clipping, gpt-oss's output bias, attention
sinks, per-layer windows and clamped SwiGLU), each checked against an independent numpy
forward pass."""
import math

import flax.linen as nn
import jax
import numpy as np
import pytest

from sparsejax.models.rope import rope_frequencies
from sparsejax.models.transformer import ModelConfig, Transformer

BASE = dict(vocab_size=50, num_layers=2, embed_dim=16, num_heads=4, num_kv_heads=2, head_dim=4,
            mlp_dim=24, max_seq_len=64)
TOKENS = np.random.default_rng(0).integers(0, 50, (2, 12)).astype(np.int32)


def random_params(cfg):
    """Params with every entry random (biases and norm scales too), so each option shows
    (only their shapes come from the model: nothing is initialized or compiled for them)."""
    params = nn.meta.unbox(jax.eval_shape(
        lambda: Transformer(cfg).init(jax.random.key(0), TOKENS[:, :4]))["params"])
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda p: (rng.standard_normal(p.shape) * 0.3).astype(np.float32),
                        params)


# ---- an independent numpy forward pass ----

def np_rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def np_rope(x, pos, inv_freq, mult):  # x [s, h, d]: pairs (i, i + d/2) rotate by pos * f_i
    d = x.shape[-1]
    out = np.empty_like(x)
    for i in range(d // 2):
        ang = pos[:, None] * inv_freq[i]
        c, s = np.cos(ang) * mult, np.sin(ang) * mult
        a, b = x[..., i], x[..., i + d // 2]
        out[..., i], out[..., i + d // 2] = a * c - b * s, b * c + a * s
    return out


def np_attention(x, p, cfg, inv_freq, mult, layer=0):
    s = x.shape[0]
    h, kvh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    proj = {n: x @ p[n] + (p[f"{n}_bias"] if cfg.qkv_bias else 0)
            for n in ("query", "key", "value")}
    eps = cfg.norm_epsilon
    if cfg.qk_norm == "projection":  # OLMoE: over heads * head_dim
        for n in ("query", "key"):
            proj[n] = np_rms(proj[n], p[f"{n}_norm"]["scale"], eps)
    q = proj["query"].reshape(s, h, d)
    k = proj["key"].reshape(s, kvh, d)
    v = proj["value"].reshape(s, kvh, d)
    if cfg.qk_norm == "head":  # Qwen3: each head over head_dim, one scale for all heads
        q, k = np_rms(q, p["query_norm"]["scale"], eps), np_rms(k, p["key_norm"]["scale"], eps)
    if cfg.clip_qkv:
        q, k, v = (np.clip(t, -cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
    pos = np.arange(s, dtype=np.float64)
    q, k = np_rope(q, pos, inv_freq, mult), np_rope(k, pos, inv_freq, mult)
    out = np.zeros((s, h, d))
    for head in range(h):
        g = head // (h // kvh)
        for i in range(s):
            window = cfg.sliding_window
            if cfg.layer_types and cfg.layer_types[layer % len(cfg.layer_types)] == \
                    "full_attention":
                window = 0
            lo = 0 if not window else max(0, i - window + 1)
            sc = np.array([q[i, head] @ k[j, g] / math.sqrt(d) for j in range(lo, i + 1)])
            top = max(sc.max(), p["sinks"][head]) if cfg.attention_sinks else sc.max()
            w = np.exp(sc - top)
            denom = w.sum() + (np.exp(p["sinks"][head] - top) if cfg.attention_sinks else 0)
            out[i, head] = (w / denom) @ v[lo:i + 1, g]
    return out.reshape(s, h * d) @ p["out"] + (p["out_bias"] if cfg.out_bias else 0)


def np_gated(cfg, g, u):
    if cfg.mlp_activation == "clamped_swiglu":  # gpt-oss: transformers' GptOssExperts
        g, lim = np.minimum(g, cfg.swiglu_limit), cfg.swiglu_limit
        return g / (1 + np.exp(-cfg.swiglu_alpha * g)) * (np.clip(u, -lim, lim) + 1)
    return g / (1 + np.exp(-g)) * u


def np_forward(params, cfg, tokens):
    inv_freq, mult = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    eps = cfg.norm_epsilon
    table = params["embed"]["embedding"]
    out = []
    for row in tokens:
        x = table[row].astype(np.float64)
        if cfg.scale_embeddings:
            x = x * math.sqrt(cfg.embed_dim)
        for i in range(cfg.num_layers):
            lp = params[f"layer_{i}"]
            x = x + np_attention(np_rms(x, lp["attn_norm"]["scale"], eps), lp["attn"], cfg,
                                 inv_freq.astype(np.float64), mult, i)
            hdn = np_rms(x, lp["mlp_norm"]["scale"], eps)
            m = lp["mlp"]
            g = hdn @ m["wi_gate"]["kernel"]
            x = x + np_gated(cfg, g, hdn @ m["wi_up"]["kernel"]) @ m["wo"]["kernel"]
        x = np_rms(x, params["final_norm"]["scale"], eps)
        if cfg.tie_embeddings:
            logits = x @ table.T / (math.sqrt(cfg.embed_dim) if cfg.scale_embeddings else 1)
        else:
            logits = x @ params["lm_head"]["kernel"]
        out.append(logits[:, :cfg.vocab_size])
    return np.stack(out)


OPTIONS = {
    "defaults": {},
    "llama_like": dict(norm_epsilon=1e-5, scale_embeddings=False, rope_theta=500000.0),
    "tied_unscaled": dict(tie_embeddings=True, scale_embeddings=False),
    "tied_scaled": dict(tie_embeddings=True),
    "qwen2_bias": dict(qkv_bias=True, norm_epsilon=1e-6, scale_embeddings=False),
    "mistral_window": dict(sliding_window=3, scale_embeddings=False),
    "rope_linear": dict(rope_scaling={"type": "linear", "factor": 4.0}),
    "rope_llama3": dict(rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8}),
    "rope_yarn": dict(rope_scaling={"type": "yarn", "factor": 4.0,
                                    "original_max_position_embeddings": 16}),
    "qwen3_qk_norm": dict(qk_norm="head", scale_embeddings=False),
    "olmoe_qk_norm_clip": dict(qk_norm="projection", clip_qkv=0.5, scale_embeddings=False),
    # gpt-oss: q/k/v/o biases, sinks, a window of 3 on even layers, full attention on odd ones
    "gpt_oss_attention": dict(qkv_bias=True, out_bias=True, attention_sinks=True,
                              sliding_window=3,
                              layer_types=("sliding_attention", "full_attention"),
                              scale_embeddings=False),
    "clamped_swiglu": dict(mlp_activation="clamped_swiglu", swiglu_alpha=1.5, swiglu_limit=0.4),
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_forward_matches_numpy(name):
    cfg = ModelConfig(**BASE, **OPTIONS[name])
    params = random_params(cfg)
    got = np.asarray(Transformer(cfg).apply({"params": params}, TOKENS))
    want = np_forward(jax.tree.map(np.asarray, params), cfg, TOKENS)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def without_bias(params):
    return {k: {**v, "attn": {n: w for n, w in v["attn"].items() if not n.endswith("_bias")}}
            if k.startswith("layer_") else v for k, v in params.items()}


def test_each_option_changes_the_output():
    """No option is accepted without effect: each changes the logits vs the defaults."""
    params = random_params(ModelConfig(**BASE, qkv_bias=True))
    ref = Transformer(ModelConfig(**BASE)).apply({"params": without_bias(params)}, TOKENS)
    for name in ("llama_like", "qwen2_bias", "mistral_window", "rope_linear", "rope_llama3",
                 "rope_yarn"):
        cfg = ModelConfig(**BASE, **OPTIONS[name])
        p = params if cfg.qkv_bias else without_bias(params)
        out = Transformer(cfg).apply({"params": p}, TOKENS)
        assert not np.allclose(out, ref, atol=1e-4), name


def test_gpt_oss_options_each_change_the_output():
    """Sinks, the output bias, the full-attention layers and the clamp each matter."""
    cfg = ModelConfig(**BASE, **OPTIONS["gpt_oss_attention"])
    params = random_params(cfg)
    ref = Transformer(cfg).apply({"params": params}, TOKENS)
    without = lambda name: {k: {**v, "attn": {n: w for n, w in v["attn"].items() if n != name}}
                            if k.startswith("layer_") else v for k, v in params.items()}
    for kw, p in ((dict(attention_sinks=False), without("sinks")),
                  (dict(out_bias=False), without("out_bias")),
                  (dict(layer_types=()), params)):
        other = Transformer(ModelConfig(**{**BASE, **OPTIONS["gpt_oss_attention"], **kw}))
        assert not np.allclose(other.apply({"params": p}, TOKENS), ref, atol=1e-4), kw
    clamped = ModelConfig(**BASE, **OPTIONS["clamped_swiglu"])
    wide = ModelConfig(**BASE, **{**OPTIONS["clamped_swiglu"], "swiglu_limit": 100.0})
    params = random_params(clamped)
    assert not np.allclose(Transformer(clamped).apply({"params": params}, TOKENS),
                           Transformer(wide).apply({"params": params}, TOKENS), atol=1e-4)


def test_qk_norm_and_clipping_change_the_output():
    for kw in (dict(qk_norm="head"), dict(qk_norm="projection")):
        params = random_params(ModelConfig(**BASE, **kw))
        plain = {k: {**v, "attn": {n: w for n, w in v["attn"].items() if "_norm" not in n}}
                 if k.startswith("layer_") else v for k, v in params.items()}
        out = Transformer(ModelConfig(**BASE, **kw)).apply({"params": params}, TOKENS)
        ref = Transformer(ModelConfig(**BASE)).apply({"params": plain}, TOKENS)
        assert not np.allclose(out, ref, atol=1e-4), kw
        clipped = Transformer(ModelConfig(**BASE, **kw, clip_qkv=0.5)).apply(
            {"params": params}, TOKENS)
        assert not np.allclose(out, clipped, atol=1e-4), kw


def test_rope_frequencies_by_hand():
    base = 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8)
    inv, m = rope_frequencies(8, 10000.0, {"type": "linear", "factor": 2.0})
    np.testing.assert_allclose(inv, base / 2, rtol=1e-6) and m == 1.0
    # llama3 with N=64, low=1, high=4: wavelengths > 64 divided by 8, < 16 kept, blend between.
    inv, m = rope_frequencies(8, 10000.0, {"type": "llama3", "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 64})
    for f, got in zip(base, inv):
        wl = 2 * math.pi / f
        if wl < 16:
            want = f
        elif wl > 64:
            want = f / 8
        else:
            s = (64 / wl - 1) / 3
            want = (1 - s) * f / 8 + s * f
        assert got == pytest.approx(want, rel=1e-5)
    # yarn: attention factor 0.1 ln(4) + 1; low dims keep their frequency, high ones / factor.
    inv, m = rope_frequencies(8, 10000.0, {"type": "yarn", "factor": 4.0,
                                           "original_max_position_embeddings": 64})
    assert m == pytest.approx(0.1 * math.log(4) + 1)
    assert inv[0] == pytest.approx(base[0], rel=1e-6)
    assert inv[-1] == pytest.approx(base[-1] / 4, rel=1e-6)


@pytest.mark.hf
def test_rope_frequencies_match_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    for params in ({"rope_type": "linear", "factor": 3.0},
                   {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                   {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                    "beta_fast": 16.0, "beta_slow": 2.0},
                   # gpt-oss's: the correction range kept fractional (truncate=False) or not
                   {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                    "truncate": False, "original_max_position_embeddings": 4096},
                   {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                    "truncate": True, "original_max_position_embeddings": 4096}):
        cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16,
                                       max_position_embeddings=256,
                                       rope_parameters={"rope_theta": 10000.0, **params})
        inv_t, mult_t = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg)
        ours = {k: v for k, v in params.items() if k != "rope_type"}
        inv, mult = rope_frequencies(16, 10000.0, {"type": params["rope_type"], **ours})
        np.testing.assert_allclose(inv, inv_t.numpy(), rtol=1e-6)
        assert mult == pytest.approx(mult_t)
    yarn = {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096}
    assert not np.allclose(rope_frequencies(16, 10000.0, {**yarn, "truncate": False})[0],
                           rope_frequencies(16, 10000.0, {**yarn, "truncate": True})[0])


@pytest.mark.parametrize("kwargs, needle", [
    (dict(norm_epsilon=0.0), "norm_epsilon"),
    (dict(sliding_window=-1), "sliding_window"),
    (dict(scale_embeddings=1), "scale_embeddings"),
    (dict(rope_scaling={"type": "ntk"}), "rope_scaling"),
    (dict(rope_scaling={"type": "linear"}), "rope_scaling"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0, "alpha": 1}), "rope_scaling"),
    (dict(rope_scaling={"type": "linear", "factor": -1.0}), "rope_scaling"),
    (dict(qk_norm="per_head"), "ModelConfig.qk_norm='per_head' is unknown"),
    (dict(clip_qkv=-1.0), "ModelConfig.clip_qkv=-1.0"),
    (dict(clip_qkv=float("nan")), "ModelConfig.clip_qkv=nan"),
    (dict(layer_types=("sliding_attention", "full_attention")), "needs ModelConfig.sliding_window"),
    (dict(sliding_window=4, layer_types=("sliding", "full")), "ModelConfig.layer_types"),
    (dict(sliding_window=4, layer_types="full_attention"), "ModelConfig.layer_types"),
    (dict(swiglu_limit=3.0), "ModelConfig.swiglu_limit=3.0 has no effect"),
    (dict(mlp_activation="clamped_swiglu", swiglu_alpha=0.0), "ModelConfig.swiglu_alpha=0.0"),
    (dict(attention_sinks=True, attention_kinds=("block_sparse",)), "attention_sinks"),
])
def test_bad_values_name_the_setting(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        ModelConfig(**BASE, **kwargs)


def test_blocks_of_other_windows_are_other_kinds():
    """Block-by-block passes (post-training calibration, moe-report) compile one program per
    block kind: a sliding and a full layer of gpt-oss's layer_types must not share one."""
    cfg = ModelConfig(**BASE, sliding_window=3, layer_types=("sliding_attention",
                                                             "full_attention"))
    assert cfg.block_kind(0) != cfg.block_kind(1)
    assert cfg.block_kind(0) == cfg.block_kind(2) and cfg.block_kind(1)[2] == 0
