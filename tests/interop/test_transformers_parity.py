"""Live equality with Hugging Face transformers (skipped unless `transformers` and `torch` are
installed: `pip install -e '.[test,hf]'`). For every supported family a tiny random model is
built with transformers, imported, compared logit by logit (float32, max |diff| <= 1e-4) and by
greedy continuation (`generate` vs our KV-cache decode, which equals our full recomputation),
exported and loaded back by transformers (same logits, tensors identical to the original).
DeepSeek-V2 / V3 (multi-head latent attention) run with dense and MoE layers, low-rank and plain
queries, YaRN with its softmax-scale correction, and a random V3 correction bias; their
greedy continuations use the compressed (latent) KV cache."""
import json
import os

import gin
import numpy as np
import pytest

pytestmark = pytest.mark.hf  # needs the [hf] extra (CI's --hf-only run)
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from sparsejax import cli  # noqa: E402
from sparsejax.infer.generate import generate  # noqa: E402

TOL = 1e-4
COMMON = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16})),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(
        sliding_window=5, head_dim=8)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        tie_word_embeddings=True, rope_parameters={
            "rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0,
            "original_max_position_embeddings": 16})),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM, dict(
        num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM, dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, norm_topk_prob=False, mlp_only_layers=[1],
        rope_parameters={"rope_theta": 10000.0, "rope_type": "linear", "factor": 2.0})),
    # per-head q/k norms; heads wider than hidden_size // num_attention_heads
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(
        head_dim=16, tie_word_embeddings=True)),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, dict(
        head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        norm_topk_prob=True, decoder_sparse_step=2)),  # layer 0 dense, layer 1 MoE
    # q/k norms over the whole projections; |q|, |k|, |v| clipped at 1 (a third of v is)
    "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM, dict(
        num_experts=4, num_experts_per_tok=2, clip_qkv=1.0, norm_topk_prob=False,
        eos_token_id=None)),
    # sinks; a window of 5 on layer 0, full attention on layer 1; q/k/v/o, router and expert
    # biases; the clamped SwiGLU with a limit that clamps; yarn without truncation
    "gpt_oss": (transformers.GptOssConfig, transformers.GptOssForCausalLM, dict(
        head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=5,
        layer_types=["sliding_attention", "full_attention"], swiglu_limit=0.5,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0,
                         "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                         "original_max_position_embeddings": 16})),
}
# MLA: layer 0 dense, layer 1 MoE (first_k_dense_replace=1); heads of 8 + 4 rotary dims
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
           v_head_dim=6, first_k_dense_replace=1, n_shared_experts=1, moe_intermediate_size=16,
           num_experts_per_tok=2)
YARN = {"rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0,
        "original_max_position_embeddings": 16, "mscale": 0.707, "mscale_all_dim": 0.707}
FAMILIES.update({
    # V2-Lite's layout: one query projection, greedy softmax routing, scaled weights
    "deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM, dict(
        MLA, q_lora_rank=None, n_routed_experts=4, topk_method="greedy",
        routed_scaling_factor=1.5)),
    "deepseek_v2_groups": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM,
                           dict(MLA, q_lora_rank=12, n_routed_experts=8, n_group=4, topk_group=2,
                                topk_method="group_limited_greedy", rope_parameters=YARN)),
    "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM, dict(
        MLA, q_lora_rank=12, n_routed_experts=8, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, rope_parameters=YARN)),
    # V3 with plain rotary pairs (rope_interleave false) and unnormalized top-k weights: in
    # test_families_cli.py, live against transformers too (V3 with one query projection and
    # one expert group: the V2 cases here, test_moe_report_families.py)
})
TOKENS = np.random.default_rng(0).integers(0, 300, (2, 24))


