"""config.json <-> bindings: which family an architecture exports as, and the options that no
HF architecture expresses (refused by name)."""
import gin
import pytest

from sparsejax.interop.families import from_hf_config, to_hf_config
from sparsejax.models.moe.layer import MoeMlp
from sparsejax.models.transformer import ModelConfig

HF = dict(scale_embeddings=False, vocab_size=300, num_layers=2, embed_dim=32, num_heads=4,
          num_kv_heads=2, head_dim=8, mlp_dim=48)


GPT_OSS = dict(qkv_bias=True, out_bias=True, attention_sinks=True, sliding_window=8,
               layer_types=("sliding_attention", "full_attention"),
               mlp_activation="clamped_swiglu", swiglu_limit=5.0, mlp_kinds=("moe",))
GPT_OSS_MOE = dict(router_bias=True, expert_bias=True)


def moe(router_settings=None, **kw):
    """An MoeMlp, with settings of its (softmax top-k) router bound by gin."""
    for name, value in (router_settings or {}).items():
        gin.bind_parameter(f"SoftmaxTopKRouter.{name}", value)
    return MoeMlp(embed_dim=32, **{"mlp_dim": 16, "num_experts": 4, "top_k": 2, **kw})


@pytest.mark.parametrize("model, layer, family", [
    (dict(), None, "llama"),
    (dict(sliding_window=8), None, "mistral"),
    (dict(qkv_bias=True), None, "qwen2"),
    (dict(mlp_kinds=("moe",)), moe(), "mixtral"),  # e.g. an upcycled dense model
    (dict(mlp_kinds=("dense", "moe")), moe(num_shared_experts=2, shared_expert_gate=True),
     "qwen2_moe"),
    (dict(qk_norm="head", head_dim=16), None, "qwen3"),
    (dict(qk_norm="head", mlp_kinds=("dense", "moe")), moe(), "qwen3_moe"),
    (dict(qk_norm="projection", clip_qkv=2.5, mlp_kinds=("moe",)), moe(), "olmoe"),
    (GPT_OSS, moe(**GPT_OSS_MOE), "gpt_oss"),
    (dict(GPT_OSS, qkv_bias=False, out_bias=False, layer_types=()), moe(**GPT_OSS_MOE),
     "gpt_oss"),
])
def test_family_of_an_architecture(model, layer, family):
    cfg = to_hf_config(ModelConfig(**{**HF, **model}), layer)
    assert cfg["model_type"] == family
    back = from_hf_config(cfg)  # and the bindings it reimports as are the same architecture
    for key, value in {**HF, **model}.items():
        if not (family in ("mixtral", "olmoe", "gpt_oss") and key == "mlp_dim"):  # all MoE
            assert back[f"ModelConfig.{key}"] == value, key
    if layer is not None:
        for key in ("num_experts", "top_k", "mlp_dim", "num_shared_experts", "router_bias",
                    "expert_bias"):
            assert back.get(f"MoeMlp.{key}", False) == getattr(layer, key), key
        assert back["SoftmaxTopKRouter.renormalize"] is True


