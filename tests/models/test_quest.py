"""Quest decode (sparsejax/models/quest.py): with a budget covering the whole cache, greedy
tokens equal dense decoding and logits agree within float32 tolerance; the page choice equals
a NumPy reference of the upper-bound rule on random inputs; the paged attention equals a NumPy
softmax over the chosen pages' visible slots; a small budget changes what is decoded; bad
settings are refused in one line."""
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.infer.cache import init_cache
from sparsejax.infer.generate import generate, pad_prompts
from sparsejax.models import quest
from sparsejax.models.transformer import ModelConfig, Transformer

BASE = dict(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8,
            mlp_dim=48, max_seq_len=64, scale_embeddings=False)
RNG = np.random.default_rng(0)
PROMPTS = [list(RNG.integers(0, 64, 29)), list(RNG.integers(0, 64, 21))]
N_NEW = 10  # cache: 29 + 10 = 39 slots -> 5 pages of 8


def model_and_params():
    model = Transformer(ModelConfig(**BASE))
    v = nn.meta.unbox(model.init(jax.random.key(0), np.zeros((1, 8), np.int32)))
    rng = np.random.default_rng(1)
    return model, jax.tree.map(lambda p: (rng.standard_normal(p.shape) * 0.5).astype(np.float32),
                               v["params"])


def bind(**kw):
    gin.clear_config()
    for k, v in kw.items():
        gin.bind_parameter(f"QuestDecode.{k}", v)


def decode_logits(model, params, n_new):
    """Prefill, then n_new - 1 greedy decode steps; the logits of each step [n_new, b, V]
    (jitted here, so that the gin settings in force are traced)."""
    tokens, positions, segs = pad_prompts(PROMPTS, 0)
    cache = init_cache(model.config, len(PROMPTS), tokens.shape[1] + n_new)
    step = jax.jit(lambda c, t, p, s: model.apply({"params": params, "cache": c}, t, p, s,
                                                  decode=True, mutable=["cache"]))
    logits, mut = step(cache, tokens, positions, segs)
    out = [logits[:, -1]]
    pos = positions[:, -1:]
    for _ in range(n_new - 1):
        tok = jnp.argmax(out[-1], -1)[:, None].astype(jnp.int32)
        pos = pos + 1
        logits, mut = step(mut["cache"], tok, pos, jnp.ones_like(tok))
        out.append(logits[:, -1])
    return np.stack([np.asarray(x) for x in out])


def test_full_budget_equals_dense_decoding():
    model, params = model_and_params()
    dense_logits = decode_logits(model, params, N_NEW)
    dense_tokens = np.argmax(dense_logits, -1).T.tolist()  # greedy decoding, step by step
    bind(page_size=8, budget_pages=5, sink_pages=1, recent_pages=1)
    cache = init_cache(model.config, 2, 39)
    assert cache["layer_0"]["attn"]["cached_key"].shape[1] == 40  # whole pages
    assert generate(model, params, PROMPTS, max_new_tokens=N_NEW)["tokens"] == dense_tokens
    np.testing.assert_allclose(decode_logits(model, params, N_NEW), dense_logits, rtol=1e-5,
                               atol=1e-5)
    # a budget of 2 of the 5 pages attends to less, and decodes differently
    bind(page_size=8, budget_pages=2, sink_pages=1, recent_pages=1)
    assert np.abs(decode_logits(model, params, N_NEW)[1:] - dense_logits[1:]).max() > 1e-3


def numpy_choice(q, pmin, pmax, current, s):
    """The rule spelled out: bound = sum_d max(q_d min_d, q_d max_d) per page and query head;
    sink and recent pages always; the rest by highest bound."""
    b, kvh, g, d = q.shape
    n_pages = pmin.shape[1]
    out = np.zeros((b, kvh, g, s.budget_pages), np.int64)
    for i in range(b):
        for k in range(kvh):
            for j in range(g):
                bound = np.array([np.sum(np.maximum(q[i, k, j] * pmin[i, p, k],
                                                    q[i, k, j] * pmax[i, p, k]))
                                  for p in range(n_pages)])
                forced = [p for p in range(n_pages) if p < s.sink_pages
                          or current - s.recent_pages < p <= current]
                rest = [p for p in np.argsort(-bound, kind="stable") if p not in forced]
                out[i, k, j] = np.sort(forced + rest[:s.budget_pages - len(forced)])
    return out


