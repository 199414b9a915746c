"""Native Sparse Attention (models/nsa.py) against a float64 numpy computation of the whole
layer (dense masks per branch, the selection rule written out, the gated sum), its selection,
its gradients, its full-budget exactness and its settings."""
from __future__ import annotations

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.models.attention import Attention
from sparsejax.models.nsa import NativeSparseAttention, NSAConfig
from sparsejax.models.transformer import ModelConfig

CFG = NSAConfig(compress_block=8, compress_stride=4, select_block=8, select_blocks=3,
                local_blocks=1, window=6)
HEADS, KV_HEADS, HEAD_DIM, EMBED = 4, 2, 8, 16
THETA = 10000.0


# --- the numpy reference ----------------------------------------------------------------------


def rope(x, pos):
    """Half-split RoPE of x [b, s, heads, d] at positions [b, s] (float64)."""
    d = x.shape[-1]
    inv = THETA ** (-np.arange(0, d, 2) / d)
    ang = pos[..., None] * inv
    sin, cos = np.sin(ang)[:, :, None], np.cos(ang)[:, :, None]
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def softmax_rows(logits, vis):
    """Softmax over the visible entries of the last axis (zeros where nothing is)."""
    z = np.where(vis, logits, -np.inf)
    m = np.max(z, -1, keepdims=True)
    e = np.where(vis, np.exp(z - np.where(np.isfinite(m), m, 0)), 0.0)
    tot = e.sum(-1, keepdims=True)
    return np.where(tot > 0, e / np.where(tot > 0, tot, 1), 0.0)


def attend(q, k, v, vis):
    """q [s, d], k/v [n, d], vis [s, n] -> [s, d], probabilities [s, n]."""
    p = softmax_rows(q @ k.T / np.sqrt(q.shape[-1]), vis)
    return p @ v, p


def compress(x, p, cfg):
    """x [s, kv_heads, d] -> [blocks, kv_heads, d]: the MLP over each flattened block."""
    s, l, st = x.shape[0], cfg.compress_block, cfg.compress_stride
    out = []
    for start in range(0, s - l + 1, st):
        blk = x[start:start + l] + p["position_embedding"][:, None, :]  # [l, kvh, d]
        flat = np.moveaxis(blk, 1, 0).reshape(x.shape[1], -1)  # [kvh, l*d]
        hid = flat @ p["hidden"] + p["hidden_bias"]
        hid = hid / (1 + np.exp(-hid))
        out.append(hid @ p["out"] + p["out_bias"])
    return np.array(out).reshape(-1, x.shape[1], x.shape[2])


def select_rule(scores, cfg):
    """[qb, kb] scores -> kept blocks: block 0, the local blocks, then the highest scores
    (ties to the earlier block), select_blocks in all, causal."""
    qb, kb = scores.shape
    keep = np.zeros((qb, kb), bool)
    for i in range(qb):
        forced = {0} | {j for j in range(i - cfg.local_blocks + 1, i + 1) if j >= 0}
        rest = [j for j in np.argsort(-scores[i], kind="stable") if j <= i and j not in forced]
        for j in list(forced) + rest[:cfg.select_blocks - len(forced)]:
            keep[i, j] = True
    return keep


