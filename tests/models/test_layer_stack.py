"""Scanned layers: the scanned model computes the unscanned one's function on converted params
(homogeneous and heterogeneous patterns), trains to the same losses and masks, converts both
ways through warm starts, HF import/export and the KV cache, and refuses a pattern that does
not repeat into num_layers."""
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax.models.moe.layer  # noqa: F401  (registers MoeMlp with gin)
from sparsejax import config
from sparsejax.models import layer_stack as ls
from sparsejax.models.transformer import ModelConfig, Transformer
from sparsejax.parallel.mesh import make_mesh
from sparsejax.parallel.rules import LOGICAL_RULES
from sparsejax.train.build import build_run
from sparsejax.train.trainer import TrainConfig

SMALL = dict(embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64, max_seq_len=32)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 259, (2, 16)), jnp.int32)
RTOL = 2e-5  # float32: the scan reorders nothing, but XLA fuses differently


def init_params(cfg):
    keys = {"params": jax.random.key(0), "router": jax.random.key(0)}
    return nn.unbox(jax.jit(Transformer(cfg).init)(keys, TOKENS))["params"]


def apply(cfg, params):
    fn = jax.jit(lambda p: Transformer(cfg).apply({"params": p}, TOKENS, mutable=["metrics"]))
    return fn(params)


@pytest.fixture(autouse=True)
def small_moe():
    gin.bind_parameter("MoeMlp.num_experts", 4)
    gin.bind_parameter("MoeMlp.mlp_dim", 16)


@pytest.mark.parametrize("kinds", [
    dict(num_layers=4, mlp_kinds=("dense", "moe")),
    dict(num_layers=6, mlp_kinds=("moe", "dense"), attention_kinds=("dense", "dense", "block_sparse"),
         sparse_attention_mask={"kind": "sliding_window", "window": 8, "block_size": 8}),
], ids=["dense-moe", "period6"])
def test_scanned_model_computes_the_unscanned_function(kinds):
    cfg = ModelConfig(**SMALL, **kinds)
    scfg = ModelConfig(**SMALL, **kinds, scan_layers=True)
    params = init_params(cfg)
    stacked = ls.stack_layers(params, ls.layer_period(cfg))
    template = init_params(scfg)
    assert jax.tree.structure(stacked) == jax.tree.structure(template)
    assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(jnp.shape, template)
    n_groups = cfg.num_layers // ls.layer_period(cfg)
    assert all(x.shape[0] == n_groups for x in jax.tree.leaves(stacked["layers"]))
    # layer i is block i % period at index i // period
    p, i = ls.layer_period(cfg), cfg.num_layers - 1
    np.testing.assert_array_equal(stacked["layers"][f"block_{i % p}"]["attn"]["query"][i // p],
                                  params[f"layer_{i}"]["attn"]["query"])
    back = ls.unstack_layers(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)))
    want, mw = apply(cfg, params)
    got, mg = apply(scfg, stacked)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL)
    # sown metrics come back per layer under the same names
    mg = ls.unstack_layers(mg, p)
    assert jax.tree.structure(mg) == jax.tree.structure(mw)


@pytest.mark.parametrize("kinds, period", [
    (dict(num_layers=3, mlp_kinds=("dense", "moe")), 2),
    (dict(num_layers=4, attention_kinds=("dense", "dense", "block_sparse")), 3),
])
def test_pattern_that_does_not_repeat_into_num_layers_is_refused(kinds, period):
    with pytest.raises(ValueError, match=rf"scan_layers=True.*repeats every {period} layers.*"
                                         rf"num_layers={kinds['num_layers']}"):
        ModelConfig(**SMALL, **kinds, scan_layers=True)
    ModelConfig(**SMALL, **kinds)  # fine unscanned


def test_stack_layers_of_trees_with_blocks_absent_and_boxes():
    """A block may be absent from every group (the MoE state of a ('dense', 'moe') pattern
    holds odd layers only), not from some; partitioning boxes gain (and lose) the `layers`
    axis name, as nn.scan's init writes them."""
    a = {f"layer_{i}": {"bias": np.full(3, i, np.float32)} for i in (1, 3)}
    s = ls.stack_layers(a, 2)
    assert set(s["layers"]) == {"block_1"}
    np.testing.assert_array_equal(s["layers"]["block_1"]["bias"][:, 0], [1, 3])
    assert ls.unstack_layers(s, 2).keys() == a.keys()
    with pytest.raises(ValueError, match=r"block 1 is in some of the 2 groups only"):
        ls.stack_layers({"layer_0": 0, "layer_1": 1, "layer_2": 2}, 2)
    boxed = {f"layer_{i}": {"k": nn.LogicallyPartitioned(np.zeros((2, 3)), ("embed", "mlp"))}
             for i in range(4)}
    sb = ls.stack_layers(boxed, 2)["layers"]["block_0"]["k"]
    assert sb.names == ("layers", "embed", "mlp") and sb.value.shape == (2, 2, 3)
    back = ls.unstack_layers({"layers": {"block_0": {"k": sb}}}, 2)["layer_2"]["k"]
    assert back.names == ("embed", "mlp") and back.value.shape == (2, 3)


