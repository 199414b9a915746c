"""Decode throughput of `sample` (KV cache) against full recomputation without a cache, at
batch 1 and 8 on the base config (random params), and against `transformers.generate` on the
same tiny imported model when transformers is installed; and import throughput (safetensors
-> sharded arrays) against reading the same files raw. All ratios come from this one run.

    python benchmarks/decode.py [--gin_file base.gin] [--prompt_len 64] [--new_tokens 64]

Last line: a JSON object with every figure and the device.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import flax.linen as nn
import jax
import numpy as np

from sparsejax import config
from sparsejax.infer.generate import generate
from sparsejax.models.transformer import ModelConfig, Transformer


def decode_rates(model, params, batch: int, prompt_len: int, new: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, model.config.vocab_size, (batch, prompt_len)).tolist()
    out = {}
    for name, cache in (("cache", True), ("recompute", False)):
        # generate() compiles first and times the compiled run alone
        out[name] = generate(model, params, prompts, max_new_tokens=new,
                             use_cache=cache)["tokens_per_s"]
    return out


def transformers_rate(tmp: str, new: int) -> dict[str, float] | None:
    """tokens/s of transformers.generate vs our cached decode on one tiny imported Llama."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    from sparsejax import cli
    from sparsejax.train.commands import parse_workdir_config
    from sparsejax.train.trainer import load_state_for_eval, TrainConfig
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                                   num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    src, w = os.path.join(tmp, "hf"), os.path.join(tmp, "w")
    hf.save_pretrained(src)
    assert cli.main(["import-hf", f"--src={src}", f"--workdir={w}"]) == 0
    parse_workdir_config(w, [], [])
    run, _, state = load_state_for_eval(w, TrainConfig())
    prompt = np.random.default_rng(0).integers(0, 512, (1, 32))
    with torch.no_grad():
        hf.generate(torch.from_numpy(prompt), max_new_tokens=4, do_sample=False)
        t = time.perf_counter()
        hf.generate(torch.from_numpy(prompt), max_new_tokens=new, do_sample=False,
                    min_new_tokens=new)
        hf_s = time.perf_counter() - t
    ours = generate(run.model, state.params, prompt.tolist(), max_new_tokens=new)
    return {"transformers_tokens_per_s": new / hf_s, "ours_tokens_per_s": ours["tokens_per_s"],
            "ours_vs_transformers": ours["tokens_per_s"] * hf_s / new}


def import_rate(tmp: str) -> dict[str, float]:
    """MB/s of import-hf's loader against reading every tensor of the same files raw."""
    from safetensors import safe_open
    from safetensors.numpy import save_file
    from sparsejax.interop import mapping
    from sparsejax.interop.families import from_hf_config
    from sparsejax.interop.import_hf import abstract_params, load_params, render_gin
    from sparsejax.interop.safetensors_io import SafetensorsCheckpoint
    from sparsejax.parallel.mesh import make_mesh
    hf_cfg = dict(model_type="llama", vocab_size=16384, hidden_size=512, intermediate_size=1536,
                  num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                  max_position_embeddings=512)
    d, f, v = 512, 1536, 16384
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,),
              "lm_head.weight": (v, d)}
    for i in range(4):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,),
                       p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.q_proj.weight": (d, d),
                       p + "self_attn.k_proj.weight": (d // 2, d),
                       p + "self_attn.v_proj.weight": (d // 2, d),
                       p + "self_attn.o_proj.weight": (d, d), p + "mlp.gate_proj.weight": (f, d),
                       p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f)})
    src = os.path.join(tmp, "imp")
    os.makedirs(src)
    rng = np.random.default_rng(0)
    save_file({k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()},
              os.path.join(src, "model.safetensors"))
    size = os.path.getsize(os.path.join(src, "model.safetensors"))
    t = time.perf_counter()
    with safe_open(os.path.join(src, "model.safetensors"), "np") as fh:
        for k in fh.keys():
            fh.get_tensor(k)
    raw_s = time.perf_counter() - t
    gin_path = os.path.join(tmp, "imp.gin")
    with open(gin_path, "w") as fh:
        fh.write(render_gin(from_hf_config(hf_cfg)))
    config.parse_gin([gin_path], [])
    mc, mesh = ModelConfig(), make_mesh()
    ab, sh = abstract_params(mc, mesh)
    sources = mapping.plan({k: x.shape for k, x in ab.items()}, "llama", mc.vocab_size)
    t = time.perf_counter()
    with jax.set_mesh(mesh):
        jax.block_until_ready(load_params(SafetensorsCheckpoint(src), sources, ab, sh))
    load_s = time.perf_counter() - t
    return {"checkpoint_mb": size / 1e6, "raw_read_mb_per_s": size / 1e6 / raw_s,
            "import_mb_per_s": size / 1e6 / load_s, "import_vs_raw": raw_s / load_s,
            "import_devices": len(mesh.devices.flat)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gin_file", default="base.gin")
    ap.add_argument("--prompt_len", type=int, default=64)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--gin", action="append", default=[], help="extra gin bindings A.b=V")
    args = ap.parse_args()
    config.parse_gin([args.gin_file], args.gin)
    cfg = ModelConfig()
    model = Transformer(cfg)
    params = nn.meta.unbox(model.init(jax.random.key(0), np.zeros((1, 8), np.int32)))["params"]
    result = {"device": jax.devices()[0].device_kind, "config": args.gin_file,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
    for batch in (1, 8):
        r = decode_rates(model, params, batch, args.prompt_len, args.new_tokens)
        result[f"batch{batch}"] = {"cache_tokens_per_s": r["cache"],
                                   "recompute_tokens_per_s": r["recompute"],
                                   "cache_vs_recompute": r["cache"] / r["recompute"]}
        print(f"batch {batch}: cache {r['cache']:.0f} tok/s, recompute {r['recompute']:.0f} "
              f"tok/s, ratio {r['cache'] / r['recompute']:.2f}x", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        result["import"] = import_rate(tmp)
        print(f"import: {result['import']['import_mb_per_s']:.0f} MB/s vs raw read "
              f"{result['import']['raw_read_mb_per_s']:.0f} MB/s", flush=True)
        hf = transformers_rate(tmp, args.new_tokens)
        if hf is not None:
            result["transformers"] = hf
            print(f"tiny Llama: ours {hf['ours_tokens_per_s']:.0f} tok/s, transformers.generate "
                  f"{hf['transformers_tokens_per_s']:.0f} tok/s", flush=True)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