def reference_core(p, x, q, sel, cmp, win, pos, seg, cfg):
    """NativeSparseAttention in float64: the branch outputs, gates, scores and layout."""
    b, s, h, d = q.shape
    kvh = sel[0].shape[2]
    g = h // kvh
    blk, l, st = cfg.select_block, cfg.compress_block, cfg.compress_stride
    nb = -(-s // blk)
    gates = 1 / (1 + np.exp(-(x @ p["gate"] + p["gate_bias"]))).reshape(b, s, h, 3)
    out = {n: np.zeros((b, s, h, d)) for n in ("compressed", "selected", "window")}
    scores = np.zeros((b, kvh, nb, nb))
    layout = np.zeros((b, kvh, nb, nb), bool)
    t_idx, u_idx = np.arange(s)[:, None], np.arange(s)[None, :]
    for bi in range(b):
        kc = compress(cmp[0][bi], p["compress_key"], cfg)
        vc = compress(cmp[1][bi], p["compress_value"], cfg)
        starts = np.arange(len(kc)) * st
        ends = starts + l - 1
        kc = rope(kc[None], pos[bi][ends][None])[0]
        whole = np.array([len(set(seg[bi, a:a + l])) == 1 for a in starts], bool)
        vis_c = (ends[None, :] <= t_idx) & whole[None] & (seg[bi][starts][None, :] == seg[bi][:, None])
        same = seg[bi][:, None] == seg[bi][None, :]
        for hh in range(h):
            n = hh // g
            if len(kc):
                out["compressed"][bi, :, hh], pc = attend(q[bi, :, hh], kc[:, n], vc[:, n], vis_c)
            else:
                pc = np.zeros((s, 0))
            for j in range(nb):  # selection block j: compressed blocks by shared pieces
                w = np.maximum(0, np.minimum(starts + l, (j + 1) * blk)
                               - np.maximum(starts, j * blk)) // st
                for qi in range(nb):
                    scores[bi, n, qi, j] += (pc[qi * blk:(qi + 1) * blk] @ w).sum()
        for n in range(kvh):
            layout[bi, n] = select_rule(scores[bi, n], cfg)
        for hh in range(h):
            n = hh // g
            kept = layout[bi, n][t_idx // blk, u_idx // blk]
            vis_s = kept & (u_idx <= t_idx) & same
            out["selected"][bi, :, hh] = attend(q[bi, :, hh], sel[0][bi, :, n], sel[1][bi, :, n],
                                                vis_s)[0]
            vis_w = (u_idx <= t_idx) & (t_idx - u_idx < cfg.window) & same
            out["window"][bi, :, hh] = attend(q[bi, :, hh], win[0][bi, :, n], win[1][bi, :, n],
                                              vis_w)[0]
    return {**out, "gates": gates, "scores": scores, "layout": layout}


def reference_attention(params, x, pos, seg, cfg):
    """Attention(kind='nsa') in float64 from its params."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.meta.unbox(params))
    b, s, _ = x.shape

    def proj(name, heads):
        return (x @ p[name]).reshape(b, s, heads, HEAD_DIM)

    q = rope(proj("query", HEADS), pos)
    sel = (rope(proj("key", KV_HEADS), pos), proj("value", KV_HEADS))
    cmp = (proj("key_compressed", KV_HEADS), proj("value_compressed", KV_HEADS))
    win = (rope(proj("key_window", KV_HEADS), pos), proj("value_window", KV_HEADS))
    r = reference_core(p["nsa"], x, q, sel, cmp, win, pos, seg, cfg)
    mixed = sum(r["gates"][..., i:i + 1] * r[n]
                for i, n in enumerate(("compressed", "selected", "window")))
    return mixed.reshape(b, s, -1) @ p["out"]


# --- inputs -----------------------------------------------------------------------------------


def inputs(seq=30, batch=2, packed=True, seed=0):
    """x [b, s, embed], positions and segment ids (row 0 packs two documents)."""
    x = np.asarray(jax.random.normal(jax.random.key(seed), (batch, seq, EMBED)), np.float32)
    seg = np.ones((batch, seq), np.int32)
    if packed:
        seg[0, 13:] = 2
    pos = np.zeros((batch, seq), np.int32)
    for bi in range(batch):
        for sid in np.unique(seg[bi]):
            where = np.flatnonzero(seg[bi] == sid)
            pos[bi, where] = np.arange(len(where))
    return x, pos, seg


def attention(cfg=CFG):
    return Attention(HEADS, KV_HEADS, HEAD_DIM, THETA, kind="nsa", nsa=cfg)


def core_inputs(seq=32, seed=3):
    ks = jax.random.split(jax.random.key(seed), 8)
    x, pos, seg = inputs(seq)
    q = jax.random.normal(ks[0], (2, seq, HEADS, HEAD_DIM))
    kv = [jax.random.normal(k, (2, seq, KV_HEADS, HEAD_DIM)) for k in ks[1:7]]
    return x, q, (kv[0], kv[1]), (kv[2], kv[3]), (kv[4], kv[5]), pos, seg


# --- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq", [30, 5])  # padded to 32; shorter than one compression block
def test_attention_matches_the_numpy_reference(seq):
    x, pos, seg = inputs(seq, packed=seq > 13)
    model = attention()
    params = model.init(jax.random.key(1), x, pos, seg)["params"]
    out = model.apply({"params": params}, x, pos, seg)
    ref = reference_attention(params, x.astype(np.float64), pos, seg, CFG)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=1e-5)


def test_selection_follows_the_rule():
    x, q, sel, cmp, win, pos, seg = core_inputs()
    cfg = NSAConfig(compress_block=8, compress_stride=4, select_block=8, select_blocks=3,
                    local_blocks=1, window=6)
    module = NativeSparseAttention(cfg)
    args = (x, q, sel, cmp, win, pos, seg)
    params = module.init(jax.random.key(2), *args)["params"]
    got = module.apply({"params": params}, *args, return_branches=True)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.meta.unbox(params))
    f64 = [np.asarray(a, np.float64) for a in (q, *sel, *cmp, *win)]
    ref = reference_core(p, x.astype(np.float64), f64[0], f64[1:3], f64[3:5], f64[5:7], pos,
                         seg, cfg)
    np.testing.assert_allclose(np.asarray(got["scores"]), ref["scores"], rtol=1e-5, atol=1e-6)
    layout = np.asarray(got["layout"])
    assert np.array_equal(layout, ref["layout"])
    for bi in range(2):  # the rule on the module's own scores, and a real choice was made
        for n in range(KV_HEADS):
            assert np.array_equal(layout[bi, n], select_rule(np.asarray(got["scores"])[bi, n], cfg))
    assert layout.sum(-1).max() == 3  # block 0, the query's own block and one chosen
    chosen = layout[:, :, 3, 1:3]  # the last query block chooses block 1 or 2
    assert np.all(chosen.sum(-1) == 1) and chosen[..., 1].any() and chosen[..., 0].any()
    for name in ("compressed", "selected", "window"):
        np.testing.assert_allclose(np.asarray(got[name]), ref[name], atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_parameter_and_skip_the_selection():
    x, pos, seg = inputs()
    model = attention()
    params = model.init(jax.random.key(1), x, pos, seg)["params"]
    r = jax.random.normal(jax.random.key(5), (2, 30, EMBED))
    grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x, pos, seg) * r))(params)
    for path, g in jax.tree_util.tree_flatten_with_path(nn.meta.unbox(grads))[0]:
        assert np.any(np.asarray(g) != 0), jax.tree_util.keystr(path)

    # the selected branch depends on the compression only through its block choice: no gradient
    x, q, sel, cmp, win, pos, seg = core_inputs()
    module = NativeSparseAttention(CFG)
    args = (x, q, sel, cmp, win, pos, seg)
    nsa = module.init(jax.random.key(2), *args)["params"]

    def branch(p, c, name):
        return jnp.sum(module.apply({"params": p}, x, q, sel, c, win, pos, seg,
                                    return_branches=True)[name] ** 2)

    for name, zero in (("selected", True), ("compressed", False)):
        gp, gc = jax.grad(branch, argnums=(0, 1))(nsa, cmp, name)
        compress_grads = jax.tree.leaves(nn.meta.unbox(
            {k: v for k, v in gp.items() if k.startswith("compress")})) + list(gc)
        assert all(np.all(np.asarray(g) == 0) for g in compress_grads) == zero, name


def full_causal(q, k, v, seg):
    """Causal, segment-masked attention in float64 (GQA)."""
    b, s, h, _ = q.shape
    out = np.zeros(q.shape)
    t, u = np.arange(s)[:, None], np.arange(s)[None, :]
    for bi in range(b):
        vis = (u <= t) & (seg[bi][:, None] == seg[bi][None, :])
        for hh in range(h):
            n = hh // (h // k.shape[2])
            out[bi, :, hh] = attend(q[bi, :, hh], k[bi, :, n], v[bi, :, n], vis)[0]
    return out


def test_full_budget_selected_and_window_branches_are_full_causal_attention():
    x, q, sel, cmp, win, pos, seg = core_inputs(seq=30)
    cfg = NSAConfig(compress_block=8, compress_stride=4, select_block=8, select_blocks=4,
                    local_blocks=1, window=30)
    module = NativeSparseAttention(cfg)
    args = (x, q, sel, cmp, win, pos, seg)
    got = module.apply(module.init(jax.random.key(2), *args), *args, return_branches=True)
    assert np.array_equal(np.asarray(got["layout"])[0, 0], np.tri(4, dtype=bool))
    for name, (k, v) in (("selected", sel), ("window", win)):
        ref = full_causal(*(np.asarray(a, np.float64) for a in (q, k, v)), seg)
        np.testing.assert_allclose(np.asarray(got[name]), ref, atol=1e-5)


@pytest.mark.parametrize("kwargs, setting", [
    (dict(compress_block=24, compress_stride=16), "compress_stride"),
    (dict(select_block=40), "select_block"),
    (dict(select_blocks=0), "select_blocks"),
    (dict(select_blocks=2, local_blocks=2), "select_blocks"),
    (dict(window=0), "window"),
    (dict(local_blocks=True), "local_blocks"),
])
def test_bad_settings_are_refused_by_name(kwargs, setting):
    with pytest.raises(ValueError, match=f"NSAConfig.{setting}="):
        NSAConfig(**kwargs)


def test_refusals():
    with pytest.raises(ValueError, match="attention_sinks"):
        ModelConfig(attention_kinds=("nsa",), attention_sinks=True)
    with pytest.raises(ValueError, match="NSAConfig.window"):
        ModelConfig(attention_kinds=("nsa", "dense"), sliding_window=8)
    ModelConfig(attention_kinds=("nsa", "dense"), sliding_window=8,
                layer_types=("full_attention", "sliding_attention"))  # the window is dense's
    gin.bind_parameter("NSAConfig.select_block", 12)  # checked when the model is configured
    with pytest.raises(ValueError, match="NSAConfig.select_block=12"):
        ModelConfig(attention_kinds=("nsa",))
    x, pos, seg = inputs()
    model = attention()
    variables = model.init(jax.random.key(1), x, pos, seg)
    with pytest.raises(ValueError, match="'nsa'"):
        model.apply(variables, x[:, :1], pos[:, :1], seg[:, :1], decode=True)
    windowed = Attention(HEADS, KV_HEADS, HEAD_DIM, kind="nsa", nsa=CFG, window=4)
    with pytest.raises(ValueError, match="NSAConfig.window"):
        windowed.init(jax.random.key(1), x, pos, seg)