@pytest.mark.parametrize("model, layer, needle", [
    (dict(scale_embeddings=True), None, "ModelConfig.scale_embeddings=True"),
    (dict(attention_kinds=("block_sparse",)), None, "ModelConfig.attention_kinds"),
    (dict(mlp_kinds=("moe",)), dict(router="sigmoid_topk"), "MoeMlp.router='sigmoid_topk'"),
    (dict(mlp_kinds=("moe",)), dict(router_settings={"num_groups": 2}), "SoftmaxTopKRouter.num_groups=2"),
    (dict(mlp_kinds=("moe",)), dict(correction_bias=True), "MoeMlp.correction_bias=True"),
    (dict(mlp_kinds=("moe",)), dict(num_shared_experts=1), "MoeMlp.shared_expert_gate=False"),
    (dict(mlp_kinds=("dense", "moe")), dict(), "ModelConfig.mlp_kinds"),
    (dict(mlp_kinds=("moe",)), dict(router_settings={"renormalize": False}),
     "SoftmaxTopKRouter.renormalize=False"),
    (dict(qk_norm="projection"), None, "ModelConfig.qk_norm='projection'"),
    (dict(clip_qkv=1.0), None, "ModelConfig.clip_qkv=1.0"),
    (dict(qk_norm="head", qkv_bias=True), None, "ModelConfig.qkv_bias=True"),
    (dict(mlp_kinds=("moe",), clip_qkv=1.0), dict(), "ModelConfig.clip_qkv=1.0"),
    (dict(mlp_kinds=("moe",), qk_norm="head"), dict(num_shared_experts=1, shared_expert_gate=True),
     "MoeMlp.num_shared_experts=1"),
    (dict(mlp_kinds=("dense", "moe"), qk_norm="projection"), dict(), "ModelConfig.mlp_kinds"),
    (dict(mlp_kinds=("moe",), qk_norm="projection", head_dim=16), dict(),
     "ModelConfig.head_dim=16"),
    (dict(mlp_kinds=("moe",), qk_norm="projection", sliding_window=8), dict(),
     "ModelConfig.sliding_window=8"),
    # gpt-oss's options come together
    (dict(attention_sinks=True), None, "ModelConfig.mlp_activation='silu'"),
    (dict(out_bias=True), None, "ModelConfig.attention_sinks=False"),
    (dict(mlp_activation="clamped_swiglu", attention_sinks=True), None, "ModelConfig.mlp_kinds"),
    (dict(GPT_OSS, out_bias=False), GPT_OSS_MOE, "ModelConfig.out_bias=False"),
    (GPT_OSS, dict(GPT_OSS_MOE, router_bias=False), "MoeMlp.router_bias=False"),
    (GPT_OSS, dict(GPT_OSS_MOE, expert_bias=False), "MoeMlp.expert_bias=False"),
    (GPT_OSS, dict(GPT_OSS_MOE, router_settings={"renormalize": False}),
     "SoftmaxTopKRouter.renormalize=False"),
    (dict(GPT_OSS, qk_norm="head"), GPT_OSS_MOE, "ModelConfig.qk_norm='head'"),
    (dict(mlp_kinds=("moe",)), dict(router_bias=True), "ModelConfig.attention_sinks=False"),
])
def test_options_without_hf_equivalent_are_refused(model, layer, needle):
    layer = None if layer is None else moe(**layer)
    hf = {k: v for k, v in HF.items() if k not in model}
    with pytest.raises(ValueError, match="no Hugging Face equivalent") as e:
        to_hf_config(ModelConfig(**hf, **model), layer)
    assert needle in str(e.value)


MLA = dict(HF, num_kv_heads=4, head_dim=12, kv_lora_rank=16, qk_rope_head_dim=4, v_head_dim=6,
           rope_interleave=True, mlp_kinds=("dense", "moe"))


@pytest.mark.parametrize("router, settings, family", [
    ("softmax_topk", {"renormalize": False, "routed_scaling": 1.5}, "deepseek_v2"),
    ("softmax_topk", {"renormalize": False, "num_groups": 2, "top_groups": 1,
                      "group_score": "max"}, "deepseek_v2"),
    ("sigmoid_topk", {"routed_scaling": 2.5, "num_groups": 2, "top_groups": 1}, "deepseek_v3"),
])
@pytest.mark.parametrize("q_lora_rank", [0, 8])
def test_mla_exports_as_deepseek(router, settings, family, q_lora_rank):
    """A model with multi-head latent attention exports as the DeepSeek family of its router,
    and the config.json reimports as the same architecture and routing."""
    cls = "SoftmaxTopKRouter" if router == "softmax_topk" else "SigmoidTopKRouter"
    for name, value in settings.items():
        gin.bind_parameter(f"{cls}.{name}", value)
    layer = MoeMlp(embed_dim=32, mlp_dim=16, num_experts=4, top_k=2, router=router,
                   num_shared_experts=2, correction_bias=router == "sigmoid_topk")
    cfg = to_hf_config(ModelConfig(**MLA, q_lora_rank=q_lora_rank), layer)
    assert cfg["model_type"] == family
    assert cfg["first_k_dense_replace"] == 1 and cfg["qk_nope_head_dim"] == 8
    assert cfg["q_lora_rank"] == (q_lora_rank or None)
    back = from_hf_config(cfg)
    for key, value in {**MLA, "q_lora_rank": q_lora_rank}.items():
        assert back[f"ModelConfig.{key}"] == value, key
    for key in ("num_experts", "top_k", "mlp_dim", "num_shared_experts", "correction_bias"):
        assert back.get(f"MoeMlp.{key}", False) == getattr(layer, key), key
    for name, value in settings.items():
        assert back[f"{cls}.{name}"] == value, name


