"""import-hf / export-hf without torch: checkpoints written with `safetensors.numpy` (names
spelled out here, independently of sparsejax/interop/mapping.py), bit-exact round trips,
sharded lazy loading on 8 devices, and the errors for bad input."""
import json
import os
import tracemalloc

import gin
import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sparsejax import cli
from sparsejax.train.commands import parse_workdir_config
from sparsejax.interop.import_hf import abstract_params, unflatten
from sparsejax.models.transformer import ModelConfig
from sparsejax.parallel.mesh import make_mesh
from sparsejax.train.warm_start import restore_pretrained

LLAMA = dict(model_type="llama", vocab_size=300, hidden_size=32, intermediate_size=48,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
             rope_theta=10000.0, hidden_act="silu", bos_token_id=1, eos_token_id=2)
MIXTRAL = dict(LLAMA, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2)
QWEN2_MOE = dict(LLAMA, model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2,
                 moe_intermediate_size=16, shared_expert_intermediate_size=32,
                 norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1],
                 qkv_bias=True)
QWEN3_MOE = dict(LLAMA, model_type="qwen3_moe", head_dim=16, num_experts=4,
                 num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
                 decoder_sparse_step=1, mlp_only_layers=[0])
OLMOE = dict(LLAMA, model_type="olmoe", num_experts=4, num_experts_per_tok=2, clip_qkv=8.0)
GPT_OSS = dict(LLAMA, model_type="gpt_oss", num_local_experts=4, num_experts_per_tok=2,
               attention_bias=True, sliding_window=4,
               layer_types=["sliding_attention", "full_attention"])


def hf_tensors(cfg, rng):
    """Random tensors with the HF names and [out, in] shapes of `cfg`."""
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    h, kv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    t = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not cfg["tie_word_embeddings"]:
        t["lm_head.weight"] = (v, d)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                  p + "self_attn.q_proj.weight": (h * hd, d),
                  p + "self_attn.k_proj.weight": (kv * hd, d),
                  p + "self_attn.v_proj.weight": (kv * hd, d),
                  p + "self_attn.o_proj.weight": (d, h * hd)})
        fam = cfg["model_type"]
        if fam in ("qwen2_moe", "gpt_oss"):
            t.update({p + "self_attn.q_proj.bias": (h * hd,), p + "self_attn.k_proj.bias": (kv * hd,),
                      p + "self_attn.v_proj.bias": (kv * hd,)})
        if fam == "gpt_oss":  # o bias, sinks; experts [E, in, out], gate/up interleaved
            e = cfg["num_local_experts"]
            t.update({p + "self_attn.o_proj.bias": (d,), p + "self_attn.sinks": (h,),
                      p + "mlp.router.weight": (e, d), p + "mlp.router.bias": (e,),
                      p + "mlp.experts.gate_up_proj": (e, d, 2 * f),
                      p + "mlp.experts.gate_up_proj_bias": (e, 2 * f),
                      p + "mlp.experts.down_proj": (e, f, d),
                      p + "mlp.experts.down_proj_bias": (e, d)})
            continue
        if fam in ("qwen3_moe", "olmoe"):  # per head / over the whole projection
            qn, kn = (hd, hd) if fam == "qwen3_moe" else (h * hd, kv * hd)
            t.update({p + "self_attn.q_norm.weight": (qn,), p + "self_attn.k_norm.weight": (kn,)})
        moe_layer = fam in ("mixtral", "olmoe") or (
            fam in ("qwen2_moe", "qwen3_moe") and i not in cfg["mlp_only_layers"])
        if fam == "mixtral":
            e = cfg["num_local_experts"]
            t[p + "block_sparse_moe.gate.weight"] = (e, d)
            for j in range(e):
                q = p + f"block_sparse_moe.experts.{j}."
                t.update({q + "w1.weight": (f, d), q + "w3.weight": (f, d), q + "w2.weight": (d, f)})
        elif moe_layer:
            e, fe = cfg["num_experts"], cfg.get("moe_intermediate_size", f)
            t[p + "mlp.gate.weight"] = (e, d)
            if fam == "qwen2_moe":
                fs = cfg["shared_expert_intermediate_size"]
                t.update({p + "mlp.shared_expert_gate.weight": (1, d),
                          p + "mlp.shared_expert.gate_proj.weight": (fs, d),
                          p + "mlp.shared_expert.up_proj.weight": (fs, d),
                          p + "mlp.shared_expert.down_proj.weight": (d, fs)})
            for j in range(e):
                q = p + f"mlp.experts.{j}."
                t.update({q + "gate_proj.weight": (fe, d), q + "up_proj.weight": (fe, d),
                          q + "down_proj.weight": (d, fe)})
        else:
            t.update({p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                      p + "mlp.down_proj.weight": (d, f)})
    return {k: (rng.standard_normal(s) * 0.2).astype(np.float32) for k, s in t.items()}