def hf_model(make, family, directory):
    config_cls, model_cls, extra = FAMILIES[family]
    model = make(config_cls, model_cls, directory, {**COMMON, **extra},
                 max_shard_size="60KB" if family == "mixtral" else "1GB")
    if model.config.model_type == "deepseek_v3":  # a selection bias that changes the routing
        with torch.no_grad():
            for layer in model.model.layers[model.config.first_k_dense_replace:]:
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.5)
        model.save_pretrained(directory)
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.numpy()


def variables(params, moe_state):
    return {"params": params, **({"moe_state": moe_state} if moe_state else {})}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_import_logits_generate_export(family, tmp_path, hf_random_model, imported):
    src, w, out = str(tmp_path / "hf"), str(tmp_path / "w"), str(tmp_path / "out")
    model = hf_model(hf_random_model, family, src)
    if family == "mixtral":
        assert os.path.exists(os.path.join(src, "model.safetensors.index.json"))
    assert cli.main(["import-hf", f"--src={src}", f"--workdir={w}"]) == 0
    ours_model, params, moe_state = imported(w)
    assert (moe_state is not None) == (model.config.model_type == "deepseek_v3")
    want = hf_logits(model, TOKENS)
    got = np.asarray(ours_model.apply(variables(params, moe_state), TOKENS))
    assert np.abs(got - want).max() <= TOL, np.abs(got - want).max()

    prompts = TOKENS[:, :6]
    with torch.no_grad():
        hf_out = model.generate(torch.from_numpy(prompts), attention_mask=torch.ones_like(
            torch.from_numpy(prompts)), max_new_tokens=10, do_sample=False,
            pad_token_id=0).numpy()[:, 6:]
    our_out = generate(ours_model, params, prompts.tolist(), max_new_tokens=10,
                       moe_state=moe_state)["tokens"]
    assert our_out == hf_out.tolist()
    assert generate(ours_model, params, prompts.tolist(), max_new_tokens=10,
                    moe_state=moe_state, use_cache=False)["tokens"] == our_out

    gin.clear_config()
    assert cli.main(["export-hf", f"--workdir={w}", f"--out={out}"]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    assert type(back) is type(model)
    np.testing.assert_allclose(hf_logits(back, TOKENS), got, atol=TOL, rtol=0)
    original, exported = model.state_dict(), back.state_dict()
    assert sorted(original) == sorted(exported)
    for k in original:
        assert torch.equal(original[k], exported[k]), k
    assert json.load(open(os.path.join(out, "config.json")))["model_type"] == \
        model.config.model_type


def test_deepseek_v3_multi_token_prediction_layers_dropped(tmp_path, hf_random_model, caplog,
                                                          imported):
    """A V3 checkpoint stores its multi-token-prediction layer as model.layers.<num_hidden_
    layers>.*: the import drops it with a warning naming it, and computes transformers' logits
    (transformers does not run it either)."""
    from safetensors.numpy import load_file, save_file
    src, w = tmp_path / "hf", str(tmp_path / "w")
    model = hf_model(hf_random_model, "deepseek_v3", str(src))
    tensors = load_file(src / "model.safetensors")
    mtp = {"model.layers.2.enorm.weight": np.ones(32, np.float32),
           "model.layers.2.eh_proj.weight": np.zeros((32, 64), np.float32),
           "model.layers.2.self_attn.kv_b_proj.weight": np.zeros((56, 16), np.float32)}
    save_file({**tensors, **mtp}, src / "model.safetensors", metadata={"format": "pt"})
    cfg = json.load(open(src / "config.json"))
    json.dump({**cfg, "num_nextn_predict_layers": 1}, open(src / "config.json", "w"))
    with caplog.at_level("WARNING"):
        assert cli.main(["import-hf", f"--src={src}", f"--workdir={w}"]) == 0
    assert "dropping 3 tensors of layers [2]" in caplog.text
    assert "multi-token-prediction" in caplog.text
    ours_model, params, moe_state = imported(w)
    got = np.asarray(ours_model.apply(variables(params, moe_state), TOKENS))
    np.testing.assert_allclose(got, hf_logits(model, TOKENS), atol=TOL, rtol=0)
