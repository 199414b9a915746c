"""Multi-head latent attention (models/mla.py): the forward pass against an independent numpy
one (DeepSeek's own layout: interleaved rotary pairs rotated as complex numbers), the latent KV
cache (what it stores, greedy decoding equal to full recomputation), the published configs'
cache ratio, the YaRN softmax-scale correction and the settings' validation."""
import math

import flax.linen as nn
import jax
import numpy as np
import pytest

from sparsejax.infer.cache import init_cache
from sparsejax.infer.generate import generate
from sparsejax.models.mla import cache_numbers, softmax_scale
from sparsejax.models.transformer import ModelConfig, Transformer

MLA = dict(vocab_size=50, num_layers=2, embed_dim=16, num_heads=2, num_kv_heads=2, head_dim=10,
           mlp_dim=24, max_seq_len=64, scale_embeddings=False, kv_lora_rank=6,
           qk_rope_head_dim=4, v_head_dim=5)
TOKENS = np.random.default_rng(0).integers(0, 50, (2, 9)).astype(np.int32)


def random_params(cfg):
    params = nn.meta.unbox(Transformer(cfg).init(jax.random.key(0), TOKENS[:, :4])["params"])
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda p: (rng.standard_normal(p.shape) * 0.4).astype(np.float64),
                        params)