@pytest.mark.parametrize("cfg, needle", [
    (dict(model_type="llama", q_lora_rank=8), "q_lora_rank=8 is not supported for llama"),
    (dict(model_type="qwen2_moe", kv_lora_rank=8), "kv_lora_rank=8"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0}), "rope type 'dynamic'"),
    (dict(topk_method="noaux_tc"), "topk_method='noaux_tc'"),
    (dict(norm_topk_prob=True), "norm_topk_prob=True"),
    (dict(num_key_value_heads=2), "num_key_value_heads=2"),
    (dict(n_shared_experts=0), "n_shared_experts=0"),
    (dict(moe_layer_freq=2), "moe_layer_freq=2"),
    (dict(model_type="deepseek_v3", scoring_func="softmax"), "scoring_func='softmax'"),
    (dict(model_type="deepseek_v3", quantization_config={"quant_method": "fp8"}),
     "quantization_config (quant_method 'fp8')"),
])
def test_unsupported_deepseek_options_are_refused(cfg, needle):
    """One line naming the option."""
    base = dict(model_type="deepseek_v2", vocab_size=300, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=48, kv_lora_rank=16, q_lora_rank=None,
                qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=6, first_k_dense_replace=1,
                n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                n_shared_experts=1)
    with pytest.raises(ValueError, match="not supported") as e:
        from_hf_config({**base, **cfg})
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("model, layer, needle", [
    (dict(mlp_kinds=("moe", "dense")), dict(router="sigmoid_topk", num_shared_experts=1),
     "ModelConfig.mlp_kinds"),
    (dict(), dict(router="sigmoid_topk"), "MoeMlp.num_shared_experts=0"),
    (dict(), dict(num_shared_experts=1), "SoftmaxTopKRouter.renormalize=True"),
    (dict(), dict(router="relu", num_shared_experts=1), "MoeMlp.router='relu'"),
])
def test_mla_options_without_deepseek_equivalent_are_refused(model, layer, needle):
    with pytest.raises(ValueError, match="no Hugging Face equivalent") as e:
        to_hf_config(ModelConfig(**{**MLA, **model}), MoeMlp(embed_dim=32, **layer))
    assert needle in str(e.value)


def test_deepseek_v3_groups_of_fewer_than_two_experts_are_refused():
    """transformers' DeepSeek-V3 scores a group by its two best experts: a reduced model with
    one expert per group has no equivalent there (four experts in two groups have one)."""
    with gin.unlock_config():
        gin.bind_parameter("SigmoidTopKRouter.num_groups", 2)
        gin.bind_parameter("SigmoidTopKRouter.top_groups", 2)
    try:
        model = ModelConfig(**MLA)
        fits = to_hf_config(model, MoeMlp(embed_dim=32, num_experts=4, top_k=2,
                                          router="sigmoid_topk", num_shared_experts=1))
        assert fits["n_group"] == 2 and fits["n_routed_experts"] == 4
        with pytest.raises(ValueError, match=r"SigmoidTopKRouter.num_groups=2 .*fewer than two"):
            to_hf_config(model, MoeMlp(embed_dim=32, num_experts=2, top_k=2,
                                       router="sigmoid_topk", num_shared_experts=1))
    finally:
        gin.clear_config()