@pytest.mark.parametrize("seed", range(4))
def test_page_choice_equals_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    b, n_pages, kvh, g, d = 2, 12, 2, 3, 8
    k = rng.standard_normal((b, n_pages * 4, kvh, d)).astype(np.float32)
    pmin, pmax = quest.update_pages(*quest.empty_pages(b, n_pages, kvh, d).values(), k,
                                    np.zeros((b, n_pages * 4), np.int32), 0, 4)
    pmin, pmax = np.asarray(pmin), np.asarray(pmax)
    np.testing.assert_array_equal(pmin, k.reshape(b, n_pages, 4, kvh, d).min(2))
    q = rng.standard_normal((b, kvh, g, d)).astype(np.float32)
    s = quest.QuestDecode(page_size=4, budget_pages=int(rng.integers(3, 9)), sink_pages=1,
                          recent_pages=int(rng.integers(1, 3)))
    current = int(rng.integers(3, n_pages))
    got = np.sort(np.asarray(quest.select_pages(quest.page_scores(q, pmin, pmax), current, s)),
                  axis=-1)
    np.testing.assert_array_equal(got, numpy_choice(q, pmin, pmax, current, s))


def test_paged_attention_equals_numpy_over_the_chosen_pages():
    rng = np.random.default_rng(5)
    b, length, kvh, g, d, page = 2, 32, 2, 2, 8, 4
    ck, cv = (rng.standard_normal((b, length, kvh, d)).astype(np.float32) for _ in range(2))
    pos = np.tile(np.arange(length), (b, 1)).astype(np.int32)
    pos[1, :5] = -1  # padding
    pos[:, 27:] = -1  # empty
    q = rng.standard_normal((b, 1, kvh * g, d)).astype(np.float32)
    chosen = np.stack([rng.permutation(length // page)[:3] for _ in range(b * kvh * g)]).reshape(
        b, kvh, g, 3).astype(np.int32)
    qpos = np.array([[26], [26]], np.int32)
    out = np.asarray(quest.paged_attention(q, ck, cv, pos, chosen, qpos, page))
    for i in range(b):
        for h in range(kvh * g):
            k_, j = divmod(h, g)
            slots = np.concatenate([np.arange(p * page, (p + 1) * page) for p in chosen[i, k_, j]])
            slots = slots[(pos[i, slots] >= 0) & (pos[i, slots] <= 26)]
            logit = ck[i, slots, k_] @ q[i, 0, h] / np.sqrt(d)
            w = np.exp(logit - logit.max())
            np.testing.assert_allclose(out[i, 0, h], (w / w.sum()) @ cv[i, slots, k_],
                                       rtol=1e-5, atol=1e-6)


def test_bad_settings_are_one_line():
    model, params = model_and_params()
    bind(page_size=24, budget_pages=2)  # 24 does not divide max_seq_len 64
    with pytest.raises(ValueError, match=r"QuestDecode.page_size=24 must divide the cache "
                                         r"block ModelConfig.max_seq_len=64"):
        generate(model, params, PROMPTS, max_new_tokens=4)
    bind(page_size=8, budget_pages=6)  # the cache of 29 + 10 tokens has 5 pages
    with pytest.raises(ValueError, match=r"QuestDecode.budget_pages=6 is larger than the "
                                         r"cache: 5 pages of 8 slots"):
        generate(model, params, PROMPTS, max_new_tokens=N_NEW)
    with pytest.raises(ValueError, match="QuestDecode.budget_pages=1 must cover"):
        quest.QuestDecode(budget_pages=1, sink_pages=1, recent_pages=1)
    with pytest.raises(ValueError, match="QuestDecode.page_size=0 must be an int >= 1"):
        quest.QuestDecode(page_size=0)
