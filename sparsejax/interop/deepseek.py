"""config.json <-> gin bindings of the DeepSeek-V2 and V3 families (multi-head latent attention,
models/mla.py), as transformers' `deepseek_v2` / `deepseek_v3` compute them.

Both: MLA on every layer (`q_lora_rank` null: one query projection), the first
`first_k_dense_replace` layers with a dense MLP of `intermediate_size`, MoE after them
(`n_routed_experts` of `moe_intermediate_size`, `n_shared_experts` ungated shared experts fused
into one MLP). V2 routes by softmax top-k, unnormalized, times `routed_scaling_factor`
(`topk_method` 'greedy', or 'group_limited_greedy': the `topk_group` of `n_group` groups with the
best expert); its RoPE pairs are always interleaved. V3 routes by sigmoid + the
`e_score_correction_bias` (kept in 'moe_state', `MoeMlp.correction_bias`), group-limited by the
two best experts of a group, `norm_topk_prob`, `routed_scaling_factor`; `rope_interleave`.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from sparsejax.interop.config_json import need as _need

_FIRST_DENSE = {"deepseek_v2": 0, "deepseek_v3": 3}  # transformers' defaults


def _bad(cfg: Mapping[str, Any], key: str, valid: str) -> ValueError:
    return ValueError(f"config.json {key}={cfg.get(key)!r} is not supported for "
                      f"{cfg.get('model_type')}; valid: {valid}")


def from_hf_config(cfg: Mapping[str, Any], layers: int) -> dict[str, Any]:
    """The bindings of a deepseek_v2 / deepseek_v3 config.json that differ from (or add to)
    the common ones of families.from_hf_config."""
    family = cfg["model_type"]
    quant = cfg.get("quantization_config")
    if quant:  # DeepSeek-V3 / R1 publish FP8 blocks with weight_scale_inv tensors
        raise ValueError(f"config.json quantization_config (quant_method "
                         f"{quant.get('quant_method')!r}) is not supported for {family}; "
                         f"import a bf16 / fp32 checkpoint (dequantize it first)")
    heads = int(_need(cfg, "num_attention_heads"))
    if int(cfg.get("num_key_value_heads") or heads) != heads:
        raise _bad(cfg, "num_key_value_heads", f"null or num_attention_heads={heads} (MLA "
                   f"expands one key and value per head)")
    rope, nope = int(_need(cfg, "qk_rope_head_dim")), int(_need(cfg, "qk_nope_head_dim"))
    interleave = True if family == "deepseek_v2" else cfg.get("rope_interleave", True)
    if family == "deepseek_v2" and "rope_interleave" in cfg and not cfg["rope_interleave"]:
        raise _bad(cfg, "rope_interleave", "true (transformers' DeepSeek-V2 always rotates "
                   "interleaved pairs)")
    b: dict[str, Any] = {
        "ModelConfig.num_kv_heads": heads,
        "ModelConfig.head_dim": nope + rope,
        "ModelConfig.kv_lora_rank": int(_need(cfg, "kv_lora_rank")),
        "ModelConfig.q_lora_rank": int(cfg.get("q_lora_rank") or 0),
        "ModelConfig.qk_rope_head_dim": rope,
        "ModelConfig.v_head_dim": int(_need(cfg, "v_head_dim")),
        "ModelConfig.rope_interleave": bool(interleave),
        "ModelConfig.qkv_bias": False,
    }
    if int(cfg.get("moe_layer_freq", 1)) != 1:
        raise _bad(cfg, "moe_layer_freq", "1 (transformers puts MoE on every layer from "
                   "first_k_dense_replace on)")
    first = cfg.get("first_k_dense_replace")
    first = _FIRST_DENSE[family] if first is None else int(first)
    kinds = tuple("dense" if i < first else "moe" for i in range(layers))
    b["ModelConfig.mlp_kinds"] = kinds if len(set(kinds)) > 1 else (kinds[0],)
    if "moe" in kinds:
        b.update(_moe_bindings(cfg, family))
    return b


def _moe_bindings(cfg: Mapping[str, Any], family: str) -> dict[str, Any]:
    shared = cfg.get("n_shared_experts")
    if not shared or int(shared) < 1:
        raise _bad(cfg, "n_shared_experts", "an int >= 1")
    experts = int(_need(cfg, "n_routed_experts"))
    groups, top_groups = int(cfg.get("n_group") or 1), int(cfg.get("topk_group") or 1)
    b: dict[str, Any] = {
        "MoeMlp.num_experts": experts, "MoeMlp.top_k": int(_need(cfg, "num_experts_per_tok")),
        "MoeMlp.mlp_dim": int(_need(cfg, "moe_intermediate_size")),
        "MoeMlp.num_shared_experts": int(shared), "MoeMlp.shared_expert_gate": False,
        "MoeMlp.router_jitter": 0.0, "MoeMlp.z_loss_weight": 0.0,
    }
    scaling = float(cfg.get("routed_scaling_factor", 1.0 if family == "deepseek_v2" else 2.5))
    if family == "deepseek_v2":
        if cfg.get("scoring_func", "softmax") != "softmax":
            raise _bad(cfg, "scoring_func", "softmax")
        if cfg.get("norm_topk_prob"):
            raise _bad(cfg, "norm_topk_prob", "false (transformers' DeepSeek-V2 does not "
                       "renormalize the top-k weights)")
        method = cfg.get("topk_method") or "greedy"
        if method not in ("greedy", "group_limited_greedy"):
            raise _bad(cfg, "topk_method", "greedy, group_limited_greedy")
        limited = method == "group_limited_greedy"
        b.update({"MoeMlp.router": "softmax_topk",
                  "MoeMlp.load_balance_weight": float(cfg.get("aux_loss_alpha", 0.001)),
                  "SoftmaxTopKRouter.renormalize": False,
                  "SoftmaxTopKRouter.routed_scaling": scaling,
                  "SoftmaxTopKRouter.num_groups": groups if limited else 1,
                  "SoftmaxTopKRouter.top_groups": top_groups if limited else 1,
                  "SoftmaxTopKRouter.group_score": "max"})
        return b
    if cfg.get("scoring_func", "sigmoid") != "sigmoid":
        raise _bad(cfg, "scoring_func", "sigmoid")
    if cfg.get("topk_method") not in (None, "noaux_tc"):
        raise _bad(cfg, "topk_method", "noaux_tc")
    b.update({"MoeMlp.router": "sigmoid_topk", "MoeMlp.correction_bias": True,
              "MoeMlp.load_balance_weight": 0.0,
              "SigmoidTopKRouter.renormalize": bool(cfg.get("norm_topk_prob", True)),
              "SigmoidTopKRouter.routed_scaling": scaling,
              "SigmoidTopKRouter.num_groups": groups, "SigmoidTopKRouter.top_groups": top_groups})
    return b


def family_of(model: Any, moe: Any, kinds: list[str], router: Any, prefer: str | None,
              refuse: Callable[[str, Any, str], ValueError]) -> str:
    """deepseek_v2 or deepseek_v3 for a model with MLA; an option neither expresses raises
    `refuse(setting, value, why)` (families._refuse)."""
    first = kinds.index("moe") if "moe" in kinds else len(kinds)
    if any(k != "moe" for k in kinds[first:]):
        raise refuse("ModelConfig.mlp_kinds", model.mlp_kinds,
                     "DeepSeek's dense MLP layers all come before its MoE layers")
    if model.mlp_activation != "silu":
        raise refuse("ModelConfig.mlp_activation", model.mlp_activation,
                      "DeepSeek configs with MLA are exported with SwiGLU only")
    if moe is None:
        return prefer if prefer in ("deepseek_v2", "deepseek_v3") else "deepseek_v3"
    if not moe.num_shared_experts:
        raise refuse("MoeMlp.num_shared_experts", 0, "DeepSeek has >= 1 shared experts")
    if moe.shared_expert_gate:
        raise refuse("MoeMlp.shared_expert_gate", True, "DeepSeek's shared experts are ungated")
    if moe.router == "sigmoid_topk":
        if router.num_groups > 1 and moe.num_experts // router.num_groups < 2:
            raise refuse("SigmoidTopKRouter.num_groups", router.num_groups,
                         f"transformers' DeepSeek-V3 scores each expert group by its best two "
                         f"experts, and {moe.num_experts} experts in {router.num_groups} groups "
                         f"leave fewer than two per group (keep more experts or fewer groups)")
        return "deepseek_v3"
    if moe.router != "softmax_topk":
        raise refuse("MoeMlp.router", moe.router, "DeepSeek routes by softmax (V2) or sigmoid "
                     "(V3) top-k")
    if moe.correction_bias or moe.bias_update_rate > 0:
        raise refuse("MoeMlp.correction_bias", True, "DeepSeek-V2 has no selection bias")
    if router.renormalize:
        raise refuse("SoftmaxTopKRouter.renormalize", True,
                     "transformers' DeepSeek-V2 does not renormalize its top-k weights")
    if router.num_groups > 1 and router.group_score != "max":
        raise refuse("SoftmaxTopKRouter.group_score", router.group_score,
                     "DeepSeek-V2 scores a group by its best expert ('max')")
    return "deepseek_v2"


def to_hf_fields(model: Any, moe: Any, kinds: list[str], router: Any,
                 family: str) -> dict[str, Any]:
    """The config.json fields of `family` beyond the common ones of families.to_hf_config."""
    first = kinds.index("moe") if "moe" in kinds else len(kinds)
    rope = int(model.qk_rope_head_dim)
    out: dict[str, Any] = {
        "num_key_value_heads": model.num_heads, "head_dim": rope,
        "kv_lora_rank": model.kv_lora_rank, "q_lora_rank": model.q_lora_rank or None,
        "qk_rope_head_dim": rope, "qk_nope_head_dim": model.head_dim - rope,
        "v_head_dim": model.v_head_dim, "first_k_dense_replace": first,
        "attention_bias": False,
    }
    if family == "deepseek_v3":
        out.update(rope_interleave=bool(model.rope_interleave), num_nextn_predict_layers=0)
    elif not model.rope_interleave:
        raise ValueError("ModelConfig.rope_interleave=False has no Hugging Face equivalent "
                         "in deepseek_v2 (it always rotates interleaved pairs); export as "
                         "deepseek_v3 with a sigmoid_topk router")
    if family == "deepseek_v2":
        out["mlp_bias"] = False
    if moe is None:  # all dense: MoE fields that transformers reads but builds nothing with
        return {**out, "n_routed_experts": 1, "num_experts_per_tok": 1, "n_shared_experts": 1,
                "moe_intermediate_size": model.mlp_dim, "n_group": 1, "topk_group": 1}
    out.update(n_routed_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
               moe_intermediate_size=moe.mlp_dim, n_shared_experts=moe.num_shared_experts,
               routed_scaling_factor=router.routed_scaling, n_group=router.num_groups,
               topk_group=router.top_groups)
    if family == "deepseek_v3":
        out["norm_topk_prob"] = router.renormalize
    else:
        out.update(norm_topk_prob=False, topk_method="group_limited_greedy"
                   if router.num_groups > 1 else "greedy")
    return out
