"""config.json of the supported Hugging Face families <-> sparsejax gin bindings.

`from_hf_config` turns a config.json dict into the bindings that rebuild the architecture
(`ModelConfig.*`, `MoeMlp.*`, `SoftmaxTopKRouter.*`); `to_hf_config` does the reverse and refuses, naming it, any
option that no supported HF architecture expresses.
"""
from __future__ import annotations

from typing import Any, Mapping

from sparsejax.interop import deepseek
from sparsejax.interop.config_json import need as _need
from sparsejax.models.activations import FROM_HF_ACT, HF_ACT
from sparsejax.models.moe.router import ROUTERS

# family -> what it is (`sparsejax list`)
FAMILIES = {
    "llama": "Llama 1-3 (Llama-3.x 'llama3' RoPE scaling, tied embeddings)",
    "mistral": "Mistral (sliding-window attention)",
    "qwen2": "Qwen2 / Qwen2.5 (q/k/v bias)",
    "qwen3": "Qwen3 (RMSNorm of each head's q and k: ModelConfig.qk_norm='head')",
    "mixtral": "Mixtral (softmax top-k MoE on every layer)",
    "qwen2_moe": "Qwen2-MoE (sigmoid-gated shared expert, mlp_only_layers, decoder_sparse_step)",
    "qwen3_moe": "Qwen3-MoE (qk_norm='head'; norm_topk_prob, mlp_only_layers, "
                 "decoder_sparse_step; no shared expert)",
    "olmoe": "OLMoE (q/k RMSNorm over the whole projection: qk_norm='projection'; clip_qkv; "
             "MoE on every layer)",
    "deepseek_v2": "DeepSeek-V2 / V2-Lite (multi-head latent attention: kv_lora_rank, "
                   "q_lora_rank, decoupled interleaved RoPE; first_k_dense_replace; softmax "
                   "top-k greedy or group_limited_greedy, routed_scaling_factor, shared experts)",
    "deepseek_v3": "DeepSeek-V3 / R1 (MLA with rope_interleave; sigmoid routing with "
                   "e_score_correction_bias, n_group / topk_group, norm_topk_prob, "
                   "routed_scaling_factor, shared experts; multi-token-prediction layers "
                   "dropped on import)",
    "gpt_oss": "gpt-oss (attention sinks, layer_types alternating sliding and full attention, "
               "q/k/v/o biases, router and expert biases, clamped SwiGLU, yarn with truncate; "
               "MXFP4 experts dequantized on import)",
}
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss")
DEEPSEEK = ("deepseek_v2", "deepseek_v3")  # interop/deepseek.py
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
                 "deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
                 "gpt_oss": "GptOssForCausalLM"}
QK_NORM = {"qwen3": "head", "qwen3_moe": "head", "olmoe": "projection"}  # else 'none'
_WHY_NOT: dict[str, str] = {}  # model_type -> what sparsejax lacks to run it
# config.json keys of multi-head latent attention: refused for the families without it
MLA_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim",
            "v_head_dim", "rope_interleave")