def write_checkpoint(directory, cfg, dtype=np.float32, shards=1, seed=0, tensors=None):
    os.makedirs(directory, exist_ok=True)
    tensors = hf_tensors(cfg, np.random.default_rng(seed)) if tensors is None else tensors
    tensors = {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in tensors.items()}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, os.path.join(directory, "model.safetensors"))
        return tensors
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[i::shards]}
        save_file(part, os.path.join(directory, fname))
        weight_map.update({k: fname for k in part})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return tensors


def import_cli(src, workdir, *extra):
    return cli.main(["import-hf", f"--src={src}", f"--workdir={workdir}", *extra])


def imported_params(workdir, *bindings):
    parse_workdir_config(workdir, [], list(bindings))
    mc = ModelConfig()
    mesh = make_mesh()
    shapes, sh = abstract_params(mc, mesh)
    abstract = unflatten({k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh[k])
                          for k, v in shapes.items()})
    return mc, restore_pretrained(workdir, abstract)


@pytest.mark.parametrize("cfg, dtype, shards", [(LLAMA, ml_dtypes.bfloat16, 3),
                                                (MIXTRAL, np.float16, 1),
                                                (QWEN2_MOE, np.float32, 2),
                                                (QWEN3_MOE, ml_dtypes.bfloat16, 1),
                                                (OLMOE, np.float32, 2),
                                                (GPT_OSS, ml_dtypes.bfloat16, 2)],
                         ids=["llama-bf16-sharded", "mixtral-fp16", "qwen2_moe-fp32-sharded",
                              "qwen3_moe-bf16", "olmoe-fp32-sharded", "gpt_oss-bf16-sharded"])
def test_import_maps_every_tensor_and_export_round_trips_bit_exact(tmp_path, cfg, dtype, shards):
    src, w, out = tmp_path / "src", str(tmp_path / "w"), str(tmp_path / "out")
    tensors = write_checkpoint(src, cfg, dtype, shards)
    assert import_cli(src, w) == 0
    mc, params = imported_params(w)
    # spot checks spelled out: transposes, stacking, padding of the vocab rows
    f32 = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
    np.testing.assert_array_equal(params["layer_0"]["attn"]["query"],
                                  f32["model.layers.0.self_attn.q_proj.weight"].T)
    emb = np.asarray(params["embed"]["embedding"])
    assert emb.shape == (384, 32) and not emb[300:].any()
    np.testing.assert_array_equal(emb[:300], f32["model.embed_tokens.weight"])
    if cfg["model_type"] == "mixtral":
        np.testing.assert_array_equal(params["layer_1"]["moe"]["experts"]["wo"][3],
                                      f32["model.layers.1.block_sparse_moe.experts.3.w2.weight"].T)
    if cfg["model_type"] == "qwen2_moe":
        assert mc.mlp_kinds == ("moe", "dense")
        np.testing.assert_array_equal(params["layer_0"]["moe"]["router_shared_gate"],
                                      f32["model.layers.0.mlp.shared_expert_gate.weight"].T)
        np.testing.assert_array_equal(params["layer_0"]["attn"]["key_bias"],
                                      f32["model.layers.0.self_attn.k_proj.bias"])
    if cfg["model_type"] in ("qwen3_moe", "olmoe"):
        assert mc.qk_norm == {"qwen3_moe": "head", "olmoe": "projection"}[cfg["model_type"]]
        assert mc.clip_qkv == cfg.get("clip_qkv", 0.0)
        assert mc.mlp_kinds == (("dense", "moe") if cfg["model_type"] == "qwen3_moe" else ("moe",))
        np.testing.assert_array_equal(params["layer_1"]["attn"]["key_norm"]["scale"],
                                      f32["model.layers.1.self_attn.k_norm.weight"])
        np.testing.assert_array_equal(params["layer_1"]["moe"]["experts"]["wi_up"][2],
                                      f32["model.layers.1.mlp.experts.2.up_proj.weight"].T)
    if cfg["model_type"] == "gpt_oss":
        assert (mc.layer_types, mc.sliding_window) == (("sliding_attention", "full_attention"), 4)
        assert mc.attention_sinks and mc.out_bias and mc.qkv_bias
        ex, up = params["layer_1"]["moe"]["experts"], f32["model.layers.1.mlp.experts.gate_up_proj"]
        np.testing.assert_array_equal(ex["wi_gate"], up[:, :, 0::2])
        np.testing.assert_array_equal(ex["wi_up"], up[:, :, 1::2])
        np.testing.assert_array_equal(
            ex["wi_up_bias"], f32["model.layers.1.mlp.experts.gate_up_proj_bias"][:, 1::2])
        np.testing.assert_array_equal(ex["wo"], f32["model.layers.1.mlp.experts.down_proj"])
        np.testing.assert_array_equal(params["layer_0"]["moe"]["router_kernel"],
                                      f32["model.layers.0.mlp.router.weight"].T)
        np.testing.assert_array_equal(params["layer_0"]["attn"]["sinks"],
                                      f32["model.layers.0.self_attn.sinks"])
    gin.clear_config()
    dt = {ml_dtypes.bfloat16: "bfloat16", np.float16: "float16", np.float32: "float32"}[dtype]
    assert cli.main(["export-hf", f"--workdir={w}", f"--out={out}", f"--dtype={dt}"]) == 0
    files = [n for n in os.listdir(out) if n.endswith(".safetensors")]
    back = {}
    for n in files:
        back.update(load_file(os.path.join(out, n)))
    assert sorted(back) == sorted(tensors)
    for k in tensors:
        assert back[k].dtype == tensors[k].dtype and back[k].shape == tensors[k].shape, k
        np.testing.assert_array_equal(back[k].view(np.uint8), tensors[k].view(np.uint8), err_msg=k)
    exported = json.load(open(os.path.join(out, "config.json")))
    assert exported["model_type"] == cfg["model_type"]
    for key in ("vocab_size", "hidden_size", "num_key_value_heads", "rms_norm_eps",
                "bos_token_id"):
        assert exported[key] == cfg[key], key


