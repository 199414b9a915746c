"""Streaming heads (DuoAttention, sparsejax/models/streaming_heads.py): with sink + recent
covering the cache, decoding equals dense decoding (greedy tokens, logits within float32
tolerance); the ring attention equals a NumPy Λ-masked attention over the whole history
through prefill and decode steps (the ring wraps); the cache shrinks by the streaming heads'
share; calibration errors vanish when the Λ mask is the full one and label the lowest-error
heads; bad labels are refused in one line."""
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.infer.cache import init_cache
from sparsejax.infer.generate import generate, pad_prompts
from sparsejax.models import streaming_heads as sh
from sparsejax.models.transformer import ModelConfig, Transformer

BASE = dict(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8,
            mlp_dim=48, max_seq_len=64, scale_embeddings=False)
RNG = np.random.default_rng(0)
PROMPTS = [list(RNG.integers(0, 64, 29)), list(RNG.integers(0, 64, 21))]
N_NEW = 10


def model_and_params(**kw):
    model = Transformer(ModelConfig(**{**BASE, **kw}))
    v = nn.meta.unbox(model.init(jax.random.key(0), np.zeros((1, 8), np.int32)))
    rng = np.random.default_rng(1)
    return model, jax.tree.map(lambda p: (rng.standard_normal(p.shape) * 0.5).astype(np.float32),
                               v["params"])


def bind(**kw):
    gin.clear_config()
    for k, v in kw.items():
        gin.bind_parameter(f"StreamingHeads.{k}", v)


def decode_logits(model, params, n_new):
    """Prefill, then n_new - 1 greedy decode steps: the logits of each step [n_new, b, V]."""
    tokens, positions, segs = pad_prompts(PROMPTS, 0)
    cache = init_cache(model.config, len(PROMPTS), tokens.shape[1] + n_new)
    step = jax.jit(lambda c, t, p, s: model.apply({"params": params, "cache": c}, t, p, s,
                                                  decode=True, mutable=["cache"]))
    logits, mut = step(cache, tokens, positions, segs)
    out, pos = [logits[:, -1]], positions[:, -1:]
    for _ in range(n_new - 1):
        tok = jnp.argmax(out[-1], -1)[:, None].astype(jnp.int32)
        pos = pos + 1
        logits, mut = step(mut["cache"], tok, pos, jnp.ones_like(tok))
        out.append(logits[:, -1])
    return np.stack([np.asarray(x) for x in out])


def test_full_window_equals_dense_decoding_and_a_short_one_differs():
    model, params = model_and_params()
    dense = decode_logits(model, params, N_NEW)
    bind(heads=((0,), (0, 1)), sink_tokens=4, recent_tokens=40)  # 4 + 40 >= 39 slots
    assert generate(model, params, PROMPTS, max_new_tokens=N_NEW)["tokens"] == \
        np.argmax(dense, -1).T.tolist()
    np.testing.assert_allclose(decode_logits(model, params, N_NEW), dense, rtol=1e-5, atol=1e-5)
    bind(heads=((0,), (0, 1)), sink_tokens=2, recent_tokens=6)
    assert np.abs(decode_logits(model, params, N_NEW) - dense).max() > 1e-3


@pytest.mark.parametrize("sink, recent", [(2, 5), (0, 3), (3, 40)])
def test_ring_attention_equals_numpy_lambda_attention(sink, recent):
    rng = np.random.default_rng(sink + recent)
    b, n, g, d, prompt, steps = 2, 2, 2, 8, 11, 9
    total = prompt + steps
    q = rng.standard_normal((b, total, n * g, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, total, n, d)).astype(np.float32) for _ in range(2))
    pos = np.tile(np.arange(total), (b, 1)).astype(np.int32)
    pos[1, :3] = -1  # left padding of the second row
    pos[1, 3:] -= 3
    s = sh.StreamingHeads(sink_tokens=sink, recent_tokens=recent)
    ring = sh.empty_ring(b, s.ring, n, d, jnp.float32)
    outs = []
    attend = jax.jit(sh.streaming_attention, static_argnums=(7,))
    for start, stop in [(0, prompt)] + [(t, t + 1) for t in range(prompt, total)]:
        out, ring = attend(q[:, start:stop], k[:, start:stop], v[:, start:stop],
                                           ring, pos[:, start:stop],
                                           np.maximum(pos[:, start:stop], 0), start, s)
        outs.append(np.asarray(out))
    got = np.concatenate(outs, 1)
    for i in range(b):
        for t in range(total):
            if pos[i, t] < 0:
                continue
            keys = [j for j in range(t + 1) if pos[i, j] >= 0 and (j < sink or t - j < recent)]
            for h in range(n * g):
                logit = k[i, keys, h // g] @ q[i, t, h] / np.sqrt(d)
                w = np.exp(logit - logit.max())
                np.testing.assert_allclose(got[i, t, h], (w / w.sum()) @ v[i, keys, h // g],
                                           rtol=1e-5, atol=1e-5)


def test_the_cache_shrinks_by_the_streaming_heads_share():
    cfg = ModelConfig(**{**BASE, "max_seq_len": 4096, "num_layers": 4})
    dense = sh.cache_bytes(jax.eval_shape(lambda: init_cache(cfg, 1, 4096)))
    bind(heads=((0,), (0,), (0, 1), ()), sink_tokens=4, recent_tokens=60)  # 4 of 8 KV heads
    small = sh.cache_bytes(jax.eval_shape(lambda: init_cache(cfg, 1, 4096)))
    kv = 2 * 8 * 4  # key + value of one token and KV head: head_dim 8, float32
    # 4 KV heads lose their 4096 slots and get a ring of 64; 3 layers get ring positions and
    # slot ids (int32)
    assert small == dense - 4 * 4096 * kv + 4 * 64 * kv + 3 * 2 * 64 * 4
    assert small / dense == pytest.approx(0.5234, abs=1e-4)


def test_calibration_and_labels():
    model, params = model_and_params()
    tokens = RNG.integers(0, 64, (2, 32)).astype(np.int32)
    positions = np.tile(np.arange(32, dtype=np.int32), (2, 1))
    segs = np.ones_like(tokens)
    none = sh.calibrate(model, {"params": params}, tokens, positions, segs, sink=4, recent=32)
    np.testing.assert_allclose(none, 0, atol=1e-12)
    err = sh.calibrate(model, {"params": params}, tokens, positions, segs, sink=2, recent=4)
    assert err.shape == (2, 2) and (err > 0).all()
    labels = sh.label_heads(err, 0.5)
    flat = [(layer, h) for layer, hs in enumerate(labels) for h in hs]
    assert len(flat) == 2
    lowest = sorted(np.ndindex(*err.shape), key=lambda ij: err[ij])[:2]
    assert sorted(flat) == sorted(lowest)
    assert sh.label_heads(err, 0.0) == ((), ()) and sh.label_heads(err, 1.0) == ((0, 1), (0, 1))


def test_bad_labels_are_one_line():
    with pytest.raises(ValueError, match=r"StreamingHeads.heads=\(\(2,\),\): layer 0 must list "
                                         r"distinct KV heads in \[0, 2\)"):
        bind(heads=((2,),))
        init_cache(ModelConfig(**BASE), 1, 16)
    with pytest.raises(ValueError, match="StreamingHeads.recent_tokens=0 must be an int >= 1"):
        sh.StreamingHeads(recent_tokens=0)
    with pytest.raises(ValueError, match=r"fraction=1.5 must be in \[0, 1\]"):
        sh.label_heads(np.zeros((2, 2)), 1.5)
