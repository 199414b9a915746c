"""`sparsejax export-hf`: a sparsejax workdir -> config.json + safetensors (+ tokenizer files)
that transformers loads (`AutoModelForCausalLM.from_pretrained(out)`).

The exported weights are what the model computes with: a sparse run's masked params (pruned
entries exactly zero, N:M structure kept), and a compact run's projections as dense kernels
(models/formats/convert.py: exact zeros outside the stored blocks), so the HF model gives the
same logits. Options no supported HF architecture expresses fail with a message naming them,
before any weight is read.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from sparsejax.interop import mapping
from sparsejax.models.formats.convert import to_dense_params
from sparsejax.models.layer_stack import unstack_layers
from sparsejax.interop.families import to_hf_config
from sparsejax.interop.import_hf import RECORD, TOKENIZER_FILES
from sparsejax.train.workdir import PRETRAINED_DIR as PRETRAINED
from sparsejax.interop.safetensors_io import write_safetensors
from sparsejax.models.moe.layer import MoeMlp
from sparsejax.models.transformer import ModelConfig
from sparsejax.parallel.rules import LOGICAL_RULES, path_str
from sparsejax.train import trainer

DTYPES = ("float32", "bfloat16", "float16")


def moe_settings(model_config) -> Any:
    """The gin-configured MoeMlp of the model's MoE layers (None if it has none)."""
    if "moe" not in [model_config.mlp_kind(i) for i in range(model_config.num_layers)]:
        return None
    return MoeMlp(embed_dim=model_config.embed_dim)


def state_tensors(moe_state: Any, model_config, family: str) -> dict[str, np.ndarray]:
    """The HF tensors of the MoE state the family stores (DeepSeek-V3's
    e_score_correction_bias of each MoE layer; zeros where the model keeps no bias)."""
    flat = {}
    if moe_state:
        flat = {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(
            unstack_layers(jax.device_get(moe_state)))}
    moe = moe_settings(model_config)
    out = {}
    for i in range(model_config.num_layers):
        path = f"layer_{i}/moe/bias"
        name = mapping.state_name(path, family)
        if name is not None and model_config.mlp_kind(i) == "moe":
            out[name] = flat.get(path, np.zeros((moe.num_experts,), np.float32))
    return out


def export_hf(workdir: str, out: str, *, dtype: str = "float32",
              max_shard_bytes: int = 5 * 2**30) -> dict[str, Any]:
    """Exports the latest checkpoint of `workdir` (or its imported params) to `out`. Gin must
    already be parsed (the workdir's config)."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype={dtype!r} is not supported; valid: {DTYPES}")
    has_ckpt = os.path.isdir(os.path.join(workdir, "checkpoints")) and any(
        d.isdigit() for d in os.listdir(os.path.join(workdir, "checkpoints")))
    if not has_ckpt and not os.path.isdir(os.path.join(workdir, PRETRAINED)):
        raise ValueError(f"--workdir={workdir!r} holds no checkpoint and no imported params")
    record = {}
    if os.path.exists(os.path.join(workdir, RECORD)):
        with open(os.path.join(workdir, RECORD)) as f:
            record = json.load(f)
    model_config = ModelConfig()
    hf_config = to_hf_config(model_config, moe_settings(model_config),
                             prefer=record.get("model_type"), base=record.get("config"))
    hf_config["dtype"] = dtype
    cfg = trainer.TrainConfig()
    run, step, state = trainer.load_state_for_eval(workdir, cfg)
    method = run.sparsity_method
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(LOGICAL_RULES):
        params = state.params
        if method is not None:  # what the model computes with: masked params
            params = jax.jit(lambda s: method.forward_params(s.params, s.sparsity, step=s.step,
                                                             rng=None))(state)
    # compact projections (block-sparse values + layout) as the dense kernels they compute
    # with: exact zeros outside the stored blocks
    params = to_dense_params(jax.device_get(params), run.model_config)
    params = unstack_layers(jax.device_get(params))  # HF tensors are per layer
    flat = {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    np_dtype = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16,
                "float16": np.float16}[dtype]
    tensors = mapping.to_hf_tensors(flat, hf_config["model_type"], model_config.vocab_size)
    tensors.update(state_tensors(state.moe_state, model_config, hf_config["model_type"]))
    tensors = {k: v.astype(np_dtype) for k, v in tensors.items()}
    os.makedirs(out, exist_ok=True)
    files = write_safetensors(tensors, out, max_shard_bytes=max_shard_bytes)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    copied = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(workdir, n))]
    for name in copied:
        shutil.copyfile(os.path.join(workdir, name), os.path.join(out, name))
    zeros = sum(int(np.sum(v == 0)) for v in tensors.values())
    total = sum(int(v.size) for v in tensors.values())
    return {"out": out, "model_type": hf_config["model_type"], "step": step,
            "files": files + ["config.json"] + copied, "zero_fraction": zeros / max(total, 1)}