def test_scanned_layers_import_and_export_bit_exact(tmp_path):
    """An import (stored per layer) starts a model with scanned layers (stacked on start), and
    export-hf of the scanned model unstacks it again: the same HF tensors, bit for bit."""
    from sparsejax.models.layer_stack import stack_layers
    src, w, out = tmp_path / "src", str(tmp_path / "w"), str(tmp_path / "out")
    tensors = write_checkpoint(src, dict(MIXTRAL, num_hidden_layers=4), np.float32)
    assert import_cli(src, w) == 0
    _, per_layer = imported_params(w)
    parse_workdir_config(w, [], ["ModelConfig.scan_layers=True", "make_mesh.num_devices=1"])
    from sparsejax.train.build import build_run
    from sparsejax.train.trainer import TrainConfig
    run = build_run(TrainConfig())
    stacked = restore_pretrained(w, run.abstract_model_params)
    assert stacked["layers"]["block_0"]["moe"]["experts"]["wo"].shape[:2] == (4, 4)
    want = stack_layers(jax.device_get(per_layer), 1)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(jax.device_get(stacked))):
        np.testing.assert_array_equal(a, b)
    gin.clear_config()
    assert cli.main(["export-hf", f"--workdir={w}", f"--out={out}",
                     "--gin.ModelConfig.scan_layers=True"]) == 0
    back = load_file(os.path.join(out, "model.safetensors"))
    assert sorted(back) == sorted(tensors)
    for k in tensors:
        np.testing.assert_array_equal(back[k], tensors[k], err_msg=k)


def test_sharded_loading_reads_only_each_devices_slices(tmp_path):
    """fsdp=4 x tensor=2 on 8 devices: the host memory allocated while loading a ~33 MB
    checkpoint, beyond the device buffers themselves (on CPU devices they live in host memory
    and may alias the numpy slices), stays around one device slice, far below the checkpoint
    size (tracemalloc sees numpy buffers: checked on a full read)."""
    cfg = dict(LLAMA, vocab_size=8192, hidden_size=256, intermediate_size=1024,
               num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=32)
    src = tmp_path / "big"
    write_checkpoint(src, cfg, np.float32, shards=2)
    size = sum(os.path.getsize(src / n) for n in os.listdir(src) if n.endswith(".safetensors"))
    assert size > 30e6
    w = str(tmp_path / "w")
    from sparsejax.config import parse_gin
    from sparsejax.interop import mapping
    from sparsejax.interop.families import from_hf_config
    from sparsejax.interop.import_hf import load_params, render_gin
    from sparsejax.interop.safetensors_io import SafetensorsCheckpoint
    os.makedirs(w)
    with open(os.path.join(w, "c.gin"), "w") as f:
        f.write(render_gin(from_hf_config(cfg)))
    parse_gin([os.path.join(w, "c.gin")], ["make_mesh.fsdp=4", "make_mesh.tensor=2",
                                           "make_mesh.data=1"])
    mc, mesh = ModelConfig(), make_mesh()
    shapes, sh = abstract_params(mc, mesh)
    sources = mapping.plan({k: v.shape for k, v in shapes.items()}, "llama", mc.vocab_size)
    ckpt = SafetensorsCheckpoint(str(src))
    tracemalloc.start()
    full = ckpt.read("model.embed_tokens.weight")  # the instrument sees a full read
    _, control = tracemalloc.get_traced_memory()
    del full
    tracemalloc.reset_peak()
    with jax.set_mesh(mesh):
        params = load_params(ckpt, sources, shapes, sh)
        jax.block_until_ready(params)
    resident, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"checkpoint {size / 1e6:.1f} MB; loading: peak {peak / 1e6:.2f} MB traced, "
          f"{resident / 1e6:.2f} MB still referenced (CPU devices may alias host buffers)")
    assert control >= 8192 * 256 * 4
    # transient host memory beyond what the (CPU) devices keep: about one slice
    assert peak < size / 5 and peak - resident < size / 8, (peak, resident, size)
    emb = params["embed/embedding"]
    assert len({str(s.index) for s in emb.addressable_shards}) == 8  # truly sharded 8 ways
    np.testing.assert_array_equal(np.asarray(emb)[:8192],
                                  ckpt.read("model.embed_tokens.weight"))


