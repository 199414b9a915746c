"""Long-context sparse attention speed: prefill with the dynamic prefill methods against dense
attention, and a decode step at a long cache with Quest and streaming heads against dense.

    python benchmarks/long_context.py                       # 4K, 8K, 16K, 32K prefill; 32K decode
    python benchmarks/long_context.py --lengths 4096 --decode_cache 8192 --reps 2   # quick

**Prefill** (one attention layer of `configs/long_context.gin`'s shape: 4 query heads, 2 KV
heads, head_dim 32; batch 1; random q, k, v): per length, the model's dense attention
(`jax.nn.dot_product_attention`, causal; above `--dense_max` tokens its logits do not fit in
memory here, so it runs 2048 queries at a time: `dense_chunked`, the same work), causal
attention on the block-sparse op (up to `--causal_max` tokens) and each method end to end (pattern estimation included),
with the estimation alone timed apart. MInference's vertical-slash selection also runs at
token granularity (`minference_token`: each query over exactly its columns and offsets,
uncapped) against its covering tiles, uncapped (`minference_tiles_uncapped`). On random inputs every head's attention is flat, so
the threshold rules would keep nearly every tile: each method runs under a static budget
of `--budget` of the causal tiles (`max_blocks`), the compute a method has at that
sparsity. The achieved density is printed with each row.

**Decode** (the whole decode step a user runs: `configs/long_context.gin`'s model, batch 1,
one token over a cache of `--decode_cache` slots filled with random keys and values):
dense, Quest (pages of 16, `--quest_pages` pages per head), and streaming heads (half of
each layer's KV heads keep 4 sink + 64 recent tokens).

Every ratio divides times measured in the same run, in turns (benchmarks/timing.py). The
last line is JSON: {"device", "prefill": {length: {case: seconds, ...}}, "decode": {...},
"ratios": ...}.
"""
from __future__ import annotations

import argparse
import json

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse_attention import CausalMask, block_sparse_attention, make_mask
from pallas_kernels.block_sparse_attention.minference import vertical_slash_indices
from pallas_kernels.block_sparse_attention.vertical_slash import vertical_slash_attention
from sparsejax.infer.cache import init_cache
from sparsejax.models.transformer import ModelConfig, Transformer
from timing import timed_together

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 4, 2, 32, 64
MODEL = dict(vocab_size=259, num_layers=4, embed_dim=128, num_heads=4, num_kv_heads=2,
             head_dim=32, mlp_dim=512)
METHODS = {"xattention": dict(kind="xattention", threshold=0.9, stride=8),
           "flexprefill": dict(kind="flexprefill", gamma=0.9, tau=0.1),
           "minference": dict(kind="minference", vertical_size=512, slash_size=1024)}


def chunked_causal_attention(q, k, v, chunk: int = 2048):
    """Exact causal attention, `chunk` queries at a time against every key: the dense
    baseline where the whole logits matrix does not fit in memory."""
    s = q.shape[1]
    chunk = min(chunk, s)

    def one(start):
        qc = jax.lax.dynamic_slice_in_dim(q, start, chunk, axis=1)
        vis = (jnp.arange(s)[None, :] <= (start + jnp.arange(chunk))[:, None])[None, None]
        return jax.nn.dot_product_attention(qc, k, v, mask=vis)

    out = jax.lax.map(one, jnp.arange(0, s, chunk))  # [chunks, b, chunk, h, d]
    return jnp.moveaxis(out, 0, 1).reshape(q.shape)


