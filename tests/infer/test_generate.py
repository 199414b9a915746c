"""KV-cache decoding equals full recomputation (greedy and seeded sampling), for dense, MoE,
sliding-window, block-sparse, q/k-normed (Qwen3, OLMoE) and gpt-oss-like (sinks, sliding and
full layers, biases, clamped SwiGLU; scanned) models, with batched prompts of
different lengths."""
import flax.linen as nn
import gin
import jax
import numpy as np
import pytest

from sparsejax.infer.generate import generate, pad_prompts
from sparsejax.infer.sampling import sample_logits
import sparsejax.models.moe.layer  # noqa: F401  (registers MoeMlp with gin)
from sparsejax.models.transformer import ModelConfig, Transformer

BASE = dict(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8,
            mlp_dim=48, max_seq_len=64, scale_embeddings=False)
PROMPTS = [[5, 9, 3, 7, 1, 2, 8], [4, 4, 11], [60, 2, 33, 12, 9]]


def model_and_params(**kw):
    cfg = ModelConfig(**{**BASE, **kw})
    model = Transformer(cfg)
    v = nn.meta.unbox(model.init(jax.random.key(0), np.zeros((1, 8), np.int32)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda p: (rng.standard_normal(p.shape) * 0.5).astype(np.float32),
                          v["params"])
    return model, params, v.get("moe_state")


GPT_OSS = dict(qkv_bias=True, out_bias=True, attention_sinks=True, sliding_window=4,
               layer_types=("sliding_attention", "full_attention"), mlp_kinds=("moe",),
               mlp_activation="clamped_swiglu", swiglu_limit=1.0)
CASES = {"dense": {}, "window": dict(sliding_window=4), "qkv_bias": dict(qkv_bias=True),
         "qk_norm_head": dict(qk_norm="head"),
         "olmoe_like": dict(qk_norm="projection", clip_qkv=1.0, mlp_kinds=("moe",)),
         "moe": dict(mlp_kinds=("dense", "moe")),
         "block_sparse": dict(attention_kinds=("block_sparse", "dense"), sparse_attention_mask={
             "kind": "sliding_window", "window": 6, "block_size": 4}),
         # (unscanned, with transformers' generate: tests/interop/test_transformers_parity.py)
         "gpt_oss_scanned": dict(GPT_OSS, scan_layers=True)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_greedy_with_cache_equals_full_recomputation(name):
    gin.bind_parameter("MoeMlp.dispatch", "ragged_dot")
    gin.bind_parameter("MoeMlp.num_experts", 4)
    gin.bind_parameter("MoeMlp.mlp_dim", 16)
    if name.startswith("gpt_oss"):
        gin.bind_parameter("MoeMlp.router_bias", True)
        gin.bind_parameter("MoeMlp.expert_bias", True)
    model, params, moe_state = model_and_params(**CASES[name])
    kw = dict(max_new_tokens=9, moe_state=moe_state)
    if name == "block_sparse":
        prompts = [[5, 9, 3, 7, 1, 2, 8, 3], [4, 4, 11, 2, 5, 6, 7, 1]]  # 8 + 8: blocks of 4
        kw["max_new_tokens"] = 8
    else:
        prompts = PROMPTS
    cached = generate(model, params, prompts, **kw)["tokens"]
    full = generate(model, params, prompts, use_cache=False, **kw)["tokens"]
    assert cached == full
    # and the continuation really is the argmax of a plain forward pass on each row alone
    row = prompts[1] + cached[1]
    logits = np.asarray(model.apply({"params": params, **(
        {"moe_state": moe_state} if moe_state else {})}, np.asarray([row], np.int32)))
    n = len(prompts[1])
    assert list(np.argmax(logits[0, n - 1:-1], -1)) == cached[1]


def test_sampling_with_cache_equals_recomputation_for_a_seed():
    model, params, _ = model_and_params()
    kw = dict(max_new_tokens=8, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    a = generate(model, params, PROMPTS, **kw)["tokens"]
    b = generate(model, params, PROMPTS, use_cache=False, **kw)["tokens"]
    assert a == b
    assert a != generate(model, params, PROMPTS, **{**kw, "seed": 4})["tokens"]


def test_sample_logits_cuts():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    draws = {int(sample_logits(logits, jax.random.key(i), 1.0, top_k=2)[0]) for i in range(200)}
    assert draws == {0, 1}
    draws = {int(sample_logits(logits, jax.random.key(i), 1.0, top_p=0.7)[0]) for i in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.7 needs the second token; 0.8 >= 0.7 stops there
    assert int(sample_logits(logits, jax.random.key(0), 0.0)[0]) == 0


def test_pad_prompts_left_pads_with_positions():
    tokens, pos, seg = pad_prompts([[1, 2, 3], [7]], pad_id=0)
    np.testing.assert_array_equal(tokens, [[1, 2, 3], [0, 0, 7]])
    np.testing.assert_array_equal(pos, [[0, 1, 2], [0, 0, 0]])
    np.testing.assert_array_equal(seg, [[1, 1, 1], [0, 0, 1]])


@pytest.mark.parametrize("kw, needle", [(dict(temperature=-1.0), "temperature"),
                                        (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"),
                                        (dict(max_new_tokens=0), "max_new_tokens"),
                                        (dict(max_new_tokens=80), "max_seq_len")])
def test_bad_sampling_arguments(kw, needle):
    model, params, _ = model_and_params()
    with pytest.raises(ValueError, match=needle):
        generate(model, params, PROMPTS, **kw)
