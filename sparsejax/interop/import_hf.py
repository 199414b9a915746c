"""`sparsejax import-hf`: a Hugging Face checkpoint directory -> a sparsejax workdir.

Writes `W/pretrained.gin` (the bindings that rebuild the architecture and select the tokenizer),
`W/pretrained/` (a params-only orbax checkpoint that `sparsejax train` starts from and
`sparsejax eval` / `sample` score), the tokenizer files, and `W/hf_import.json`.

Tensors are read lazily: each param is assembled with `jax.make_array_from_callback`, whose
callback reads from the memory-mapped safetensors only the slice one device holds (sharded by
the logical-axis rules), so a checkpoint never sits whole in host memory.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from sparsejax.config import parse_gin
from sparsejax.interop import mapping
from sparsejax.interop.families import from_hf_config
from sparsejax.interop.mxfp4 import open_checkpoint
from sparsejax.interop.safetensors_io import SafetensorsCheckpoint, expect_names
from sparsejax.models.transformer import ModelConfig, Transformer
from sparsejax.parallel.mesh import make_mesh
from sparsejax.parallel.rules import LOGICAL_RULES, logical_shardings, path_str
from sparsejax.train.build import strip_boxes
from sparsejax.train.trainer import TrainConfig
from sparsejax.train.workdir import PRETRAINED_CONFIG, PRETRAINED_DIR as PRETRAINED

log = logging.getLogger(__name__)
RECORD = "hf_import.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def read_config(src: str) -> dict[str, Any]:
    path = os.path.join(src, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"--src={src!r} has no config.json")
    with open(path) as f:
        return json.load(f)


def render_gin(bindings: Mapping[str, Any], header: str = "") -> str:
    """Gin text for {'ModelConfig.vocab_size': 32000, ...} (values as Python literals)."""
    lines = [f"# {line}" for line in header.splitlines()]
    lines += [f"{k} = {v!r}" for k, v in bindings.items()]
    return "\n".join(lines) + "\n"


def tokenizer_bindings(src: str, workdir: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """make_tokenizer bindings for the checkpoint's tokenizer.json (copied into `workdir`),
    or {} (the byte tokenizer) when the checkpoint has none."""
    if not os.path.isfile(os.path.join(src, "tokenizer.json")):
        return {}
    ids = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = cfg.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        ids[key] = value
    return {"make_tokenizer.kind": "hf",
            "make_tokenizer.path": os.path.join(os.path.abspath(workdir), "tokenizer.json"),
            "make_tokenizer.bos_id": ids["bos_token_id"],
            "make_tokenizer.eos_id": ids["eos_token_id"],
            "make_tokenizer.pad_id": ids["pad_token_id"]}


def train_bindings(arch: Mapping[str, Any]) -> dict[str, Any]:
    """TrainConfig.seq_len capped at the model's context when that is below the default."""
    default = TrainConfig.__dataclass_fields__["seq_len"].default
    limit = arch["ModelConfig.max_seq_len"]
    return {"TrainConfig.seq_len": limit} if limit < default else {}


def abstract_params(model_config, mesh) -> tuple[dict, dict]:
    """({path: ShapeDtypeStruct with sharding}, {path: sharding}) of the model's params, per
    layer (an import is stored unscanned; a run with scanned layers stacks it on start)."""
    model = Transformer(dataclasses.replace(model_config, scan_layers=False))
    dummy = jnp.zeros((1, 8), jnp.int32)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        boxed = jax.eval_shape(lambda k: model.init({"params": k, "router": k, "dropout": k},
                                                    dummy), jax.random.key(0))
        shardings = logical_shardings(boxed["params"], mesh)
    shapes = strip_boxes(boxed["params"])
    flat = {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(shapes)}
    flat_sh = {path_str(p): s for p, s in jax.tree_util.tree_leaves_with_path(shardings)}
    return flat, flat_sh


