"""Decode-step time of activation-sparse inference against dense decode, in one run.

1. One gated MLP decode step (batch 1, random weights, embed x mlp = --embed x --mlp) at
   0/50/70/90% activation sparsity, against the dense step of the same MLP:
   * `input`  (TEAL-style): the inputs of gate/up and the intermediate entering down
     thresholded at that sparsity; every projection reads only the kept weight rows.
   * `neuron` (CATS / ReLU-style): the gate computed densely, then up and down only for the
     active neurons (at most 3x: the gate stays dense).
   The thresholds are the exact quantiles of this step's own scores, so the sparsity is the
   stated one; the masked dense step (same thresholds, dense matmuls) is timed too.
2. Whole-model decode (`generate` with a KV cache, batch 1, --layers layers of that MLP and
   full attention) under TEAL at 0/50/70/90% on every projection, thresholds calibrated on
   random token rows, against dense decode of the same model, with the sparse decode path
   as `sparsejax sample` configures it (sites kept dense above SparseDecode.max_density),
   with every site gathered (timed only where that is another program), and with the same
   thresholds computed densely. Two figures per model: the decode step (time per output
   token: a generation of --new_tokens tokens less one of a single token, which is only the
   prompt's prefill, over the --new_tokens - 1 steps between them), and end-to-end tokens/s
   of the whole generation, prefill included (prefill runs densely: it has more rows than
   SparseDecode.max_rows).

3. One projection of each of that model's weight shapes (q; k and v; o; gate and up; down)
   at 50% input sparsity (random rows), against its dense product, over enough copies of the
   weight that they do not fit in cache (--stream_mb in all): time and the rate at which each
   reads its weights. Narrow weights have short rows, and every scattered row starts a new
   memory stream, so they gain least.

Cases are timed in turns (every case once per round, medians over rounds), so a shared
machine's changing load falls on all of them alike.

    python benchmarks/activation_sparsity.py [--embed 1024 --mlp 4096 --layers 4]

Prints one line per measurement and, last, a JSON object with every figure, each ratio
(dense time / sparse time, > 1: faster) and the device.
"""
from __future__ import annotations

import argparse
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.models.layers import GatedMlp
from sparsejax.models.thresholds import THRESHOLDS, Site
from timing import timed_together

SPARSITIES = (0.0, 0.5, 0.7, 0.9)
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


def quantile_site(values: np.ndarray, s: float, width: int) -> Site:
    """A site keeping the entries of `values` above their s-quantile (|values|), with as many
    decode slots as entries kept (plus one)."""
    t = float(np.quantile(np.abs(values), s)) if s > 0 else 0.0
    keep = int(np.sum(np.abs(values) > t))
    return Site(jnp.float32(t), jnp.ones((width,), jnp.float32), min(width, keep + 1), 1)


