"""prune_model on tiny models: the block-by-block forward equals Transformer.apply, captured
layer inputs (and per-expert routed inputs) give the statistics numpy computes from the
model's own activations, sequential calibration differs from parallel exactly from the
first block after a pruned one, 8 devices give what 1 device gives, global magnitude is one
ranking, and bad settings fail before any work."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import config as config_lib
from sparsejax.models.transformer import ModelConfig, Transformer, padded_params
from sparsejax.parallel.mesh import make_mesh
from sparsejax.sparsity.posttrain import capture, stats as st
from sparsejax.sparsity.posttrain.config import PruneConfig
from sparsejax.sparsity.posttrain.driver import CalibrationSet, prune_model

N, S = 8, 8


def tiny(layers=3, **kw):
    return ModelConfig(num_layers=layers, embed_dim=16, num_heads=2, num_kv_heads=1,
                       head_dim=8, mlp_dim=32, max_seq_len=16, vocab_size=64, **kw)


def setup(cfg, seed=0):
    rng = np.random.default_rng(seed)
    tok = rng.integers(0, cfg.vocab_size, (N, S)).astype(np.int32)
    seg = np.ones((N, S), np.int32)
    seg[0, 5:] = 2  # a packed row: two documents
    pos = np.broadcast_to(np.arange(S), (N, S)).copy()
    pos[0, 5:] = np.arange(S - 5)
    v = nn.meta.unbox(Transformer(cfg).init(jax.random.key(seed), jnp.asarray(tok[:1])))
    calib = CalibrationSet(tok, tok, np.ones((N, S), np.float32), pos, seg)
    return v, calib


def run(cfg, v, calib, devices=1, **kw):
    return prune_model(cfg, v["params"], v.get("moe_state"), calib, PruneConfig(**kw),
                       mesh=make_mesh(num_devices=devices), valid=padded_params(cfg),
                       batch_size=4 if devices == 1 else 8)


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": True, "scale_embeddings": False}])
def test_block_by_block_forward_is_the_model(kw):
    cfg = tiny(2, **kw)
    v, c = setup(cfg)
    ref = jax.jit(Transformer(cfg).apply)(v, c.inputs, c.positions, c.segment_ids)
    got = jax.jit(lambda p, *a: capture.forward(cfg, p, *a))(v["params"], c.inputs,
                                                             c.positions, c.segment_ids)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


def test_captured_inputs_are_the_layers_inputs():
    cfg = tiny(1)
    v, c = setup(cfg)
    p = v["params"]["layer_0"]
    x = capture.embed(cfg, v["params"], c.inputs)
    _, rec = capture.capture_block(cfg, 0, p, x, c.positions, c.segment_ids)
    groups, of = st.group_inputs(rec.inputs, set(rec.inputs))
    assert of["attn/key"] == of["attn/value"] == of["attn/query"]
    assert of["mlp/wi_up/kernel"] == of["mlp/wi_gate/kernel"] != of["mlp/wo/kernel"]
    # independent recomputation: RMSNorm of the block input, as the model defines it
    x32 = np.asarray(x, np.float64).reshape(-1, 16)
    h = x32 / np.sqrt(np.mean(x32 ** 2, -1, keepdims=True) + 1e-6) * np.asarray(
        p["attn_norm"]["scale"])
    np.testing.assert_allclose(np.asarray(rec.inputs["attn/query"]), h, rtol=1e-5, atol=1e-5)
    # the out projection's input reproduces the attention output through the kernel
    _, inter = nn.apply(lambda m, *a: m(*a), capture.Block(cfg, 0), mutable=["intermediates"],
                        capture_intermediates=True)({"params": p}, x, c.positions,
                                                    c.segment_ids, True)
    attn_out = np.asarray(inter["intermediates"]["attn"]["__call__"][0]).reshape(-1, 16)
    np.testing.assert_allclose(np.asarray(rec.inputs["attn/out"]) @ np.asarray(p["attn"]["out"]),
                               attn_out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gpt_oss", [False, True])
def test_experts_get_the_hessians_of_their_routed_tokens(gpt_oss):
    """gpt_oss: a router bias, expert biases and the clamped SwiGLU (clamping at 0.5), which
    the routing and the down projection's input follow."""
    extra = ["MoeMlp.router_bias=True", "MoeMlp.expert_bias=True"] if gpt_oss else []
    config_lib.parse_gin([], ["MoeMlp.num_experts=4", "MoeMlp.top_k=2", "MoeMlp.mlp_dim=8",
                              *extra])
    cfg = tiny(1, mlp_kinds=("moe",), **(dict(mlp_activation="clamped_swiglu",
                                              swiglu_limit=0.5) if gpt_oss else {}))
    v, c = setup(cfg)
    rng = np.random.default_rng(3)
    v = jax.tree_util.tree_map_with_path(  # biases away from their zero init
        lambda k, a: rng.standard_normal(a.shape).astype(np.float32)
        if "bias" in jax.tree_util.keystr(k) else a, v)
    p = v["params"]["layer_0"]
    x = capture.embed(cfg, v["params"], c.inputs)
    keep = {"moe/experts/wi_gate", "moe/experts/wo"}

    @jax.jit
    def stats(p, x):
        _, rec = capture.capture_block(cfg, 0, p, x, c.positions, c.segment_ids)
        mod, xm = rec.moe["moe"]
        return xm, st.moe_stats(mod, p["moe"], None, xm, jnp.ones(N * S), "moe", keep)

    xm, s = stats(p, x)
    xt = np.asarray(xm, np.float64).reshape(-1, 16)
    logits = xt @ np.asarray(p["moe"]["router_kernel"], np.float64)
    e = {n: np.asarray(a, np.float64) for n, a in p["moe"]["experts"].items()}
    if gpt_oss:
        logits = logits + np.asarray(p["moe"]["router_bias"], np.float64)
    top2 = np.argsort(-logits, axis=-1)[:, :2]  # softmax is monotone: top-2 logits
    for k in range(4):
        rows = np.any(top2 == k, axis=-1)
        np.testing.assert_allclose(s["experts/wi"].hessian[k], xt[rows].T @ xt[rows],
                                   rtol=1e-4, atol=1e-4)
        gate, up = xt[rows] @ e["wi_gate"][k], xt[rows] @ e["wi_up"][k]
        if gpt_oss:
            gate = np.minimum(gate + e["wi_gate_bias"][k], 0.5)
            up = np.clip(up + e["wi_up_bias"][k], -0.5, 0.5) + 1
            hid = gate / (1 + np.exp(-1.702 * gate)) * up
        else:
            hid = gate / (1 + np.exp(-gate)) * up
        np.testing.assert_allclose(s["experts/wo"].hessian[k], hid.T @ hid, rtol=1e-4, atol=1e-4)
        assert float(s["counts"][k]) == rows.sum()


