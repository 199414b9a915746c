"""The block-sparse fan-in spread over a model's projections by a distribution (ERK etc.)."""
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.models.formats import FormatSpec
from sparsejax.models.formats.block_sparse import BlockSparse, fan_in
from sparsejax.models.transformer import ModelConfig, Transformer, projection_shapes
from sparsejax.models.layer_stack import unstack_layers, layer_period
from sparsejax.sparsity.distributions import erk
from sparsejax.sparsity.layout import stored_density
from sparsejax.train.build import compact_projections
from sparsejax.train.warm_start import convert_to_formats

SMALL = dict(num_layers=2, embed_dim=128, num_heads=4, num_kv_heads=2, head_dim=32,
             mlp_dim=512, max_seq_len=16)


def bind(block=16, density=0.2, distribution="erk"):
    for name, value in (("block_in", block), ("block_out", block), ("density", density),
                        ("distribution", distribution)):
        gin.bind_parameter(f"BlockSparse.{name}", value)


def stored(shapes, ks, block):
    return sum(ks[p] * (o // block) * block * block for p, (_, o) in shapes.items()) / sum(
        i * o for i, o in shapes.values())


def test_erk_fan_in_keeps_the_overall_density_and_favours_small_layers():
    shapes = {"a": (128, 128), "b": (128, 512), "c": (512, 128), "d": (1024, 1024)}
    ks = fan_in(shapes, 0.2, "erk", 16, 16)
    assert stored(shapes, ks, 16) == pytest.approx(0.2, abs=0.01)
    dens = {p: ks[p] / (shapes[p][0] // 16) for p in shapes}
    assert dens["a"] > dens["b"] > dens["d"]  # ERK: (in + out) / (in * out)
    ref = erk(shapes, 0.2)  # the unrounded densities, where no floor binds
    for p in shapes:
        exact = ref[p] * (shapes[p][0] // 16)
        assert ks[p] in (max(1, np.floor(exact)), np.ceil(exact))  # rounded to the budget


def test_a_layer_that_needs_one_block_takes_it_from_the_others_share():
    # 16-blocks: 'narrow' has 2 input blocks and an ERK share below half a block: it keeps 1
    shapes = {"narrow": (32, 1024), "wide": (4096, 4096)}
    d = 0.004
    ks = fan_in(shapes, d, "erk", 16, 16)
    assert erk(shapes, d)["narrow"] * 2 < 0.5 and ks["narrow"] == 1
    # the wide layer gets what is left of the budget, not its own ERK share
    left = d * (32 * 1024 + 4096 * 4096) - 0.5 * 32 * 1024
    assert ks["wide"] == max(1, round(left / (4096 * 4096) * 256))
    # a density below every floor stores one block per column everywhere
    assert fan_in(shapes, 1e-5, "erk", 16, 16) == {"narrow": 1, "wide": 1}


def test_uniform_plans_nothing_and_keeps_the_per_layer_rule():
    bind(distribution="uniform")
    fmt = BlockSparse()
    assert not fmt.plans_layers and fmt.plan({"a": (128, 128)}) == {}
    assert fmt.blocks(128, 128) == (8, 8, 2)  # round(0.2 * 8)
    assert fmt.at(5).blocks(128, 128) == (8, 8, 5)


def test_bad_distribution_is_refused_by_name():
    with pytest.raises(ValueError, match="BlockSparse.distribution"):
        BlockSparse(distribution="gaussian")


def test_the_model_plans_its_fan_ins_at_init_in_either_layout():
    bind(density=0.2)
    cfg = ModelConfig(**SMALL, weight_format="block_sparse")
    shapes = projection_shapes(cfg)
    assert shapes["layer_0/mlp/wo"] == (512, 128) and shapes["lm_head"] == (128, 384)
    want = fan_in({p: s for p, s in shapes.items() if p != "lm_head"}, 0.2, "erk", 16, 16)
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = nn.meta.unbox(Transformer(cfg).init(jax.random.key(0), tokens)["params"])
    for path, k in want.items():
        layer, kind, name = path.split("/")
        assert params[layer][kind][name]["indices"].shape[1] == k, path
    assert len(set(want.values())) > 1  # the layers really differ
    frac = stored_density(compact_projections(cfg))
    assert frac == pytest.approx(0.2, abs=0.01)
    # scanned: the same draw, stacked (layouts never change the numbers)
    scfg = ModelConfig(**SMALL, weight_format="block_sparse", scan_layers=True)
    sparams = nn.meta.unbox(Transformer(scfg).init(jax.random.key(0), tokens)["params"])
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(
            unstack_layers(sparams, layer_period(scfg)))):
        np.testing.assert_array_equal(a, b)
    assert stored_density(compact_projections(scfg)) == frac
    # the planned model applies (its shapes come from the params)
    logits = Transformer(scfg).apply({"params": sparams}, tokens)
    assert logits.shape == (1, 8, 259) and bool(jnp.all(jnp.isfinite(logits)))


def test_overrides_plan_only_their_projections():
    bind(density=0.2)
    cfg = ModelConfig(**SMALL, weight_format_overrides={"mlp": "block_sparse"})
    spec = cfg.formats().planned(projection_shapes(cfg))
    assert {p.split("/")[1] for p, _ in spec.plans} == {"mlp"}
    assert isinstance(spec, FormatSpec) and spec.format("layer_0/attn/query").plans_layers is False


def test_a_warm_start_projects_onto_the_planned_fan_in():
    bind(density=0.2)
    cfg = ModelConfig(**SMALL, weight_format="block_sparse")
    tokens = jnp.zeros((1, 8), jnp.int32)
    template = nn.meta.unbox(Transformer(cfg).init(jax.random.key(0), tokens)["params"])
    dense = nn.meta.unbox(Transformer(ModelConfig(**SMALL)).init(
        jax.random.key(1), tokens)["params"])
    out = convert_to_formats(dense, template)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(template)):
        assert a.shape == b.shape