def attention_heads(embed: int) -> tuple[int, int]:
    """(query heads, kv heads) of the benchmark model: head_dim 64, half as many kv heads."""
    heads = max(1, embed // 64)
    return heads, max(1, heads // 2)


def mlp_bench(embed: int, mlp_dim: int, reps: int) -> dict:
    mod = GatedMlp(embed, mlp_dim, activation="relu")
    x = jax.random.normal(jax.random.key(1), (1, 1, embed))
    params = nn.meta.unbox(mod.init(jax.random.key(0), x))["params"]
    step = jax.jit(lambda v, x: mod.apply(v, x, decode=True))
    t = np.asarray(x).reshape(-1)
    g = t @ np.asarray(params["wi_gate"]["kernel"])
    up_t = {"wi_up_t": jnp.asarray(params["wi_up"]["kernel"]).T.copy()}
    cases = {"dense": (step, ({"params": params}, x))}
    achieved = {}
    for s in SPARSITIES:
        xin = quantile_site(t, s, embed)
        t_kept = np.where(np.abs(t) > float(xin.threshold), t, 0)
        h_in = np.maximum(t_kept @ np.asarray(params["wi_gate"]["kernel"]), 0) * (
            t_kept @ np.asarray(params["wi_up"]["kernel"]))
        # (neuron: a ReLU gate is about half zeros already, so below ~50% it stays there)
        trees = {"input": {"wi_gate_in": xin, "wi_up_in": xin,
                           "wo_in": quantile_site(h_in, s, mlp_dim)},
                 "neuron": {"gate_act": quantile_site(np.maximum(g, 0), s, mlp_dim)}}
        for kind, tree in trees.items():
            key = f"mlp_{kind}_{int(s * 100)}"
            extra = {"decode_weights": up_t} if kind == "neuron" else {}
            achieved[key] = float(np.mean([1 - (v.capacity - 1) / v.scale.shape[0]
                                           for v in tree.values()]))
            masked = {k: Site(v.threshold, v.scale) for k, v in tree.items()}
            cases[key] = (step, ({"params": params, THRESHOLDS: tree, **extra}, x))
            cases[key + "_masked_dense"] = (step, ({"params": params, THRESHOLDS: masked}, x))
    times = timed_together(cases, reps)
    dense = times["dense"]
    out = {"mlp_dense_ms": dense * 1e3}
    print(f"MLP {embed}x{mlp_dim} dense decode step (batch 1): {dense * 1e3:.3f} ms", flush=True)
    for key, a in achieved.items():
        sp, md = times[key], times[key + "_masked_dense"]
        out.update({key + "_ms": sp * 1e3, key + "_masked_dense_ms": md * 1e3,
                    key + "_speedup": dense / sp, key + "_achieved_sparsity": a})
        kind, pct = key.split("_")[1:]
        print(f"  {kind:>6} {pct:>2}% (achieved {a:.1%}): {sp * 1e3:.3f} ms = {dense / sp:.2f}x "
              f"dense (same thresholds, dense matmuls: {md * 1e3:.3f} ms)", flush=True)
    return out


def model_bench(embed: int, mlp_dim: int, layers: int, prompt: int, new: int, reps: int,
                projections: tuple[str, ...] = PROJECTIONS) -> dict:
    from sparsejax.infer.generate import make_generate_fn, pad_prompts
    from sparsejax.infer.sparse_decode import SparseDecode, decode_summary, with_capacities
    from sparsejax.models.transformer import ModelConfig, Transformer
    from sparsejax.sparsity.activation.calibrate import WithVariables
    from sparsejax.sparsity.activation.thresholding import make_sites, site_layout
    from sparsejax.models.thresholds import HISTOGRAMS
    heads, kv_heads = attention_heads(embed)
    cfg = ModelConfig(vocab_size=512, num_layers=layers, embed_dim=embed, num_heads=heads,
                      num_kv_heads=kv_heads, head_dim=64, mlp_dim=mlp_dim,
                      max_seq_len=max(64, prompt + new + 8), mlp_activation="silu",
                      scale_embeddings=False)
    model = Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(2), (4, 64), 0, 512)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), tokens[:1, :8]))["params"]
    layout = site_layout(jax.device_get(params), cfg, "teal", projections)
    calib_sites = make_sites(layout, 0.0, None)
    _, mut = jax.jit(lambda p, s, t: model.apply({"params": p, THRESHOLDS: s}, t,
                                                 mutable=[HISTOGRAMS]))(params, calib_sites, tokens)
    hists = {}
    for layer, mods in mut[HISTOGRAMS].items():
        for mod, named in mods.items():
            for name, v in named.items():
                hists[f"{layer}/{mod}/{name}"] = np.asarray(v[0])
    prompts = np.random.default_rng(0).integers(0, 512, (1, prompt)).tolist()
    models = {"dense": model}
    for target in SPARSITIES:
        sites = make_sites(layout, target, hists)
        pct = int(target * 100)
        defaults = with_capacities(sites, hists, SparseDecode(max_rows=1))  # as `sample`
        gathered = with_capacities(sites, hists, SparseDecode(max_rows=1, max_density=1.0))
        models[f"teal{pct}"] = WithVariables(model, {THRESHOLDS: defaults})
        if decode_summary(gathered) != decode_summary(defaults):  # else the same program
            models[f"teal{pct}_all_gathered"] = WithVariables(model, {THRESHOLDS: gathered})
        models[f"teal{pct}_masked_dense"] = WithVariables(model, {THRESHOLDS: sites})
    toks, pos, segs = (jnp.asarray(a) for a in pad_prompts(prompts, 0))
    args = (params, None, toks, pos, segs, jax.random.key(0))
    cases = {}
    for k, m in models.items():  # per model: the whole generation, and its prefill alone
        for suffix, n in (("", new), ("@prefill", 1)):
            cases[k + suffix] = (make_generate_fn(m, n, 0.0, 0, 1.0).lower(*args).compile(), args)
    t = timed_together(cases, reps)
    step = {k: (t[k] - t[k + "@prefill"]) / (new - 1) for k in models}
    unresolved = sorted(k for k, v in step.items() if v <= 0)
    if unresolved:
        print(f"WARNING: decode steps not resolved for {unresolved}: the {new - 1} extra steps "
              f"took no longer than timing noise; raise --new_tokens", flush=True)
    out = {"model_dense_decode_step_ms": step["dense"] * 1e3,
           "model_dense_tokens_per_s": new / t["dense"]}
    print(f"model ({layers} layers, embed {embed}, mlp {mlp_dim}, full attention) at batch 1, "
          f"dense: decode step {step['dense'] * 1e3:.2f} ms, {new / t['dense']:.1f} tok/s end to "
          f"end ({new} tokens after a {prompt}-token prompt, prefill included)", flush=True)
    for k in models:
        if k == "dense":
            continue
        out.update({f"model_{k}_decode_step_ms": step[k] * 1e3,
                    f"model_{k}_decode_speedup": step["dense"] / step[k],
                    f"model_{k}_tokens_per_s": new / t[k],
                    f"model_{k}_speedup": t["dense"] / t[k]})
    for target in SPARSITIES:
        pct = int(target * 100)
        k = f"teal{pct}"
        ratio = lambda name: f"{step['dense'] / step[name]:.2f}x"
        all_note = (f"every site gathered {ratio(k + '_all_gathered')}"
                    if k + "_all_gathered" in step else "every site already gathered")
        print(f"  TEAL {pct}% on every projection: decode step {step[k] * 1e3:.2f} ms = "
              f"{ratio(k)} dense with SparseDecode's defaults (max_density "
              f"{SparseDecode().max_density}; end to end {t['dense'] / t[k]:.2f}x); {all_note}; "
              f"same thresholds, dense matmuls {ratio(k + '_masked_dense')}", flush=True)
    return out