def abstract_moe_state(model_config) -> dict[str, Any]:
    """{path: ShapeDtypeStruct} of the model's MoE state ('layer_3/moe/bias'), per layer;
    empty when it keeps none."""
    model = Transformer(dataclasses.replace(model_config, scan_layers=False))
    dummy = jnp.zeros((1, 8), jnp.int32)
    with nn.logical_axis_rules(LOGICAL_RULES):
        out = jax.eval_shape(lambda k: model.init({"params": k, "router": k, "dropout": k},
                                                  dummy), jax.random.key(0))
    return {path_str(p): x for p, x in
            jax.tree_util.tree_leaves_with_path(out.get("moe_state", {}))}


def state_sources(state_shapes: Mapping[str, Any], family: str) -> dict[str, str]:
    """{our MoE state path: HF tensor} for the entries the family stores (DeepSeek-V3's
    e_score_correction_bias); entries it lacks keep their initial value."""
    return {p: n for p in state_shapes if (n := mapping.state_name(p, family)) is not None}


def check_checkpoint(ckpt: SafetensorsCheckpoint, sources: Mapping[str, mapping.Source],
                     src: str, states: Mapping[str, tuple[int, ...]] | None = None,
                     dropped: Sequence[str] = ()) -> None:
    """Missing/unexpected tensors and shape mismatches against config.json, named. `states`:
    {HF tensor: shape} of MoE state entries; `dropped`: tensors deliberately not imported."""
    want = {n: s.hf_shape for s in sources.values() for n in s.names}
    want.update(states or {})
    skip = set(dropped)
    have = [n for n in ckpt.names if not mapping.IGNORED.match(n) and n not in skip]
    if "lm_head.weight" not in want and "lm_head.weight" in have:
        have.remove("lm_head.weight")  # tied models sometimes store the tied copy
    expect_names(have, want, src)
    for name, shape in want.items():
        if ckpt.shapes[name] != tuple(shape):
            raise ValueError(f"tensor {name} has shape {list(ckpt.shapes[name])} but config.json "
                             f"implies {list(shape)}")


def load_params(ckpt: SafetensorsCheckpoint, sources: Mapping[str, mapping.Source],
                shapes: Mapping[str, Any], shardings: Mapping[str, Any]) -> dict[str, jax.Array]:
    """{path: jax.Array} assembled slice by slice: for each addressable device, only its own
    slice is read, moved to the device and dropped from host memory before the next one
    (replicated slices are read once per param)."""
    out = {}
    for path, sds in shapes.items():
        src, shape, sharding = sources[path], tuple(sds.shape), shardings[path]
        dtype, memo, arrays = np.dtype(sds.dtype), {}, []
        for device, index in sharding.addressable_devices_indices_map(shape).items():
            key = tuple(sl.indices(n) for sl, n in zip(index, shape))
            if key not in memo:
                memo.clear()
                host = mapping.read_slice(ckpt.read, src, shape, index, dtype)
                memo[key] = jax.device_put(host, device)
                del host
                arrays.append(memo[key])
            else:
                arrays.append(jax.device_put(memo[key], device))
            jax.block_until_ready(arrays[-1])
        out[path] = jax.make_array_from_single_device_arrays(shape, sharding, arrays)
    return out


def unflatten(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def check_workdir(workdir: str, bindings: Mapping[str, Any]) -> None:
    """A workdir may be empty or hold an earlier import of the same architecture."""
    ckpts = os.path.join(workdir, "checkpoints")
    if os.path.isdir(ckpts) and any(d.isdigit() for d in os.listdir(ckpts)):
        raise ValueError(f"--workdir={workdir!r} already holds a training run; import into a "
                         f"new workdir")
    record = os.path.join(workdir, RECORD)
    if os.path.exists(record):
        with open(record) as f:
            old = json.load(f).get("bindings", {})
        model_keys = {k for k in set(old) | set(bindings) if k.startswith(
            ("ModelConfig.", "MoeMlp.", "SoftmaxTopKRouter.", "SigmoidTopKRouter."))}
        diff = sorted(k for k in model_keys if old.get(k) != _jsonable(bindings.get(k)))
        if diff:
            raise ValueError(f"--workdir={workdir!r} already holds a different imported model "
                             f"({diff[0]}: {old.get(diff[0])!r} vs "
                             f"{_jsonable(bindings.get(diff[0]))!r}); use a new workdir")


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(v))