def prefill_cases(length: int, budget: float, dense_max: int, causal_max: int,
                  seed: int = 0):
    """Timed cases and the methods' achieved densities at one length."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((1, length, HEADS, HEAD_DIM)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((1, length, KV_HEADS, HEAD_DIM)), jnp.float32)
            for _ in range(2))
    qb = length // BLOCK
    cap = max(3, int(round(budget * qb)))
    cases, density = {}, {}
    if length <= dense_max:
        cases["dense"] = (jax.jit(lambda a, b, c: jax.nn.dot_product_attention(
            a, b, c, is_causal=True)), (q, k, v))
    else:
        cases["dense_chunked"] = (jax.jit(chunked_causal_attention), (q, k, v))
    if length <= causal_max:
        cases["causal_block_sparse"] = (jax.jit(lambda a, b, c: block_sparse_attention(
            a, b, c, CausalMask(), block_q=BLOCK, block_k=BLOCK)), (q, k, v))
    causal_tiles = qb * (qb + 1) / 2
    for name, spec in METHODS.items():
        mask = make_mask(max_blocks=cap, **spec)
        cases[name] = (jax.jit(lambda a, b, c, m=mask: block_sparse_attention(
            a, b, c, m, block_q=BLOCK, block_k=BLOCK)), (q, k, v))
        est = jax.jit(lambda a, b, m=mask: m.block_layout_dynamic(a, b, BLOCK, BLOCK))
        cases[f"{name}_estimate"] = (est, (q, k))
        density[name] = float(np.asarray(est(q, k)).sum() / (HEADS * causal_tiles))
    token = make_mask(**METHODS["minference"])  # the same selection, at token granularity
    if length <= causal_max:  # as much memory as causal attention on the op
        cases["minference_tiles_uncapped"] = (jax.jit(lambda a, b, c: block_sparse_attention(
            a, b, c, token, block_q=BLOCK, block_k=BLOCK)), (q, k, v))

    def by_token(a, b, c):
        cols, offs, _, _ = vertical_slash_indices(a, b, length, token)
        return vertical_slash_attention(a, b, c, cols, offs)
    cases["minference_token"] = (jax.jit(by_token), (q, k, v))
    return cases, density


def filled_cache(cache, length: int, seed: int = 0):
    """`cache` with every slot but the last filled: random keys/values, positions in order,
    page bounds from the keys, and the next free slot at `length - 1`."""
    rng = np.random.default_rng(seed)

    def fill(path, x):
        name = jax.tree_util.keystr(path[-1:])
        if "index" in name:
            return jnp.asarray(length - 1, x.dtype)
        if "pos" in name or "slot" in name:
            n = x.shape[-1]
            return jnp.broadcast_to(jnp.arange(n, dtype=x.dtype) * (length - 1) // max(n, 1),
                                    x.shape)
        return jnp.asarray(rng.standard_normal(x.shape), x.dtype)
    filled = jax.tree_util.tree_map_with_path(fill, cache)

    def bounds(layer):
        attn = layer["attn"]
        if "page_min" in attn:
            key = attn["cached_key"]
            pages = attn["page_min"].shape[1]
            paged = key.reshape(key.shape[0], pages, -1, *key.shape[2:])
            attn = {**attn, "page_min": paged.min(2), "page_max": paged.max(2)}
        return {"attn": attn}
    return {name: bounds(layer) for name, layer in filled.items()}


def decode_case(bindings: dict, cache_len: int):
    """One jitted decode step of the benchmark model under `bindings` (gin), and its args."""
    gin.clear_config()
    for key, value in bindings.items():
        gin.bind_parameter(key, value)
    cfg = ModelConfig(**MODEL, max_seq_len=cache_len)
    model = Transformer(cfg)
    tok = np.zeros((1, 1), np.int32)
    params = nn.meta.unbox(model.init(jax.random.key(0), tok))["params"]
    cache = filled_cache(init_cache(cfg, 1, cache_len), cache_len)
    pos = np.full((1, 1), cache_len - 1, np.int32)
    step = jax.jit(lambda p, c: model.apply({"params": p, "cache": c}, tok, pos,
                                            np.ones_like(tok), decode=True,
                                            mutable=["cache"])[0])
    jax.block_until_ready(step(params, cache))  # traced under these bindings
    return step, (params, cache)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    p.add_argument("--budget", type=float, default=0.125,
                   help="max_blocks as a fraction of a row's blocks")
    p.add_argument("--dense_max", type=int, default=8192,
                   help="longest prefill for whole-matrix dense attention; above it the dense "
                        "baseline runs 2048 queries at a time (exact, same work)")
    p.add_argument("--causal_max", type=int, default=16384,
                   help="longest prefill for causal attention on the block-sparse op and the "
                        "uncapped covering tiles (their memory grows with the causal triangle)")
    p.add_argument("--decode_cache", type=int, default=32768)
    p.add_argument("--quest_pages", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    device = f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind} x{jax.device_count()}"
    print(f"device {device}", flush=True)
    out = {"device": device, "budget": args.budget, "prefill": {}, "density": {},
           "ratios": {}}
    for n in args.lengths:
        cases, density = prefill_cases(n, args.budget, args.dense_max, args.causal_max)
        times = timed_together(cases, args.reps)
        out["prefill"][n], out["density"][n] = times, density
        dense = times.get("dense", times.get("dense_chunked"))
        base = dense
        ratio = lambda name, m: times[name] / times[m] if name in times else None
        out["ratios"][n] = {m: {"vs_dense": dense / times[m],
                                "vs_causal_block_sparse": ratio("causal_block_sparse", m),
                                "estimate_share": times[f"{m}_estimate"] / times[m]}
                            for m in METHODS}
        print(f"prefill {n}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in times.items())
              + f"; density {json.dumps(density)}; base {base * 1e3:.1f} ms", flush=True)
    half = tuple(tuple(range(KV_HEADS // 2)) for _ in range(MODEL["num_layers"]))
    decode = {"dense": {},
              "quest": {"QuestDecode.budget_pages": args.quest_pages},
              "streaming_heads": {"StreamingHeads.heads": half}}
    cases = {name: decode_case(b, args.decode_cache) for name, b in decode.items()}
    gin.clear_config()
    times = timed_together(cases, max(args.reps, 5))
    out["decode"] = {"cache": args.decode_cache, **times,
                     "quest_vs_dense": times["dense"] / times["quest"],
                     "streaming_vs_dense": times["dense"] / times["streaming_heads"]}
    print(f"decode at {args.decode_cache}: " + ", ".join(f"{k} {v * 1e3:.2f} ms"
                                                         for k, v in times.items()), flush=True)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