def _err(capsys):
    return capsys.readouterr().err.strip()


def test_bad_input_one_line_errors(tmp_path, capsys):
    src = tmp_path / "src"
    tensors = write_checkpoint(src, LLAMA)
    cases = []
    # unknown family
    d = tmp_path / "fam"
    write_checkpoint(d, dict(LLAMA, model_type="gpt2"), tensors=tensors)
    cases.append((d, "model_type='gpt2'"))
    d = tmp_path / "mla"  # an option of another family
    write_checkpoint(d, dict(LLAMA, q_lora_rank=8), tensors=tensors)
    cases.append((d, "q_lora_rank=8 is not supported for llama"))
    # missing / unexpected tensor, shape mismatch
    d = tmp_path / "missing"
    write_checkpoint(d, LLAMA, tensors={k: v for k, v in tensors.items()
                                        if k != "model.layers.1.mlp.up_proj.weight"})
    cases.append((d, "missing tensors ['model.layers.1.mlp.up_proj.weight']"))
    d = tmp_path / "extra"
    write_checkpoint(d, LLAMA, tensors={**tensors, "model.layers.0.self_attn.q_proj.bias":
                                        np.zeros(32, np.float32)})
    cases.append((d, "unexpected tensors ['model.layers.0.self_attn.q_proj.bias']"))
    d = tmp_path / "shape"
    write_checkpoint(d, dict(LLAMA, intermediate_size=40), tensors=tensors)
    cases.append((d, "tensor model.layers.0.mlp.gate_proj.weight has shape [48, 32] but "
                     "config.json implies [40, 32]"))
    d = tmp_path / "dtype"
    write_checkpoint(d, LLAMA, tensors={**tensors, "model.norm.weight":
                                        np.ones(32, np.int32)})
    cases.append((d, "dtype I32"))
    d = tmp_path / "rope"
    write_checkpoint(d, dict(LLAMA, rope_scaling={"type": "longrope", "factor": 2.0}),
                     tensors=tensors)
    cases.append((d, "rope type 'longrope'"))
    # options of the new families that sparsejax does not compute
    for name, cfg, needle in [
            ("olmoe_heads", dict(OLMOE, head_dim=16), "head_dim=16, hidden_size=32"),
            ("olmoe_window", dict(OLMOE, sliding_window=8), "sliding_window=8"),
            ("olmoe_clip", dict(OLMOE, clip_qkv=0), "clip_qkv=0"),
            ("qwen3_bias", dict(QWEN3_MOE, model_type="qwen3", attention_bias=True),
             "attention_bias=true"),
            ("gptq", dict(LLAMA, quantization_config={"quant_method": "gptq", "bits": 4}),
             "quant_method='gptq' is not supported"),
            ("gpt_oss_types", dict(GPT_OSS, layer_types=["sliding_attention"]),
             "layer_types=['sliding_attention'] must list")]:
        d = tmp_path / name
        write_checkpoint(d, cfg, tensors=tensors)
        cases.append((d, needle))
    cases.append((tmp_path / "nothing", "has no config.json"))
    for i, (d, needle) in enumerate(cases):
        assert import_cli(d, str(tmp_path / f"w{i}")) == 2, needle
        err = _err(capsys)
        assert needle in err and "\n" not in err, (needle, err)
    # a workdir that holds a different model
    w = str(tmp_path / "w_ok")
    assert import_cli(src, w) == 0
    capsys.readouterr()
    other = tmp_path / "other"
    write_checkpoint(other, dict(LLAMA, num_hidden_layers=1),
                     tensors={k: v for k, v in tensors.items() if "layers.1." not in k})
    assert import_cli(other, w) == 2
    assert "already holds a different imported model" in _err(capsys)
    # export of a workdir without checkpoint
    gin.clear_config()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.gin").write_text("ModelConfig.num_layers = 1\n")
    assert cli.main(["export-hf", f"--workdir={empty}", f"--out={tmp_path / 'o'}"]) == 2
    assert "holds no run or imported model" in _err(capsys)
