"""Activation-sparsity metrics against NumPy recomputations from the model's captured
intermediates: exact zeros, below-threshold and chunk-level fractions per MLP and overall,
padding left out; routed experts per computed assignment (same under every dispatch)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.models.act_record import STATS
from sparsejax.models.moe import layer as _moe_layer  # noqa: F401 (registers MoeMlp with gin)
from sparsejax.models.transformer import ModelConfig, Transformer
from sparsejax.sparsity.activation.metrics import ActivationMetrics, batch_sums, summarize

SETTINGS = ActivationMetrics(thresholds=(0.01, 0.2), chunk_sizes=(4, 8))
BASE = dict(num_layers=2, embed_dim=16, num_heads=2, num_kv_heads=2, head_dim=8, mlp_dim=32,
            max_seq_len=16)


def forward(cfg, tokens, seg):
    model = Transformer(cfg)
    variables = model.init({"params": jax.random.key(1), "router": jax.random.key(2)}, tokens)
    _, mut = jax.jit(lambda v: model.apply(v, tokens, None, seg, mutable=[STATS, "intermediates"],
                                           capture_intermediates=True))(variables)
    sums = jax.jit(lambda st: batch_sums(st, seg, SETTINGS))(mut[STATS])
    return nn.meta.unbox(variables)["params"], mut, summarize(jax.device_get(sums), SETTINGS)


def inputs():
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 259)
    seg = jnp.ones((2, 16), jnp.int32).at[1, 11:].set(0)  # row 1: 11 real tokens
    return tokens, seg


def chunk_fraction(h, valid, k):
    """Inactive-on-all-k-tokens fraction over the chunks of real tokens (NumPy)."""
    b, s, f = h.shape
    n = s // k
    hc = h[:, :n * k].reshape(b, n, k, f)
    ok = valid[:, :n * k].reshape(b, n, k).all(-1)
    inactive = (hc == 0).all(2)  # [b, n, f]
    return inactive[ok].mean(), inactive[ok].sum(), ok.sum() * f


@pytest.mark.parametrize("act", ["relu", "silu"])
def test_dense_mlp_metrics_match_numpy(act):
    tokens, seg = inputs()
    cfg = ModelConfig(**BASE, mlp_activation=act)
    _, mut, got = forward(cfg, tokens, seg)
    valid = np.asarray(seg) != 0
    zeros = entries = 0
    for i in range(2):
        inter = mut["intermediates"][f"layer_{i}"]["mlp"]
        gate = np.asarray(inter["wi_gate"]["__call__"][0], np.float64).reshape(2, 16, -1)
        up = np.asarray(inter["wi_up"]["__call__"][0], np.float64).reshape(2, 16, -1)
        a = np.maximum(gate, 0) if act == "relu" else gate / (1 + np.exp(-gate))
        h = a * up
        real = h[valid]
        p = f"layer_{i}/mlp"
        assert got[f"act/zero_fraction/{p}"] == pytest.approx((real == 0).mean(), abs=1e-7)
        for t in (0.01, 0.2):  # (a SiLU MLP has no exact zeros but small entries)
            assert got[f"act/below_{t}/{p}"] == pytest.approx((np.abs(real) < t).mean(), abs=2e-3)
        for k in (4, 8):
            frac, _, _ = chunk_fraction(h, valid, k)
            assert got[f"act/chunk{k}_zero_fraction/{p}"] == pytest.approx(frac, abs=1e-7)
        zeros, entries = zeros + (real == 0).sum(), entries + real.size
    assert got["act/zero_fraction"] == pytest.approx(zeros / entries, abs=1e-7)
    if act == "relu":
        assert 0.2 < got["act/zero_fraction"] < 0.8
        assert got["act/chunk4_zero_fraction"] < got["act/zero_fraction"]  # union of 4 tokens
    else:
        assert got["act/zero_fraction"] == 0.0


def test_chunk_of_row_1_uses_real_tokens_only():
    # row 1 has 11 real tokens: chunks of 4 -> 2 full real chunks, chunks of 8 -> 1
    _, valid = inputs()
    valid = np.asarray(valid) != 0
    h = np.zeros((2, 16, 3))
    assert chunk_fraction(h, valid, 4)[2] == (4 + 2) * 3
    assert chunk_fraction(h, valid, 8)[2] == (2 + 1) * 3


def test_routed_expert_metrics_match_numpy_and_every_dispatch():
    tokens, seg = inputs()
    got = {}
    import gin
    for dispatch in ("onehot", "pallas_gmm"):
        gin.clear_config()
        gin.parse_config([f"MoeMlp.dispatch = '{dispatch}'", "MoeMlp.num_experts = 4",
                          "MoeMlp.top_k = 2", "MoeMlp.mlp_dim = 8", "MoeMlp.capacity_factor = 4.0"])
        params, mut, got[dispatch] = forward(ModelConfig(**BASE, mlp_kinds=("moe",),
                                                         mlp_activation="relu"), tokens, seg)
    valid = np.asarray(seg).reshape(-1) != 0
    zeros = entries = 0
    for i in range(2):
        x = np.asarray(mut["intermediates"][f"layer_{i}"]["mlp_norm"]["__call__"][0],
                       np.float64).reshape(32, -1)
        moe = params[f"layer_{i}"]["moe"]
        ex = {k: np.asarray(v, np.float64) for k, v in moe["experts"].items()}
        top = np.argsort(-(x @ np.asarray(moe["router_kernel"], np.float64)), axis=-1)[:, :2]
        lz = le = 0
        for t in np.flatnonzero(valid):
            for e in top[t]:
                h = np.maximum(x[t] @ ex["wi_gate"][e], 0) * (x[t] @ ex["wi_up"][e])
                lz, le = lz + (h == 0).sum(), le + h.size
        for d in got:
            assert got[d][f"act/zero_fraction/layer_{i}/moe"] == pytest.approx(lz / le, abs=1e-7)
            assert f"act/chunk4_zero_fraction/layer_{i}/moe" not in got[d]
        zeros, entries = zeros + lz, entries + le
    for d in got:
        assert got[d]["act/zero_fraction"] == pytest.approx(zeros / entries, abs=1e-7)


@pytest.mark.parametrize("kwargs, match", [
    (dict(thresholds=(0.0,)), r"thresholds=\(0.0,\): each must be a number > 0"),
    (dict(chunk_sizes=(1,)), r"chunk_sizes=\(1,\): each must be an int >= 2"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ActivationMetrics(**kwargs)