def import_hf(src: str, workdir: str, bindings: Sequence[str] = (),
              imports: Sequence[str] = ()) -> dict[str, Any]:
    """Imports the checkpoint in `src` into `workdir` (see module docstring). `bindings`:
    extra gin bindings (mesh, dtypes) applied on top of the generated config."""
    cfg = read_config(src)
    arch = from_hf_config(cfg)  # unknown family / option -> ValueError, before any read
    ckpt = open_checkpoint(src, cfg)  # MXFP4 experts dequantized, other quantization refused
    dropped = mapping.extra_layers(ckpt.names, arch["ModelConfig.num_layers"])
    if dropped:
        extra = sorted({int(n.split(".")[2]) for n in dropped})
        log.warning("import-hf: dropping %d tensors of layers %s past num_hidden_layers=%d "
                    "(multi-token-prediction layers, num_nextn_predict_layers=%s): sparsejax "
                    "does not run them, and export-hf writes the model without them",
                    len(dropped), extra, arch["ModelConfig.num_layers"],
                    cfg.get("num_nextn_predict_layers"))
    arch_and_tok = {**arch, **tokenizer_bindings(src, workdir, cfg), **train_bindings(arch)}
    check_workdir(workdir, arch_and_tok)
    os.makedirs(workdir, exist_ok=True)
    gin_path = os.path.join(workdir, PRETRAINED_CONFIG)
    text = render_gin(arch_and_tok, f"Imported by `sparsejax import-hf` from {os.path.abspath(src)}"
                      f"\n(model_type {cfg['model_type']}).")
    tmp = gin_path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    try:
        parse_gin([tmp], bindings, imports=imports)
        model_config, mesh = ModelConfig(), make_mesh()
        shapes, shardings = abstract_params(model_config, mesh)
        sources = mapping.plan({k: tuple(v.shape) for k, v in shapes.items()}, cfg["model_type"],
                               model_config.vocab_size)
        state_shapes = abstract_moe_state(model_config)
        states = state_sources(state_shapes, cfg["model_type"])
        check_checkpoint(ckpt, sources, src, {n: tuple(state_shapes[p].shape)
                                              for p, n in states.items()}, dropped)
    except Exception:
        os.remove(tmp)
        raise
    os.replace(tmp, gin_path)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(workdir, name))
    with jax.set_mesh(mesh):
        params = unflatten(load_params(ckpt, sources, shapes, shardings))
        saved = {"params": params}
        if state_shapes:  # the family's stored entries, the rest as the model inits them
            saved["moe_state"] = unflatten({
                p: (np.asarray(ckpt.read(states[p]), np.dtype(x.dtype))
                    if p in states else np.zeros(x.shape, x.dtype))
                for p, x in state_shapes.items()})
        with ocp.StandardCheckpointer() as saver:
            saver.save(os.path.join(os.path.abspath(workdir), PRETRAINED), saved, force=True)
    ckpt.close()
    with open(os.path.join(workdir, RECORD), "w") as f:
        json.dump({"source": os.path.abspath(src), "model_type": cfg["model_type"],
                   "config": cfg, "bindings": _jsonable(arch_and_tok)}, f, indent=1)
    n = sum(int(np.prod(s.shape)) for s in shapes.values())
    return {"workdir": workdir, "model_type": cfg["model_type"], "params": n,
            "checkpoint_bytes": ckpt.nbytes(), "dropped_tensors": len(dropped)}
