"""The activation-sparse decode path: a decode step through it equals the masked dense
computation (the eval path under the same thresholds) — bit for bit on exactly representable
data, within float32 summation error otherwise — for input sparsity (TEAL/WINA sites),
neuron sparsity (CATS / ReLU zeros) and both at once, including steps that overflow the
capacity; generation with it gives the same tokens; capacities follow the calibration."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels.gather_matmul.ops as gm_ops
from sparsejax.infer.generate import generate
from sparsejax.infer.sparse_decode import SparseDecode, masked_fraction, with_capacities
from sparsejax.models.layers import GatedMlp
from sparsejax.models.sparse_mlp import active_slots, shared_slots
from sparsejax.models.thresholds import THRESHOLDS, Site, histogram
from sparsejax.models.transformer import ModelConfig, Transformer
from sparsejax.sparsity.activation.calibrate import WithVariables

D, F = 16, 64


def integer_mlp(act):
    """A GatedMlp whose kernels are small integers (every sum exact in float32)."""
    mlp = GatedMlp(D, F, activation=act)
    x0 = jnp.zeros((1, 1, D))
    params = nn.meta.unbox(mlp.init(jax.random.key(0), x0))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda p: jnp.asarray(rng.integers(-3, 4, p.shape), jnp.float32), params)
    return mlp, params


def sites_for(kind, cap, threshold_in=1.5, threshold_act=2.5, rows=4):
    s = lambda t, n: Site(jnp.float32(t), jnp.ones((n,)), cap, rows)
    if kind == "input":  # TEAL on gate, up and down inputs
        return {"wi_gate_in": s(threshold_in, D), "wi_up_in": s(threshold_in, D),
                "wo_in": s(threshold_act * 3, F)}
    if kind == "neuron":  # CATS on the gate activation
        return {"gate_act": s(threshold_act, F)}
    return {"wi_gate_in": s(threshold_in, D), "gate_act": s(threshold_act, F),
            "wo_in": s(threshold_act * 3, F)}


@pytest.mark.parametrize("kind, cap, rows", [("input", 40, 1), ("neuron", 40, 1), ("both", 40, 3),
                                            ("input", 3, 3), ("both", 3, 1)])  # 3: overflow
def test_decode_step_equals_masked_dense_exactly(kind, cap, rows):
    mlp, params = integer_mlp("relu")
    x = jnp.asarray(np.random.default_rng(rows).integers(-3, 4, (rows, 1, D)), jnp.float32)
    v = {"params": params, THRESHOLDS: sites_for(kind, cap)}
    dense = np.asarray(jax.jit(lambda v, x: mlp.apply(v, x))(v, x))
    sparse = np.asarray(jax.jit(lambda v, x: mlp.apply(v, x, decode=True))(v, x))
    np.testing.assert_array_equal(sparse, dense)
    assert np.any(dense != 0)


@pytest.mark.parametrize("caps", [(40, 40, 40), (2, 40, 40), (40, 3, 5)])
def test_gate_and_up_with_different_thresholds_share_slots_exactly(caps):
    """Gate and up read one slot list (the union of their masks, the larger capacity): with
    different thresholds each still computes its own masked product, bit for bit."""
    mlp, params = integer_mlp("relu")
    x = jnp.asarray(np.random.default_rng(7).integers(-3, 4, (2, 1, D)), jnp.float32)
    s = lambda t, n, c: Site(jnp.float32(t), jnp.ones((n,)), c, 4)
    tree = {"wi_gate_in": s(0.5, D, caps[0]), "wi_up_in": s(2.5, D, caps[1]),
            "wo_in": s(7.5, F, caps[2])}
    v = {"params": params, THRESHOLDS: tree}
    dense = np.asarray(jax.jit(lambda v, x: mlp.apply(v, x))(v, x))
    sparse = np.asarray(jax.jit(lambda v, x: mlp.apply(v, x, decode=True))(v, x))
    np.testing.assert_array_equal(sparse, dense)
    assert np.any(dense != 0)


@pytest.mark.parametrize("width, cap", [(64, 64), (100, 70), (1000, 300), (130, 5)])
def test_active_slots_lists_the_active_entries_in_order(width, cap):
    rng = np.random.default_rng(width)
    keep = rng.random((3, width)) < 0.2
    idx, count = jax.jit(active_slots, static_argnums=1)(jnp.asarray(keep), cap)
    want = np.nonzero(keep.any(axis=0))[0]
    assert int(count) == len(want)
    n = min(cap, len(want))  # past the capacity: the first `cap` (count says it overflowed)
    np.testing.assert_array_equal(np.asarray(idx)[:n], want[:n])


def test_shared_slots_needs_every_site_sparse():
    keep = jnp.asarray(np.random.default_rng(0).random((1, 32)) < 0.3)
    on = Site(jnp.float32(0.1), jnp.ones((32,)), 12, 1)
    off = Site(jnp.float32(0.1), jnp.ones((32,)), 0, 0)
    assert shared_slots([keep, keep], [on, off], 1) is None
    assert shared_slots([keep, None], [on, on], 1) is None
    assert shared_slots([keep, keep], [on, on], 2) is None  # more rows than max_rows
    other = jnp.asarray(np.random.default_rng(1).random((1, 32)) < 0.3)
    idx, count = shared_slots([keep, other], [on, Site(on.threshold, on.scale, 20, 1)], 1)
    union = np.nonzero(np.asarray(keep | other)[0])[0]
    assert idx.shape == (20,) and int(count) == len(union)


def test_decode_step_matches_masked_dense_on_random_data():
    mlp = GatedMlp(D, F, activation="silu")
    x = jax.random.normal(jax.random.key(1), (2, 1, D))
    params = nn.meta.unbox(mlp.init(jax.random.key(0), x))["params"]
    for kind in ("input", "neuron", "both"):
        v = {"params": params, THRESHOLDS: sites_for(kind, 48, 0.5, 0.1)}
        dense = mlp.apply(v, x)
        sparse = mlp.apply(v, x, decode=True)
        np.testing.assert_allclose(np.asarray(sparse), np.asarray(dense), rtol=1e-5, atol=1e-6)


def test_sparse_path_reads_only_gathered_weights(monkeypatch):
    """The decode step calls the gathered matmul for every sparse site (trace-time count),
    and a step without sites does not."""
    calls = []
    real = gm_ops.gather_matmul
    monkeypatch.setattr(gm_ops, "gather_matmul", lambda *a, **k: calls.append(k.get("mode", "rows")) or real(*a, **k))
    mlp, params = integer_mlp("relu")
    x = jnp.ones((1, 1, D))
    jax.jit(lambda v, x: mlp.apply(v, x, decode=True))({"params": params, THRESHOLDS: sites_for("input", 32)}, x)
    assert calls == ["rows", "rows", "rows"]  # gate, up, down: input sparsity
    calls.clear()
    jax.jit(lambda v, x: mlp.apply(v, x, decode=True))({"params": params, THRESHOLDS: sites_for("neuron", 32)}, x)
    assert calls == ["cols", "rows"]  # up columns and down rows of the active neurons
    calls.clear()
    jax.jit(lambda v, x: mlp.apply(v, x, decode=True))({"params": params}, x)
    assert calls == []
    calls.clear()  # more rows than max_rows: the dense masked path
    jax.jit(lambda v, x: mlp.apply(v, x, decode=True))(
        {"params": params, THRESHOLDS: sites_for("input", 32, rows=2)}, jnp.ones((3, 1, D)))
    assert calls == []


def test_generation_with_the_sparse_path_gives_the_same_tokens():
    cfg = ModelConfig(num_layers=2, embed_dim=32, num_heads=2, num_kv_heads=2, head_dim=16,
                      mlp_dim=64, max_seq_len=32, mlp_activation="relu")
    model = Transformer(cfg)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]

    def sites(cap):
        tree = {}
        for i in range(2):
            one = lambda t, n: Site(jnp.float32(t), jnp.ones((n,)), cap, 4)
            # q/k/v: different thresholds on one input (one shared slot list, their union)
            tree[f"layer_{i}"] = {"attn": {n: one(t, 32) for n, t in
                                           (("query_in", 0.3), ("key_in", 0.1), ("value_in", 0.5))},
                                  "mlp": {"gate_act": one(0.0, 64), "wo_in": one(0.02, 64)}}
        return tree

    out = {cap: generate(WithVariables(model, {THRESHOLDS: sites(cap)}), params, [[5, 6, 7, 8]],
                         max_new_tokens=6)["tokens"] for cap in (0, 48)}
    assert out[0] == out[48]


def test_attention_decode_step_with_shared_qkv_rows_equals_masked_dense():
    """A cached decode step (one token) with q/k/v sites of different thresholds (one shared
    list of active rows, one loop over three kernels) and an out-projection site: logits
    equal the same thresholds applied with dense matmuls (to float32 summation order: the
    normalized inputs are not exactly representable)."""
    from sparsejax.infer.cache import init_cache
    cfg = ModelConfig(vocab_size=64, num_layers=2, embed_dim=32, num_heads=2, num_kv_heads=1,
                      head_dim=16, mlp_dim=64, max_seq_len=16, scale_embeddings=False)
    model = Transformer(cfg)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda p: jnp.asarray(rng.integers(-2, 3, p.shape), jnp.float32) / 4,
                          params)  # large weights: many entries on both sides of the thresholds

    def sites(cap):
        one = lambda t, n: Site(jnp.float32(t), jnp.ones((n,)), cap, 1)
        attn = {"query_in": one(0.3, 32), "key_in": one(0.6, 32), "value_in": one(0.1, 32),
                "out_in": one(0.5, 32)}
        return {f"layer_{i}": {"attn": attn} for i in range(2)}

    tokens = jnp.asarray([[3, 9, 4, 1]], jnp.int32)
    pos = jnp.arange(4, dtype=jnp.int32)[None]

    def step(cap):
        v = {"params": params, THRESHOLDS: sites(cap), "cache": init_cache(cfg, 1, 8)}
        _, mut = model.apply(v, tokens, pos, jnp.ones_like(tokens), decode=True, mutable=["cache"])
        v["cache"] = mut["cache"]
        logits, _ = model.apply(v, jnp.asarray([[7]], jnp.int32), jnp.asarray([[4]], jnp.int32),
                                jnp.ones((1, 1), jnp.int32), decode=True, mutable=["cache"])
        return np.asarray(logits)

    sparse, dense = step(24), step(0)
    np.testing.assert_allclose(sparse, dense, rtol=1e-5, atol=1e-5)
    assert np.abs(dense).max() > 0.1


def test_capacities_follow_the_calibrated_sparsity():
    rng = np.random.default_rng(0)
    scores = np.abs(rng.standard_normal(10_000)).astype(np.float32)
    counts = np.asarray(histogram(jnp.asarray(scores)))
    from sparsejax.sparsity.activation.thresholding import threshold_for
    t = threshold_for(counts, 0.7)
    frac = masked_fraction(counts, t)
    assert frac == pytest.approx(np.mean(scores <= t), abs=1e-9)
    tree = {"layer_0": {"mlp": {"wo_in": Site(jnp.float32(t), jnp.ones((64,)))}}}
    out = with_capacities(tree, {"layer_0/mlp/wo_in": counts}, SparseDecode(capacity_factor=1.5, max_rows=2))
    s = out["layer_0"]["mlp"]["wo_in"]
    assert s.capacity == math.ceil(1.5 * (1 - frac) * 64) and s.max_rows == 2
    off = with_capacities(tree, {"layer_0/mlp/wo_in": counts}, SparseDecode(enabled=False))
    assert off["layer_0"]["mlp"]["wo_in"].capacity == 0
    # more slots than max_density of the width: the masked dense product instead
    dense = with_capacities(tree, {"layer_0/mlp/wo_in": counts},
                            SparseDecode(capacity_factor=1.5, max_density=0.4))
    assert s.capacity > 0.4 * 64 and dense["layer_0"]["mlp"]["wo_in"].capacity == 0
    # the neuron path (gate_act) has its own limit
    neuron = {"layer_0": {"mlp": {"gate_act": Site(jnp.float32(t), jnp.ones((64,)))}}}
    hists = {"layer_0/mlp/gate_act": counts}
    cap = math.ceil(1.5 * (1 - frac) * 64)  # 29 of 64 slots
    on = with_capacities(neuron, hists, SparseDecode(capacity_factor=1.5, max_neuron_density=0.5))
    off = with_capacities(neuron, hists, SparseDecode(capacity_factor=1.5, max_neuron_density=0.4))
    assert on["layer_0"]["mlp"]["gate_act"].capacity == cap and cap > 0.4 * 64
    assert off["layer_0"]["mlp"]["gate_act"].capacity == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(capacity_factor=0.5), r"capacity_factor=0.5 must be a number >= 1"),
    (dict(max_rows=0), r"max_rows=0 must be an int >= 1"),
    (dict(max_density=0.0), r"max_density=0.0 must be in \(0, 1\]"),
    (dict(max_neuron_density=1.5), r"max_neuron_density=1.5 must be in \(0, 1\]"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseDecode(**kwargs)


def test_neuron_major_up_weights_give_the_same_step(monkeypatch):
    from sparsejax.infer.sparse_decode import neuron_major_weights
    from sparsejax.models.sparse_mlp import DECODE_WEIGHTS
    mlp, params = integer_mlp("relu2")
    x = jnp.asarray(np.random.default_rng(5).integers(-3, 4, (2, 1, D)), jnp.float32)
    tree = sites_for("both", 40)
    major = neuron_major_weights({"layer_0": {"mlp": params}}, {"layer_0": {"mlp": tree}})
    np.testing.assert_array_equal(major["layer_0"]["mlp"]["wi_up_t"], np.asarray(params["wi_up"]["kernel"]).T)
    step = jax.jit(lambda v, x: mlp.apply(v, x, decode=True))
    with_t = step({"params": params, THRESHOLDS: tree, DECODE_WEIGHTS: major["layer_0"]["mlp"]}, x)
    dense = mlp.apply({"params": params, THRESHOLDS: tree}, x)
    np.testing.assert_array_equal(np.asarray(with_t), np.asarray(dense))
