"""Which Hugging Face tensors make each sparsejax param, and how.

HF `nn.Linear` weights are [out, in]; ours are [in, out] (attention kernels 2-D
`[embed, heads * head_dim]`, whose head layout and half-split RoPE already match HF's
`rotate_half` convention, so q/k need no permutation). Stacked expert weights [E, in, out]
come from one HF tensor per expert. The vocab axis of the embedding and LM head is zero-padded
to `ModelConfig.padded_vocab_size` rows on import and cut back on export.

gpt-oss stores each layer's experts as single tensors that are already [E, in, out]
(`mlp.experts.gate_up_proj` [E, embed, 2 * mlp], `down_proj` [E, mlp, embed], and their
biases), with gate and up interleaved along the last axis (gate at even columns, up at odd):
our `wi_gate` / `wi_up` (and their biases) are its even / odd columns (`Source.interleave`).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Mapping

import numpy as np

# Checkpoint entries that carry no parameters (old RoPE caches): ignored on import.
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


@dataclasses.dataclass(frozen=True)
class Source:
    """How one of our params is made: `names` (one, or one per expert when `stacked`), each
    transposed when `transpose`; `hf_shape` is the shape of each HF tensor."""

    names: tuple[str, ...]
    transpose: bool
    stacked: bool
    hf_shape: tuple[int, ...]
    interleave: tuple[int, int] | None = None  # (offset, stride) of our columns in the last axis


_ATTN = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "o_proj"}
_QK_NORM = {"query_norm": "q_norm", "key_norm": "k_norm"}  # ModelConfig.qk_norm (Qwen3, OLMoE)
_MLP = {"wi_gate": "gate_proj", "wi_up": "up_proj", "wo": "down_proj"}
_MIXTRAL_EXPERT = {"wi_gate": "w1", "wi_up": "w3", "wo": "w2"}
# multi-head latent attention (DeepSeek): projections (`Projection` modules) and norms
_MLA = {"query": "q_proj", "query_a": "q_a_proj", "query_b": "q_b_proj",
        "kv_a": "kv_a_proj_with_mqa", "kv_b": "kv_b_proj", "out": "o_proj"}
_MLA_NORM = {"query_a_norm": "q_a_layernorm", "kv_a_norm": "kv_a_layernorm"}
DEEPSEEK = ("deepseek_v2", "deepseek_v3")
# MoE state (not params) that a family stores: DeepSeek-V3's selection bias
_STATE = {"deepseek_v3": {"moe/bias": "mlp.gate.e_score_correction_bias"}}
# gpt-oss: our expert param -> (its HF tensor in mlp.experts, column offset among 2 or None)
_GPT_OSS_EXPERT = {"wi_gate": ("gate_up_proj", 0), "wi_up": ("gate_up_proj", 1),
                   "wo": ("down_proj", None), "wi_gate_bias": ("gate_up_proj_bias", 0),
                   "wi_up_bias": ("gate_up_proj_bias", 1), "wo_bias": ("down_proj_bias", None)}


def hf_names(path: str, family: str) -> tuple[tuple[str, ...] | str, bool]:
    """(HF tensor name, or a per-expert format string with '{e}', and whether it is
    transposed) for our param `path` ('layer_0/attn/query')."""
    top = {"embed/embedding": ("model.embed_tokens.weight", False),
           "final_norm/scale": ("model.norm.weight", False),
           "lm_head/kernel": ("lm_head.weight", True)}
    if path in top:
        return top[path]
    m = re.fullmatch(r"layer_(\d+)/(.+)", path)
    if not m:
        raise ValueError(f"param {path} has no Hugging Face counterpart")
    p, rest = f"model.layers.{m.group(1)}.", m.group(2)
    parts = rest.split("/")
    if rest == "attn_norm/scale":
        return p + "input_layernorm.weight", False
    if rest == "mlp_norm/scale":
        return p + "post_attention_layernorm.weight", False
    if parts[0] == "attn" and len(parts) == 3 and parts[1] in _QK_NORM and parts[2] == "scale":
        return p + f"self_attn.{_QK_NORM[parts[1]]}.weight", False
    if family in DEEPSEEK and parts[0] == "attn" and len(parts) == 3:
        if parts[1] in _MLA and parts[2] == "kernel":
            return p + f"self_attn.{_MLA[parts[1]]}.weight", True
        if parts[1] in _MLA_NORM and parts[2] == "scale":
            return p + f"self_attn.{_MLA_NORM[parts[1]]}.weight", False
    if rest == "attn/sinks":
        return p + "self_attn.sinks", False
    if parts[0] == "attn" and len(parts) == 2:
        name = parts[1]
        if name.endswith("_bias") and name[:-5] in _ATTN:
            return p + f"self_attn.{_ATTN[name[:-5]]}.bias", False
        if name in _ATTN:
            return p + f"self_attn.{_ATTN[name]}.weight", True
    if parts[0] == "mlp" and len(parts) == 3 and parts[1] in _MLP:
        return p + f"mlp.{_MLP[parts[1]]}.weight", True
    if parts[0] == "moe" and family == "gpt_oss":
        if rest == "moe/router_kernel":
            return p + "mlp.router.weight", True
        if rest == "moe/router_bias":
            return p + "mlp.router.bias", False
        if len(parts) == 3 and parts[1] == "experts" and parts[2] in _GPT_OSS_EXPERT:
            return p + f"mlp.experts.{_GPT_OSS_EXPERT[parts[2]][0]}", False
    elif parts[0] == "moe":
        moe = p + ("block_sparse_moe." if family == "mixtral" else "mlp.")
        if rest == "moe/router_kernel":
            return moe + "gate.weight", True
        if rest == "moe/router_shared_gate":
            return moe + "shared_expert_gate.weight", True
        if len(parts) == 3 and parts[1] == "experts":
            if family == "mixtral":
                return moe + f"experts.{{e}}.{_MIXTRAL_EXPERT[parts[2]]}.weight", True
            return moe + f"experts.{{e}}.{_MLP[parts[2]]}.weight", True
        if len(parts) == 3 and parts[1] == "shared_experts":
            shared = "shared_experts" if family in DEEPSEEK else "shared_expert"
            return moe + f"{shared}.{_MLP[parts[2]]}.weight", True
    raise ValueError(f"param {path} has no Hugging Face counterpart in family {family!r}")


def state_name(path: str, family: str) -> str | None:
    """The HF tensor of our MoE state entry `path` ('layer_3/moe/bias'), or None when the
    family stores no such tensor."""
    m = re.fullmatch(r"layer_(\d+)/(.+)", path)
    name = _STATE.get(family, {}).get(m.group(2)) if m else None
    return None if name is None else f"model.layers.{m.group(1)}.{name}"


def extra_layers(names, num_layers: int) -> list[str]:
    """The tensors of layers past `num_layers` (DeepSeek-V3's multi-token-prediction layers,
    `num_nextn_predict_layers`, stored as model.layers.<num_layers + i>.*)."""
    out = []
    for name in names:
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m and int(m.group(1)) >= num_layers:
            out.append(name)
    return out
def _interleave(path: str, family: str) -> tuple[int, int] | None:
    """(offset, stride) of our param's columns in its HF tensor (gpt-oss's gate/up), or None."""
    parts = path.split("/")
    if family != "gpt_oss" or len(parts) != 4 or parts[1:3] != ["moe", "experts"]:
        return None
    offset = _GPT_OSS_EXPERT.get(parts[3], (None, None))[1]
    return None if offset is None else (offset, 2)


def plan(shapes: Mapping[str, tuple[int, ...]], family: str, vocab_size: int
         ) -> dict[str, Source]:
    """Sources of every param (`shapes`: our param path -> shape)."""
    out = {}
    for path, shape in shapes.items():
        name, transpose = hf_names(path, family)
        stacked = "{e}" in name
        per = tuple(shape[1:]) if stacked else tuple(shape)
        hf_shape = per[::-1] if transpose else per
        interleave = _interleave(path, family)
        if interleave is not None:
            hf_shape = hf_shape[:-1] + (hf_shape[-1] * interleave[1],)
        if path == "embed/embedding":
            hf_shape = (vocab_size,) + hf_shape[1:]
        if path == "lm_head/kernel":
            hf_shape = (vocab_size,) + hf_shape[1:]
        names = tuple(name.format(e=e) for e in range(shape[0])) if stacked else (name,)
        out[path] = Source(names, transpose, stacked, tuple(hf_shape), interleave)
    return out


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> list[tuple[int, int]]:
    return [sl.indices(n)[:2] for sl, n in zip(index, shape)]


def read_slice(read, src: Source, shape: tuple[int, ...], index: tuple[slice, ...],
               dtype) -> np.ndarray:
    """Our param's slice `index` (shape `shape`), built from HF tensors by `read(name,
    hf_index)`; rows past the HF vocab come out as zeros."""
    bounds = _bounds(index, shape)
    if src.stacked:
        (e0, e1), inner = bounds[0], bounds[1:]
        parts = [_read_one(read, src.names[e], src, inner, dtype) for e in range(e0, e1)]
        return np.stack(parts) if parts else np.zeros(
            (0,) + tuple(b - a for a, b in inner), dtype)
    return _read_one(read, src.names[0], src, bounds, dtype)


def _read_one(read, name: str, src: Source, bounds: list[tuple[int, int]], dtype) -> np.ndarray:
    if src.interleave is not None:  # our columns a..b-1 are HF columns off + i * stride
        (off, stride), (a, b) = src.interleave, bounds[-1]
        index = tuple(slice(*x) for x in bounds[:-1]) + (
            slice(off + a * stride, off + (b - 1) * stride + 1),)
        return read(name, index)[..., ::stride].astype(dtype, copy=False)
    ours_hf_extent = src.hf_shape[::-1] if src.transpose else src.hf_shape
    want = tuple(b - a for a, b in bounds)
    clipped = [(a, min(b, n)) for (a, b), n in zip(bounds, ours_hf_extent)]
    if any(b <= a for a, b in clipped):
        return np.zeros(want, dtype)
    hf_index = tuple(slice(a, b) for a, b in clipped)
    if src.transpose:
        arr = read(name, hf_index[::-1]).T
    else:
        arr = read(name, hf_index)
    arr = arr.astype(dtype, copy=False)
    if arr.shape != want:  # the vocab padding
        arr = np.pad(arr, [(0, w - s) for w, s in zip(want, arr.shape)])
    return arr


def to_hf_tensors(params: Mapping[str, np.ndarray], family: str, vocab_size: int
                  ) -> dict[str, np.ndarray]:
    """HF tensors from our params (path -> full numpy array): transposed, experts unstacked,
    the vocab padding cut."""
    out = {}
    for path, src in plan({k: v.shape for k, v in params.items()}, family, vocab_size).items():
        value = np.asarray(params[path])
        pieces = list(value) if src.stacked else [value]
        for name, piece in zip(src.names, pieces):
            t = piece.T if src.transpose else piece
            if path in ("embed/embedding", "lm_head/kernel"):
                t = t[:vocab_size]
            if src.interleave is not None:  # gpt-oss's gate/up columns of one tensor
                off, stride = src.interleave
                out.setdefault(name, np.zeros(src.hf_shape, t.dtype))[..., off::stride] = t
                continue
            out[name] = np.ascontiguousarray(t)
    return out