def rows_bench(embed: int, mlp_dim: int, reps: int, stream_mb: float) -> dict:
    from pallas_kernels.gather_matmul import gather_matmul
    heads, kv_heads = attention_heads(embed)
    shapes = {"q": (embed, heads * 64), "k_v": (embed, kv_heads * 64),
              "o": (heads * 64, embed), "gate_up": (embed, mlp_dim), "down": (mlp_dim, embed)}
    rng = np.random.default_rng(0)
    cases, meta = {}, {}
    for name, (k, n) in shapes.items():
        copies = max(1, -(-int(stream_mb * 2**20) // (k * n * 4)))
        ws = [jax.random.normal(jax.random.key(i), (k, n)) for i in range(copies)]
        x = jax.random.normal(jax.random.key(copies), (1, k))
        kept = np.sort(rng.choice(k, k // 2, replace=False)).astype(np.int32)
        idx, count = jnp.asarray(np.pad(kept, (0, k // 8))), jnp.int32(k // 2)  # 25% headroom
        cases[name + "_dense"] = (jax.jit(lambda x, ws: [x @ w for w in ws]), (x, ws))
        cases[name] = (jax.jit(lambda x, i, c, ws: [gather_matmul(x, w, i, c) for w in ws]),
                       (x, idx, count, ws))
        meta[name] = (copies, k * n * 4)
    t = timed_together(cases, reps)
    out = {}
    print(f"one projection per weight shape at 50% input sparsity (random rows), weights "
          f"streamed from memory ({stream_mb:g} MB of copies per shape):", flush=True)
    for name, (copies, nbytes) in meta.items():
        dense, sparse = t[name + "_dense"] / copies, t[name] / copies
        k, n = shapes[name]
        out.update({f"rows_{name}_dense_us": dense * 1e6, f"rows_{name}_us": sparse * 1e6,
                    f"rows_{name}_speedup": dense / sparse,
                    f"rows_{name}_dense_gb_per_s": nbytes / dense / 1e9,
                    f"rows_{name}_gb_per_s": nbytes / 2 / sparse / 1e9})
        print(f"  {name:>7} [{k}, {n}] ({n * 4 // 1024} KB rows): {sparse * 1e6:.0f} us = "
              f"{dense / sparse:.2f}x dense; reads at {nbytes / 2 / sparse / 1e9:.1f} GB/s "
              f"(dense {nbytes / dense / 1e9:.1f} GB/s)", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--embed", type=int, default=1024)
    p.add_argument("--mlp", type=int, default=4096)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=30, help="timed rounds of the MLP steps")
    p.add_argument("--model_reps", type=int, default=11, help="timed rounds of generation")
    p.add_argument("--stream_mb", type=float, default=96,
                   help="MB of weight copies per shape in part 3 (more than the caches)")
    args = p.parse_args(argv)
    if args.new_tokens < 2:
        p.error(f"--new_tokens={args.new_tokens} must be >= 2 (decode steps are timed as a "
                f"generation of --new_tokens less one of a single token)")
    dev = jax.devices()[0]
    out = {"device": f"{dev.platform}: {dev.device_kind}", "embed": args.embed, "mlp": args.mlp}
    print(f"device: {out['device']}", flush=True)
    out.update(mlp_bench(args.embed, args.mlp, args.reps))
    out.update(model_bench(args.embed, args.mlp, args.layers, args.prompt, args.new_tokens,
                           args.model_reps))
    out.update(rows_bench(args.embed, args.mlp, args.reps, args.stream_mb))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
