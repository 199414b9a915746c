"""Batched generation: left-padded prompts, one jitted prefill that fills the KV cache, then a
jitted decode loop (one token per step, `lax.fori_loop`). `use_cache=False` recomputes the
whole sequence at every step instead (the reference the cache is tested against, and the
baseline of benchmarks/decode.py)."""
from __future__ import annotations

import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.infer.cache import init_cache
from sparsejax.infer.sampling import check_sampling, sample_logits


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, ...]:
    """Left-padded tokens, positions and segment ids (0 on padding), each [batch, max_len]."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    n = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), n), pad_id, np.int32)
    seg = np.zeros((len(prompts), n), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, n - len(p):] = np.asarray(p, np.int32)
        seg[i, n - len(p):] = 1
    positions = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
    return tokens, positions, seg


def _variables(params: Any, moe_state: Any, cache: Any = None) -> dict:
    v = {"params": params}
    if moe_state:
        v["moe_state"] = moe_state
    if cache is not None:
        v["cache"] = cache
    return v


def make_generate_fn(model: Any, max_new_tokens: int, temperature: float, top_k: int,
                     top_p: float, use_cache: bool = True):
    """fn(params, moe_state, tokens, positions, segs, rng) -> new tokens [batch, N] (jitted)."""
    sample = lambda logits, rng: sample_logits(logits, rng, temperature, top_k, top_p)
    n_new = int(max_new_tokens)

    def with_cache(params, moe_state, tokens, positions, segs, rng):
        b, p = tokens.shape
        cache = init_cache(model.config, b, p + n_new)
        logits, mut = model.apply(_variables(params, moe_state, cache), tokens, positions, segs,
                                  decode=True, mutable=["cache"])
        first = sample(logits[:, -1], jax.random.fold_in(rng, 0))
        out = jnp.zeros((b, n_new), jnp.int32).at[:, 0].set(first)
        last_pos = positions[:, -1]

        def body(i, carry):
            cache, out = carry
            tok = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)  # [b, 1]
            pos = (last_pos + i)[:, None]
            logits, mut = model.apply(_variables(params, moe_state, cache), tok, pos,
                                      jnp.ones_like(tok), decode=True, mutable=["cache"])
            nxt = sample(logits[:, -1], jax.random.fold_in(rng, i))
            return mut["cache"], out.at[:, i].set(nxt)

        _, out = jax.lax.fori_loop(1, n_new, body, (mut["cache"], out))
        return out

    def recompute(params, moe_state, tokens, positions, segs, rng):
        b, p = tokens.shape
        buf = jnp.concatenate([tokens, jnp.zeros((b, n_new), jnp.int32)], axis=1)
        pos = jnp.concatenate([positions, positions[:, -1:] + 1 + jnp.arange(n_new)[None]], 1)
        seg = jnp.concatenate([segs, jnp.ones((b, n_new), jnp.int32)], axis=1)

        def body(i, buf):
            logits = model.apply(_variables(params, moe_state), buf, pos, seg)
            step_logits = jax.lax.dynamic_slice_in_dim(logits, p + i - 1, 1, axis=1)[:, 0]
            nxt = sample(step_logits, jax.random.fold_in(rng, i))
            return jax.lax.dynamic_update_slice_in_dim(buf, nxt[:, None], p + i, axis=1)

        return jax.lax.fori_loop(0, n_new, body, buf)[:, p:]

    return jax.jit(with_cache if use_cache else recompute)


def generate(model: Any, params: Any, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, pad_id: int = 0, eos_id: int | None = None,
             moe_state: Any = None, use_cache: bool = True) -> dict[str, Any]:
    """Generates `max_new_tokens` after each prompt (token id lists). Returns {'tokens': list
    of id lists (cut after eos), 'tokens_per_s', 'seconds', 'compile_seconds'}."""
    check_sampling(temperature, top_k, top_p)
    if int(max_new_tokens) < 1:
        raise ValueError(f"--max_new_tokens={max_new_tokens} must be >= 1")
    tokens, positions, segs = pad_prompts(prompts, pad_id)
    length = tokens.shape[1] + int(max_new_tokens)
    if length > model.config.max_seq_len:
        raise ValueError(f"prompt ({tokens.shape[1]} tokens) + max_new_tokens "
                         f"({max_new_tokens}) exceeds ModelConfig.max_seq_len="
                         f"{model.config.max_seq_len}")
    fn = make_generate_fn(model, max_new_tokens, temperature, top_k, top_p, use_cache)
    args = (params, moe_state, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segs),
            jax.random.key(seed))
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    t1 = time.perf_counter()
    out = np.asarray(jax.block_until_ready(compiled(*args)))
    seconds = time.perf_counter() - t1
    rows = []
    for row in out.tolist():
        if eos_id is not None and eos_id in row:
            row = row[:row.index(eos_id) + 1]
        rows.append(row)
    return {"tokens": rows, "tokens_per_s": out.size / max(seconds, 1e-9),
            "seconds": seconds, "compile_seconds": t1 - t0}