def test_scanned_training_with_gradual_pruning_matches_unscanned(train_losses):
    """GMP with updates every other step: the scanned run (params, Adam moments and masks
    stacked; the method sees per-layer trees) has the unscanned run's losses and masks."""
    config.parse_gin(["sparsity/gmp.gin"], ["PolynomialSchedule.frequency=2",
                                            "PolynomialSchedule.end=4",
                                            "PolynomialSchedule.start=0"])
    kinds = dict(**SMALL, num_layers=4, mlp_kinds=("dense", "moe"))
    cfg, scfg = ModelConfig(**kinds), ModelConfig(**kinds, scan_layers=True)
    params = init_params(cfg)
    lu, _, su, _ = train_losses(cfg, 5, params)
    ls_, _, ss, run = train_losses(scfg, 5, params)
    np.testing.assert_allclose(ls_, lu, rtol=1e-5)
    assert "layers" in ss.params and "layers" in ss.sparsity["masks"]
    masks_s = ls.unstack_layers(ss.sparsity["masks"])
    for a, b in zip(jax.tree.leaves(su.sparsity["masks"]), jax.tree.leaves(masks_s)):
        np.testing.assert_array_equal(a, b)
    assert float(np.mean([m.mean() for m in jax.tree.leaves(masks_s)])) < 0.9  # it pruned
    np.testing.assert_allclose(float(ss.sparsity["density"]), float(su.sparsity["density"]))
    for a, b in zip(jax.tree.leaves(su.params), jax.tree.leaves(ls.unstack_layers(ss.params))):
        np.testing.assert_allclose(b, a, atol=5e-6)
    # the per-layer density metrics keep their unscanned names
    with jax.set_mesh(run.mesh):
        names = run.layer_density_fn()(jax.device_put(ss, run.state_shardings))
    assert any(k.startswith("sparsity/density/layer_3/") for k in names), sorted(names)


def test_warm_start_converts_checkpoints_between_layouts(tmp_path):
    """A checkpoint of an unscanned run warm-starts a scanned one (mode='params') and back."""
    from sparsejax.train.checkpoint import Checkpointer
    from sparsejax.train.warm_start import warm_start
    kinds = dict(**SMALL, num_layers=4, mlp_kinds=("dense", "moe"))
    for src_scan, dst_scan in ((False, True), (True, False)):
        src_cfg = ModelConfig(**kinds, scan_layers=src_scan)
        run = build_run(TrainConfig(global_batch_size=4, seq_len=16), src_cfg,
                        make_mesh(num_devices=1))
        with jax.set_mesh(run.mesh), nn.logical_axis_rules(LOGICAL_RULES):
            state = run.init_state()
        src = tmp_path / f"src_{src_scan}"
        ckpt = Checkpointer(str(src / "checkpoints"), async_save=False)
        ckpt.save(1, state, None, {"step": 1})
        ckpt.close()
        dst = build_run(TrainConfig(global_batch_size=4, seq_len=16, seed=5),
                        ModelConfig(**kinds, scan_layers=dst_scan), make_mesh(num_devices=1))
        with jax.set_mesh(dst.mesh), nn.logical_axis_rules(LOGICAL_RULES):
            fresh = dst.init_state()
            started = warm_start(fresh, dst.state_shardings.params, from_workdir=str(src),
                                 mode="params")
        assert ls.is_stacked(started.params) == dst_scan
        want = ls.unstack_layers(jax.device_get(state.params))
        got = ls.unstack_layers(jax.device_get(started.params))
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
            np.testing.assert_array_equal(a, b)


def test_kv_cache_decode_scanned_matches_unscanned():
    from sparsejax.infer.generate import make_generate_fn, pad_prompts
    kinds = dict(**SMALL, num_layers=4, mlp_kinds=("dense", "moe"))
    cfg, scfg = ModelConfig(**kinds), ModelConfig(**kinds, scan_layers=True)
    params = init_params(cfg)
    tokens, positions, segs = pad_prompts([[5, 6, 7], [8, 9]], 0)
    out = []
    for c, p in ((cfg, params), (scfg, ls.stack_layers(params, 2))):
        fn = make_generate_fn(Transformer(c), 4, temperature=0.0, top_k=0, top_p=1.0)
        out.append(np.asarray(fn(p, None, tokens, positions, segs, jax.random.key(0))))
    np.testing.assert_array_equal(out[1], out[0])