def np_rms(x, w, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def np_rope(x, pos, theta, interleaved):
    """DeepSeek's rotation: pairs (x0, x1), (x2, x3), ... (interleaved) or (x_i, x_{i+d/2})
    as complex numbers times exp(i pos f_j); x [s, ..., d]."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    a, b = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., :d // 2], x[..., d // 2:])
    rot = (a + 1j * b) * np.exp(1j * pos.reshape(-1, *[1] * (x.ndim - 1)) * inv)
    out = np.empty_like(x)
    if interleaved:
        out[..., 0::2], out[..., 1::2] = rot.real, rot.imag
    else:
        out[..., :d // 2], out[..., d // 2:] = rot.real, rot.imag
    return out


def np_mla(x, p, cfg):
    s, h, d, r = x.shape[0], cfg.num_heads, cfg.head_dim, cfg.kv_lora_rank
    nope = cfg.head_dim - cfg.qk_rope_head_dim
    pos = np.arange(s, dtype=np.float64)
    if cfg.q_lora_rank:
        q = np_rms(x @ p["query_a"]["kernel"], p["query_a_norm"]["scale"]) @ p["query_b"]["kernel"]
    else:
        q = x @ p["query"]["kernel"]
    q = q.reshape(s, h, d)
    q = np.concatenate([q[..., :nope], np_rope(q[..., nope:], pos, cfg.rope_theta,
                                               cfg.rope_interleave)], -1)
    kv = x @ p["kv_a"]["kernel"]
    c = np_rms(kv[:, :r], p["kv_a_norm"]["scale"])
    k_rot = np_rope(kv[:, r:], pos, cfg.rope_theta, cfg.rope_interleave)
    kvb = (c @ p["kv_b"]["kernel"]).reshape(s, h, nope + cfg.v_head_dim)
    k = np.concatenate([kvb[..., :nope], np.repeat(k_rot[:, None], h, 1)], -1)
    v = kvb[..., nope:]
    out = np.zeros((s, h, cfg.v_head_dim))
    for head in range(h):
        for i in range(s):
            sc = k[:i + 1, head] @ q[i, head] / math.sqrt(d)
            w = np.exp(sc - sc.max())
            out[i, head] = (w / w.sum()) @ v[:i + 1, head]
    return out.reshape(s, -1) @ p["out"]["kernel"]


def np_forward(params, cfg, tokens):
    out = []
    for row in tokens:
        x = params["embed"]["embedding"][row]
        for i in range(cfg.num_layers):
            lp = params[f"layer_{i}"]
            x = x + np_mla(np_rms(x, lp["attn_norm"]["scale"]), lp["attn"], cfg)
            hdn = np_rms(x, lp["mlp_norm"]["scale"])
            m = lp["mlp"]
            g = hdn @ m["wi_gate"]["kernel"]
            x = x + ((g / (1 + np.exp(-g))) * (hdn @ m["wi_up"]["kernel"])) @ m["wo"]["kernel"]
        x = np_rms(x, params["final_norm"]["scale"])
        out.append((x @ params["lm_head"]["kernel"])[:, :cfg.vocab_size])
    return np.stack(out)


@pytest.mark.parametrize("options", [dict(), dict(q_lora_rank=3, rope_interleave=True)])
def test_forward_matches_numpy(options):
    cfg = ModelConfig(**MLA, **options)
    params = random_params(cfg)
    got = np.asarray(Transformer(cfg).apply(
        {"params": jax.tree.map(lambda p: p.astype(np.float32), params)}, TOKENS))
    np.testing.assert_allclose(got, np_forward(params, cfg, TOKENS), rtol=2e-4, atol=2e-4)


def test_latent_cache_stores_the_latent_and_decodes_as_recomputation():
    cfg = ModelConfig(**MLA, q_lora_rank=3, rope_interleave=True)
    layer = init_cache(cfg, 2, 12)["layer_1"]["attn"]
    assert sorted(layer) == ["cached_latent", "cached_rope_key", "index", "pos"]
    assert layer["cached_latent"].shape == (2, 12, 6)
    assert layer["cached_rope_key"].shape == (2, 12, 4)
    model = Transformer(cfg)
    params = model.init({"params": jax.random.key(0), "router": jax.random.key(1)},
                        TOKENS[:, :4])["params"]
    prompts = [[3, 1, 4], [1, 5, 9, 2, 6]]  # left padding
    cached = generate(model, params, prompts, max_new_tokens=6)["tokens"]
    assert cached == generate(model, params, prompts, max_new_tokens=6,
                              use_cache=False)["tokens"]


def test_cache_ratio_of_published_configs():
    """DeepSeek-V2-Lite: 16 heads of 128 + 64 (k) and 128 (v); V3 (and V2): 128 heads."""
    lite = ModelConfig(num_heads=16, num_kv_heads=16, head_dim=192, kv_lora_rank=512,
                       qk_rope_head_dim=64, v_head_dim=128)
    v3 = ModelConfig(num_heads=128, num_kv_heads=128, head_dim=192, kv_lora_rank=512,
                     qk_rope_head_dim=64, v_head_dim=128, q_lora_rank=1536)
    assert cache_numbers(lite) == (576, 5120)  # 11.25%
    assert cache_numbers(v3) == (576, 40960)  # 1.41%


def test_yarn_softmax_scale():
    """transformers' yarn_apply_mscale: (0.1 * mscale_all_dim * ln(factor) + 1) ** 2."""
    s = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
         "mscale": 1.0, "mscale_all_dim": 1.0}
    assert softmax_scale(192, s) == pytest.approx(192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2)
    assert softmax_scale(192, None) == 192 ** -0.5
    assert softmax_scale(192, {**s, "mscale_all_dim": 0}) == 192 ** -0.5


@pytest.mark.parametrize("kwargs, needle", [
    (dict(q_lora_rank=8), "ModelConfig.q_lora_rank=8 needs multi-head latent attention"),
    (dict(kv_lora_rank=8, qk_rope_head_dim=3, v_head_dim=4), "qk_rope_head_dim=3"),
    (dict(kv_lora_rank=8, qk_rope_head_dim=16, v_head_dim=4), "qk_rope_head_dim=16"),
    (dict(kv_lora_rank=8, qk_rope_head_dim=4), "v_head_dim=0"),
    (dict(kv_lora_rank=8, qk_rope_head_dim=4, v_head_dim=4, num_kv_heads=2), "num_kv_heads=2"),
    (dict(kv_lora_rank=8, qk_rope_head_dim=4, v_head_dim=4, sliding_window=4),
     "sliding_window=4"),
])
def test_bad_settings_are_named(kwargs, needle):
    with pytest.raises(ValueError, match="ModelConfig") as e:
        ModelConfig(**{"num_heads": 4, "num_kv_heads": 4, **kwargs})
    assert needle in str(e.value)