def test_sequential_differs_from_parallel_exactly_after_a_pruned_block():
    cfg = tiny(3)
    v, c = setup(cfg)
    kw = dict(method="sparsegpt", exclude=("layer_0/",))
    seq, par = run(cfg, v, c, calibration="sequential", **kw), \
        run(cfg, v, c, calibration="parallel", **kw)
    same = lambda a, b: all(np.array_equal(x, y) for x, y in
                            zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert same(seq.params["layer_0"], v["params"]["layer_0"])  # not pruned at all
    # layer 1's inputs come from the unpruned layer 0 in both modes
    assert same(seq.params["layer_1"], par.params["layer_1"])
    # layer 2's inputs: the pruned layer 1 (sequential) or the dense one (parallel)
    assert not same(seq.params["layer_2"], par.params["layer_2"])
    errs = {r["path"]: r["recon_error"] for r in seq.report["layers"]}
    assert set(errs) == {f"layer_{i}/{k}" for i in (1, 2) for k in
                         ("attn/query", "attn/key", "attn/value", "attn/out",
                          "mlp/wi_gate/kernel", "mlp/wi_up/kernel", "mlp/wo/kernel")}


@pytest.mark.parametrize("kw", [dict(method="sparsegpt"), dict(method="wanda", dsnot=True)])
def test_eight_devices_equal_one(kw):
    cfg = tiny(2)
    v, c = setup(cfg)
    one, eight = run(cfg, v, c, 1, **kw), run(cfg, v, c, 8, **kw)
    for a, b in zip(jax.tree.leaves(one.masks), jax.tree.leaves(eight.masks)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    assert one.report["density"] == eight.report["density"]


def test_pruned_params_have_exact_zeros_where_masks_prune():
    cfg = tiny(2)
    v, c = setup(cfg)
    r = run(cfg, v, c, method="sparsegpt", nm="2:4")
    flat_m = dict(jax.tree_util.tree_leaves_with_path(r.masks))
    for kp, w in jax.tree_util.tree_leaves_with_path(r.params):
        if kp in flat_m:
            m = np.asarray(flat_m[kp])
            assert np.all(np.asarray(w)[~m] == 0.0)
            assert np.all(m.reshape(-1, 4, m.shape[-1]).sum(1) == 2)
    assert r.report["density"] == 0.5
    assert r.masks["lm_head"]["kernel"] is None and r.masks["embed"]["embedding"] is None


def test_owl_block_densities_average_to_the_target():
    config_lib.parse_gin([], ["OWL.outlier_multiple=2.0"])  # a random model has few outliers
    cfg = tiny(3)
    v, c = setup(cfg)
    r = run(cfg, v, c, method="wanda", allocation="owl", sparsity=0.6)
    d = [b["density"] for b in r.report["blocks"]]
    assert len(set(d)) == 3 and max(d) - min(d) == pytest.approx(0.16)  # 2 * OWL.lam
    assert np.mean(d) == pytest.approx(0.4)  # blocks of equal size
    assert all(b["outlier_ratio"] is not None for b in r.report["blocks"])
    for layer in r.report["layers"]:
        blk = r.report["blocks"][int(layer["path"].split("/")[0][6:])]
        assert layer["target_density"] == pytest.approx(blk["density"], abs=1e-6)


def test_global_magnitude_is_one_ranking_over_all_layers():
    cfg = tiny(2)
    v, c = setup(cfg)
    r = run(cfg, v, c, method="magnitude", structure="global", sparsity=0.7)
    w = [np.abs(np.asarray(x)).ravel() for kp, x in jax.tree_util.tree_leaves_with_path(
        v["params"]) if "layer_" in str(kp) and "norm" not in str(kp)]
    allw = np.concatenate(w)
    kept = int(round(0.3 * allw.size))
    thresh = np.sort(allw)[::-1][kept - 1]
    for m, x in zip(jax.tree.leaves(r.masks), [x for kp, x in jax.tree_util.tree_leaves_with_path(
            v["params"]) if "layer_" in str(kp) and "norm" not in str(kp)]):
        np.testing.assert_array_equal(np.asarray(m), np.abs(np.asarray(x)) >= thresh)


@pytest.mark.parametrize("kw,match", [
    (dict(sparsity=1.0), r"PruneConfig.sparsity=1.0 must be in \(0, 1\)"),
    (dict(sparsity=0.0), r"PruneConfig.sparsity=0.0 must be in \(0, 1\)"),
    (dict(nm="3:5"), r"params\['layer_0/attn/key'\]: dimension -2 of shape \(16, 8\) has size "
                     r"16, not divisible by M=5"),
    (dict(nm="2:4", sparsity=0.7), "conflicts with PruneConfig.nm"),
    (dict(method="gblm"), "needs none|has none"),
    (dict(method="wanda", structure="global"), "not available for PruneConfig.method='wanda'"),
    (dict(method="wanda", calibration_batch_size=3), "multiple of the data-parallel size 8"),
    (dict(experts="merge", num_experts=2), "the model has no MoE layer"),
    (dict(experts="merge", num_experts=1, moe=True), r"num_experts=1 is below MoeMlp.top_k=2"),
    (dict(experts="reap", num_experts=2, drop_experts=("0:1",), moe=True),
     r"drop_experts names layer 0, which is not an MoE layer; MoE layers: \[1\]"),
    (dict(experts="reap", num_experts=2, drop_experts=("1:7",), moe=True),
     r"names expert 7 of layer 1; valid: 0..3"),
    (dict(method="nonesuch"), "is not a registered post-training pruner"),
    (dict(allocation="owl", nm="2:4"), "needs per-layer densities"),
])
def test_bad_settings_fail_before_any_work(kw, match):
    kw = dict(kw)
    if kw.pop("moe", False):
        config_lib.parse_gin([], ["MoeMlp.num_experts=4", "MoeMlp.top_k=2", "MoeMlp.mlp_dim=8"])
    cfg = tiny(2, mlp_kinds=("dense", "moe")) if "num_experts" in kw and kw["num_experts"] != 2 \
        or "drop_experts" in kw else tiny(2)
    v, c = setup(cfg)
    with pytest.raises(ValueError, match=match):
        prune_model(cfg, v["params"], None, c, PruneConfig(**kw), mesh=make_mesh(),
                    valid=padded_params(cfg), batch_size=8, loss_fn=None)


def test_gblm_scores_with_per_sequence_gradients_of_the_loss():
    import optax
    from sparsejax.sparsity.posttrain import gradients
    cfg = tiny(2)
    v, c = setup(cfg)
    model = Transformer(cfg)

    def loss(params, rows):
        logits = model.apply({"params": params}, rows["inputs"], rows["positions"],
                             rows["segment_ids"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, rows["targets"])
        return jnp.sum(ce * rows["loss_mask"]) / jnp.sum(rows["loss_mask"])

    masks = jax.tree.map(lambda x: None, v["params"])
    masks["layer_0"]["mlp"]["wo"]["kernel"] = jnp.ones((32, 16), bool)
    got = gradients.grad_sq_sums(loss, v["params"], c.rows(), masks)
    per_row = jax.vmap(lambda r: jax.grad(loss)(v["params"], jax.tree.map(lambda a: a[None], r))
                       )(jax.tree.map(jnp.asarray, c.rows()))
    want = np.sum(np.asarray(per_row["layer_0"]["mlp"]["wo"]["kernel"], np.float64) ** 2, 0)
    np.testing.assert_allclose(got["layer_0"]["mlp"]["wo"]["kernel"], want, rtol=1e-4,
                               atol=1e-10)
    # scale 0 leaves Wanda's ranking (the score with gradients is checked in test_scores.py)
    config_lib.parse_gin([], ["GBLM.scale=0.0"])
    flat = lambda r: np.concatenate([np.asarray(m).ravel() for m in jax.tree.leaves(r.masks)])
    wanda = run(cfg, v, c, method="wanda")
    g0 = prune_model(cfg, v["params"], None, c, PruneConfig(method="gblm"),
                     mesh=make_mesh(num_devices=1), valid=padded_params(cfg), batch_size=4,
                     loss_fn=loss)
    np.testing.assert_array_equal(flat(g0), flat(wanda))
    assert g0.report["solver_settings"]["gblm"]["scale"] == 0.0


def test_super_experts_are_kept_by_default_and_drop_experts_are_dropped():
    config_lib.parse_gin([], ["MoeMlp.num_experts=4", "MoeMlp.top_k=2", "MoeMlp.mlp_dim=8"])
    cfg = tiny(2, mlp_kinds=("dense", "moe"))
    v, c = setup(cfg)
    kw = dict(method=None, experts="frequency", num_experts=2)
    off = run(cfg, v, c, protect_super_experts=False, **kw).report["experts"][0]
    counts = np.array(off["routed_tokens"])
    least = int(np.argsort(counts, kind="stable")[0])
    assert [least] not in off["groups"] and off["protected"] == [] and "super_experts" not in off
    # the least used expert's outputs become massive: a super expert, kept by default
    params = jax.tree.map(lambda a: a, v["params"])
    wo = params["layer_1"]["moe"]["experts"]["wo"]
    params["layer_1"]["moe"]["experts"]["wo"] = wo.at[least].multiply(1000.0)
    v2 = {**v, "params": params}
    on = run(cfg, v2, c, **kw).report["experts"][0]
    assert on["routed_tokens"] == off["routed_tokens"]  # routing of layer 1 is unchanged
    assert on["protected"] == on["super_experts"]["candidates"] == [least]
    assert [least] in on["groups"] and len(on["groups"]) == 2
    assert on["super_experts"]["ratio_to_median"][least] > 100
    off2 = run(cfg, v2, c, protect_super_experts=False, **kw).report["experts"][0]
    assert off2["groups"] == off["groups"]
    keep = sorted(np.argsort(-counts, kind="stable")[:2].tolist())
    dropped = run(cfg, v, c, drop_experts=(f"1:{keep[0]}",), protect_super_experts=False,
                  **kw).report["experts"][0]
    assert dropped["dropped"] == [keep[0]] and [keep[0]] not in dropped["groups"]


def test_fewer_calibration_samples_than_half_a_batch():
    """The last batch is padded with weight-0 rows, also when it needs more than N of them."""
    cfg = tiny(2)
    v, c = setup(cfg)
    few = CalibrationSet(*(a[:2] for a in (c.inputs, c.targets, c.loss_mask, c.positions,
                                           c.segment_ids)))
    r = prune_model(cfg, v["params"], None, few, PruneConfig(method="wanda"),
                    mesh=make_mesh(num_devices=8), valid=padded_params(cfg), batch_size=8)
    assert r.report["calibration"]["tokens"] == 2 * S
    assert r.report["density"] == pytest.approx(0.5, abs=0.01)