def _rope(cfg: Mapping[str, Any]) -> tuple[float, dict | None]:
    """(rope_theta, our rope_scaling) from `rope_parameters` (transformers 5) or
    `rope_theta` + `rope_scaling` (transformers 4)."""
    params = dict(cfg.get("rope_parameters") or {})
    if not params:
        params = dict(cfg.get("rope_scaling") or {})
        params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.pop("rope_type", params.pop("type", "default"))
    if float(params.pop("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("config.json partial_rotary_factor != 1 is not supported")
    if kind == "default":
        return theta, None
    if kind not in ("linear", "llama3", "yarn"):
        raise ValueError(f"config.json rope type {kind!r} is not supported; supported: "
                         f"default, linear, llama3, yarn")
    if kind == "yarn" and params.get("factor") is None:
        params["factor"] = (float(_need(cfg, "max_position_embeddings"))
                            / float(params["original_max_position_embeddings"]))
    params = {k: v for k, v in params.items() if v is not None}
    return theta, {"type": kind, **params}


def _period(types: list[str]) -> tuple[str, ...]:
    """The shortest prefix of `types` that, cycled, gives every entry."""
    for p in range(1, len(types) + 1):
        if all(t == types[i % p] for i, t in enumerate(types)):
            return tuple(types[:p])
    return tuple(types)


def _gpt_oss_layers(cfg: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """sliding_window and layer_types bindings of gpt-oss's `layer_types` (HF's default:
    sliding on even layers, full on odd)."""
    types = cfg.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                       for i in range(num_layers)]
    if len(types) != num_layers or any(t not in ("sliding_attention", "full_attention")
                                       for t in types):
        raise ValueError(f"config.json layer_types={types} must list 'sliding_attention' or "
                         f"'full_attention' for each of the {num_layers} layers")
    if "sliding_attention" not in types:
        return {"ModelConfig.sliding_window": 0, "ModelConfig.layer_types": ()}
    window = int(_need(cfg, "sliding_window"))
    return {"ModelConfig.sliding_window": window,
            "ModelConfig.layer_types": () if "full_attention" not in types else _period(types)}


def _sliding(cfg: Mapping[str, Any], family: str, num_layers: int) -> int:
    if family in ("mistral", "mixtral"):
        return int(cfg.get("sliding_window") or 0)
    if family == "qwen3_moe":  # every layer when use_sliding_window (no layer_types)
        return int(_need(cfg, "sliding_window")) if cfg.get("use_sliding_window") else 0
    if family == "olmoe" and cfg.get("sliding_window") is not None:
        raise ValueError(f"config.json sliding_window={cfg['sliding_window']} is not supported "
                         f"for olmoe (transformers' OLMoE builds a full causal mask)")
    if family in ("qwen2", "qwen2_moe", "qwen3"):
        types = cfg.get("layer_types")
        if not cfg.get("use_sliding_window"):
            return 0
        if types is None:
            window_from = int(cfg.get("max_window_layers", num_layers))
            types = ["sliding_attention" if i >= window_from else "full_attention"
                     for i in range(num_layers)]
        if all(t == "sliding_attention" for t in types):
            return int(_need(cfg, "sliding_window"))
        if any(t == "sliding_attention" for t in types):
            raise ValueError(f"config.json layer_types={types}: sliding-window attention on "
                             f"only some layers is not supported")
    return 0


def from_hf_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The gin bindings ({'ModelConfig.vocab_size': 32000, 'MoeMlp.top_k': 2, ...}) that
    rebuild the architecture described by config.json `cfg`."""
    family = cfg.get("model_type")
    if family not in FAMILIES:
        why = f" (it uses {_WHY_NOT[family]}, which sparsejax does not implement)" \
            if family in _WHY_NOT else ""
        raise ValueError(f"config.json model_type={family!r} is not supported{why}; "
                         f"supported: {', '.join(FAMILIES)}")
    act = cfg.get("hidden_act", "silu")
    if act not in FROM_HF_ACT:
        raise ValueError(f"config.json hidden_act={act!r} is not supported; supported: "
                         f"{sorted(FROM_HF_ACT)}")
    for key in ("attention_bias", "mlp_bias") if family != "gpt_oss" else ("mlp_bias",):
        if cfg.get(key):
            raise ValueError(f"config.json {key}=true is not supported (no output/MLP biases)")
    for key in MLA_KEYS if family not in DEEPSEEK else ():
        if cfg.get(key) is not None:
            raise ValueError(f"config.json {key}={cfg[key]!r} is not supported for {family} "
                             f"(multi-head latent attention is deepseek_v2 / deepseek_v3's)")
    hidden, heads = int(_need(cfg, "hidden_size")), int(_need(cfg, "num_attention_heads"))
    layers = int(_need(cfg, "num_hidden_layers"))
    if family == "olmoe":
        _check_olmoe_heads(cfg, hidden, heads)
    theta, scaling = _rope(cfg)
    b: dict[str, Any] = {
        "ModelConfig.vocab_size": int(_need(cfg, "vocab_size")),
        "ModelConfig.num_layers": layers,
        "ModelConfig.embed_dim": hidden,
        "ModelConfig.num_heads": heads,
        "ModelConfig.num_kv_heads": int(cfg.get("num_key_value_heads") or heads),
        "ModelConfig.head_dim": int(cfg.get("head_dim") or hidden // heads),
        "ModelConfig.mlp_dim": int(_need(cfg, "intermediate_size")),
        "ModelConfig.max_seq_len": int(cfg.get("max_position_embeddings") or 2048),
        "ModelConfig.tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "ModelConfig.rope_theta": theta,
        "ModelConfig.rope_scaling": scaling,
        "ModelConfig.norm_epsilon": float(cfg.get("rms_norm_eps", 1e-6)),
        "ModelConfig.scale_embeddings": False,
        "ModelConfig.qkv_bias": family == "qwen2" or (family == "qwen2_moe"
                                                      and bool(cfg.get("qkv_bias", True))),
        "ModelConfig.sliding_window": _sliding(cfg, family, layers),
        "ModelConfig.qk_norm": QK_NORM.get(family, "none"),
        "ModelConfig.clip_qkv": _clip_qkv(cfg) if family == "olmoe" else 0.0,
        "ModelConfig.mlp_kinds": ("dense",),
        "ModelConfig.mlp_activation": FROM_HF_ACT[act],
    }
    if family == "gpt_oss":
        b.update(_gpt_oss_bindings(cfg, layers))
    elif family in MOE_FAMILIES:
        b.update(_moe_bindings(cfg, family, layers))
    if family in DEEPSEEK:
        b.update(deepseek.from_hf_config(cfg, layers))
    return b


def _gpt_oss_bindings(cfg: Mapping[str, Any], layers: int) -> dict[str, Any]:
    """gpt-oss: q/k/v/o biases (attention_bias), sinks, per-layer windows, MoE on every layer
    with router and expert biases, top-k then softmax over the chosen logits (= softmax top-k
    renormalized), the clamped SwiGLU."""
    bias = bool(cfg.get("attention_bias", True))
    b = {"ModelConfig.qkv_bias": bias, "ModelConfig.out_bias": bias,
         "ModelConfig.attention_sinks": True, **_gpt_oss_layers(cfg, layers),
         "ModelConfig.mlp_activation": "clamped_swiglu",
         "ModelConfig.swiglu_alpha": float(cfg.get("swiglu_alpha", 1.702)),
         "ModelConfig.swiglu_limit": float(cfg.get("swiglu_limit", 7.0)),
         "ModelConfig.mlp_kinds": ("moe",),
         "MoeMlp.router": "softmax_topk", "MoeMlp.router_jitter": 0.0,
         "MoeMlp.top_k": int(_need(cfg, "num_experts_per_tok")),
         "MoeMlp.num_experts": _num_experts(cfg),
         "MoeMlp.mlp_dim": int(_need(cfg, "intermediate_size")),
         "MoeMlp.load_balance_weight": float(cfg.get("router_aux_loss_coef", 0.001)),
         "MoeMlp.z_loss_weight": 0.0, "SoftmaxTopKRouter.renormalize": True,
         "MoeMlp.num_shared_experts": 0, "MoeMlp.shared_expert_gate": False,
         "MoeMlp.router_bias": True, "MoeMlp.expert_bias": True}
    return b


def _check_olmoe_heads(cfg: Mapping[str, Any], hidden: int, heads: int) -> None:
    """OLMoE's q norm spans hidden_size and its k norm (hidden_size // heads) * kv heads, so
    its heads are hidden_size // heads wide."""
    head_dim = cfg.get("head_dim")
    if hidden % heads or (head_dim is not None and int(head_dim) != hidden // heads):
        raise ValueError(f"config.json head_dim={head_dim}, hidden_size={hidden}, "
                         f"num_attention_heads={heads} is not supported for olmoe (its q/k "
                         f"norms need heads of hidden_size // num_attention_heads)")


def _clip_qkv(cfg: Mapping[str, Any]) -> float:
    clip = cfg.get("clip_qkv")
    if clip is None:
        return 0.0
    if not float(clip) > 0:
        raise ValueError(f"config.json clip_qkv={clip} is not supported; valid: null or > 0")
    return float(clip)


def _num_experts(cfg: Mapping[str, Any]) -> int:
    """num_experts (transformers 5 writes Qwen3-MoE's as num_local_experts)."""
    for key in ("num_experts", "num_local_experts"):  # (gpt-oss: num_local_experts)
        if cfg.get(key) is not None:
            return int(cfg[key])
    return int(_need(cfg, "num_experts"))


def _moe_bindings(cfg: Mapping[str, Any], family: str, layers: int) -> dict[str, Any]:
    b: dict[str, Any] = {"MoeMlp.router": "softmax_topk", "MoeMlp.router_jitter": 0.0,
                         "MoeMlp.top_k": int(_need(cfg, "num_experts_per_tok")),
                         "MoeMlp.load_balance_weight": float(cfg.get("router_aux_loss_coef",
                                                                     0.01)),
                         "MoeMlp.z_loss_weight": 0.0}
    if family == "mixtral":
        b.update({"MoeMlp.num_experts": int(_need(cfg, "num_local_experts")),
                  "MoeMlp.mlp_dim": int(_need(cfg, "intermediate_size")),
                  "SoftmaxTopKRouter.renormalize": True, "MoeMlp.num_shared_experts": 0,
                  "MoeMlp.shared_expert_gate": False, "ModelConfig.mlp_kinds": ("moe",)})
        return b
    if family == "olmoe":
        b.update({"MoeMlp.num_experts": _num_experts(cfg),
                  "MoeMlp.mlp_dim": int(_need(cfg, "intermediate_size")),
                  "SoftmaxTopKRouter.renormalize": bool(cfg.get("norm_topk_prob", False)),
                  "MoeMlp.num_shared_experts": 0, "MoeMlp.shared_expert_gate": False,
                  "ModelConfig.mlp_kinds": ("moe",)})
        return b
    # qwen2_moe, qwen3_moe: MoE layers chosen by mlp_only_layers and decoder_sparse_step
    experts, f = _num_experts(cfg), int(_need(cfg, "moe_intermediate_size"))
    shared = int(cfg.get("shared_expert_intermediate_size") or 0) if family == "qwen2_moe" else 0
    if shared % f:
        raise ValueError(f"config.json shared_expert_intermediate_size={shared} must be a "
                         f"multiple of moe_intermediate_size={f}")
    step, only = int(cfg.get("decoder_sparse_step", 1)), set(cfg.get("mlp_only_layers") or ())
    kinds = tuple("moe" if i not in only and experts > 0 and (i + 1) % step == 0 else "dense"
                  for i in range(layers))
    b.update({"MoeMlp.num_experts": experts, "MoeMlp.mlp_dim": f,
              "SoftmaxTopKRouter.renormalize": bool(cfg.get("norm_topk_prob", False)),
              "MoeMlp.num_shared_experts": shared // f, "MoeMlp.shared_expert_gate": shared > 0,
              "ModelConfig.mlp_kinds": kinds if len(set(kinds)) > 1 else (kinds[0],)})
    return b


def _refuse(setting: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{setting}={value!r} has no Hugging Face equivalent ({why}); export "
                      f"supports {', '.join(FAMILIES)}")


def to_hf_config(model: Any, moe: Any | None, prefer: str | None = None,
                 base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """config.json for ModelConfig `model` (and the MoeMlp `moe` of its MoE layers). `prefer`:
    the family to keep when it fits (the imported one); `base`: an imported config.json whose
    other fields (token ids, ...) are carried over."""
    kinds = [model.mlp_kind(i) for i in range(model.num_layers)]
    gpt_oss = _is_gpt_oss(model, moe)
    if model.mlp_activation not in HF_ACT and not gpt_oss:
        raise _refuse("ModelConfig.mlp_activation", model.mlp_activation,
                      f"HF's gated MLPs apply one activation to the gate; exportable: "
                      f"{sorted(HF_ACT)}")
    if model.activation_threshold:
        raise _refuse("ModelConfig.activation_threshold", model.activation_threshold,
                      "no HF activation is a shifted ReLU")
    if model.scale_embeddings:
        raise _refuse("ModelConfig.scale_embeddings", True, "HF models do not scale embeddings")
    if any(model.attention_kind(i) != "dense" for i in range(model.num_layers)):
        raise _refuse("ModelConfig.attention_kinds", model.attention_kinds,
                      "block-sparse and NSA attention")
    if model.kv_lora_rank:
        router = _router(moe) if moe is not None else None
        family = deepseek.family_of(model, moe, kinds, router, prefer, _refuse)
    elif gpt_oss:
        family = _gpt_oss(model, moe, kinds)
    elif "moe" in kinds:
        family = _moe_family(model, moe, kinds)
    elif model.qk_norm == "projection":
        raise _refuse("ModelConfig.qk_norm", "projection",
                      "OLMoE's q/k norms, and OLMoE is MoE on every layer")
    elif model.clip_qkv:
        raise _refuse("ModelConfig.clip_qkv", model.clip_qkv, "OLMoE's, an MoE on every layer")
    elif model.qk_norm == "head":
        family = _qwen3(model, "qwen3")
    elif model.qkv_bias:
        family = "qwen2"
    elif model.sliding_window:
        family = "mistral"
    else:
        family = prefer if prefer in ("llama", "mistral") else "llama"
    cfg = {k: v for k, v in (base or {}).items() if k in ("bos_token_id", "eos_token_id",
                                                         "pad_token_id")}
    cfg.update({
        "architectures": [ARCHITECTURES[family]], "model_type": family,
        "vocab_size": model.vocab_size, "hidden_size": model.embed_dim,
        "intermediate_size": model.mlp_dim, "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_heads, "num_key_value_heads": model.num_kv_heads,
        "head_dim": model.head_dim, "hidden_act": HF_ACT.get(model.mlp_activation, "silu"),
        "max_position_embeddings": model.max_seq_len, "rms_norm_eps": model.norm_epsilon,
        "tie_word_embeddings": model.tie_embeddings, "rope_theta": model.rope_theta,
        "rope_parameters": _rope_out(model), "attention_dropout": 0.0, "dtype": "float32",
        "use_cache": True,
    })
    if family in ("llama", "mistral"):
        cfg.update(attention_bias=False, mlp_bias=False)
    if family in ("qwen3", "qwen3_moe", "olmoe"):
        cfg["attention_bias"] = False
    if family in ("mistral", "mixtral"):
        cfg["sliding_window"] = model.sliding_window or None
    if family == "qwen3_moe":
        cfg.update(use_sliding_window=bool(model.sliding_window),
                   sliding_window=model.sliding_window or None)
    if family in ("qwen2", "qwen2_moe", "qwen3"):
        w = model.sliding_window
        cfg.update(use_sliding_window=bool(w), sliding_window=w or None, max_window_layers=0,
                   layer_types=[("sliding_attention" if w else "full_attention")] *
                   model.num_layers)
    if family == "mixtral":
        cfg.update(num_local_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
                   intermediate_size=moe.mlp_dim, router_jitter_noise=0.0,
                   router_aux_loss_coef=moe.load_balance_weight, output_router_logits=False)
    if family in ("qwen2_moe", "qwen3_moe"):
        cfg.update(num_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
                   moe_intermediate_size=moe.mlp_dim, norm_topk_prob=_router(moe).renormalize,
                   decoder_sparse_step=1,
                   mlp_only_layers=[i for i, k in enumerate(kinds) if k == "dense"],
                   router_aux_loss_coef=moe.load_balance_weight, output_router_logits=False)
    if family == "qwen2_moe":
        cfg.update(shared_expert_intermediate_size=moe.mlp_dim * moe.num_shared_experts,
                   qkv_bias=model.qkv_bias)
    if family in DEEPSEEK:
        cfg.update(deepseek.to_hf_fields(model, moe, kinds, router, family))
    if family == "olmoe":
        cfg.update(num_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
                   intermediate_size=moe.mlp_dim, norm_topk_prob=_router(moe).renormalize,
                   clip_qkv=float(model.clip_qkv) or None,
                   router_aux_loss_coef=moe.load_balance_weight, output_router_logits=False)
    if family == "gpt_oss":
        cfg.update(num_local_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
                   intermediate_size=moe.mlp_dim, swiglu_alpha=float(model.swiglu_alpha),
                   swiglu_limit=float(model.swiglu_limit), attention_bias=model.qkv_bias,
                   sliding_window=model.sliding_window or None,
                   layer_types=["sliding_attention" if model.window(i) else "full_attention"
                                for i in range(model.num_layers)],
                   router_aux_loss_coef=moe.load_balance_weight, output_router_logits=False)
    return cfg


def _is_gpt_oss(model: Any, moe: Any) -> bool:
    """Does the model use an option only gpt-oss has (sinks, output bias, per-layer windows,
    the clamped SwiGLU, router or expert biases)?"""
    return bool(model.attention_sinks or model.out_bias or model.layer_types
                or model.mlp_activation == "clamped_swiglu"
                or (moe is not None and (moe.router_bias or moe.expert_bias)))


def _gpt_oss(model: Any, moe: Any, kinds: list[str]) -> str:
    """gpt-oss has all of its options on: sinks, router and expert biases, the clamped
    SwiGLU, MoE on every layer (softmax over the top-k logits, no shared expert); q/k/v and
    output biases together (attention_bias); no q/k norm."""
    why = "gpt-oss's options come together: {} (a model with {} is exported as gpt-oss)"
    first = ("attention sinks" if model.attention_sinks else "an output bias" if model.out_bias
             else "layer_types" if model.layer_types else "the clamped SwiGLU"
             if model.mlp_activation == "clamped_swiglu" else "router or expert biases")
    need = [("ModelConfig.attention_sinks", model.attention_sinks, True),
            ("ModelConfig.mlp_activation", model.mlp_activation, "clamped_swiglu"),
            ("ModelConfig.mlp_kinds", tuple(model.mlp_kinds) if moe is None or "dense" in kinds
             else ("moe",), ("moe",)),
            ("ModelConfig.out_bias", model.out_bias, model.qkv_bias),
            ("ModelConfig.qk_norm", model.qk_norm, "none"),
            ("ModelConfig.clip_qkv", model.clip_qkv, 0.0)]
    if moe is not None and "dense" not in kinds:
        need += [("MoeMlp.router_bias", moe.router_bias, True),
                 ("MoeMlp.expert_bias", moe.expert_bias, True),
                 ("MoeMlp.num_shared_experts", moe.num_shared_experts, 0),
                 ("MoeMlp.router", moe.router, "softmax_topk"),
                 ("MoeMlp.correction_bias", moe.correction_bias, False),
                 ("MoeMlp.bias_update_rate", moe.bias_update_rate, 0.0)]
    for setting, value, want in need:
        if value != want:
            raise _refuse(setting, value, why.format(f"needs {want!r}", first))
    router = _router(moe)
    if not router.renormalize or router.num_groups != 1:
        setting = ("SoftmaxTopKRouter.renormalize" if not router.renormalize
                   else "SoftmaxTopKRouter.num_groups")
        raise _refuse(setting, getattr(router, setting.split(".")[1]),
                      why.format("softmax over the top-k logits", first))
    return "gpt_oss"


def _router(moe: Any) -> Any:
    """The router of the MoE layers, with its gin settings."""
    return ROUTERS.get(moe.router, "MoeMlp.router")()


def _moe_family(model: Any, moe: Any, kinds: list[str]) -> str:
    if moe.router != "softmax_topk":
        raise _refuse("MoeMlp.router", moe.router, "HF MoE families route by softmax top-k")
    if moe.correction_bias:
        raise _refuse("MoeMlp.correction_bias", True, "DeepSeek-style routing")
    if _router(moe).num_groups != 1:
        raise _refuse("SoftmaxTopKRouter.num_groups", _router(moe).num_groups,
                      "DeepSeek-style routing")
    if moe.bias_update_rate > 0:
        raise _refuse("MoeMlp.bias_update_rate", moe.bias_update_rate, "a selection bias")
    if model.qk_norm == "projection":
        return _olmoe(model, moe, kinds)
    if model.clip_qkv:
        raise _refuse("ModelConfig.clip_qkv", model.clip_qkv,
                      "only OLMoE clips q, k and v, and its q/k norms are qk_norm='projection'")
    if model.qk_norm == "head":
        if moe.num_shared_experts:
            raise _refuse("MoeMlp.num_shared_experts", moe.num_shared_experts,
                          "Qwen3-MoE has no shared expert")
        return _qwen3(model, "qwen3_moe")
    if moe.num_shared_experts:
        if not moe.shared_expert_gate:
            raise _refuse("MoeMlp.shared_expert_gate", False,
                          "Qwen2-MoE's shared expert is always sigmoid-gated")
        return "qwen2_moe"
    if "dense" in kinds:
        raise _refuse("ModelConfig.mlp_kinds", model.mlp_kinds,
                      "dense layers between MoE layers need Qwen2-MoE, which has shared experts")
    if not _router(moe).renormalize:
        raise _refuse("SoftmaxTopKRouter.renormalize", False,
                      "Mixtral renormalizes its top-k weights")
    if model.qkv_bias:
        raise _refuse("ModelConfig.qkv_bias", True, "Mixtral has no q/k/v bias")
    return "mixtral"


def _qwen3(model: Any, family: str) -> str:
    if model.qkv_bias:
        raise _refuse("ModelConfig.qkv_bias", True, "Qwen3's attention_bias also adds an "
                      "output bias, which sparsejax does not have")
    return family


def _olmoe(model: Any, moe: Any, kinds: list[str]) -> str:
    """OLMoE: MoE on every layer, no shared expert, no q/k/v bias, no sliding window, heads of
    embed_dim // num_heads (its q/k norms span the projections)."""
    if moe.num_shared_experts:
        raise _refuse("MoeMlp.num_shared_experts", moe.num_shared_experts,
                      "OLMoE has no shared expert")
    if "dense" in kinds:
        raise _refuse("ModelConfig.mlp_kinds", model.mlp_kinds, "OLMoE is MoE on every layer")
    if model.qkv_bias:
        raise _refuse("ModelConfig.qkv_bias", True, "OLMoE's attention_bias also adds an "
                      "output bias, which sparsejax does not have")
    if model.sliding_window:
        raise _refuse("ModelConfig.sliding_window", model.sliding_window,
                      "OLMoE attends to the whole context")
    if model.num_heads * model.head_dim != model.embed_dim:
        raise _refuse("ModelConfig.head_dim", model.head_dim,
                      f"OLMoE's heads are embed_dim // num_heads = "
                      f"{model.embed_dim // model.num_heads} wide")
    return "olmoe"


def _rope_out(model: Any) -> dict[str, Any]:
    s = dict(model.rope_scaling or {})
    kind = s.pop("type", "default")
    return {"rope_theta": float(model.rope_theta), "rope_type": kind, **s}
