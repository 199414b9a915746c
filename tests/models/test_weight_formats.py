"""Weight formats: the dense format is nn.Dense exactly, overrides choose per projection,
block-sparse projections compute x @ to_dense(values, indices), and conversion between a
masked dense kernel and the compact format is exact both ways."""
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.models.formats import WEIGHT_FORMATS, FormatSpec, Projection
from sparsejax.models.formats.block_sparse import (BlockSparse, block_mask, block_norms,
                                                   gather_blocks)
from sparsejax.models.init import DEFAULT_KERNEL_INIT
from sparsejax.models.transformer import ModelConfig, Transformer
from sparsejax.sparsity.layout import merge_layout, split_layout

TINY = dict(num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
            max_seq_len=32)


def init_params(cfg, seed=0):
    tokens = jnp.zeros((2, 8), jnp.int32)
    return nn.meta.unbox(Transformer(cfg).init(jax.random.key(seed), tokens)["params"])


def bind_blocks(bi=16, bo=16, density=0.25, init="random"):
    gin.bind_parameter("BlockSparse.block_in", bi)
    gin.bind_parameter("BlockSparse.block_out", bo)
    gin.bind_parameter("BlockSparse.density", density)
    gin.bind_parameter("BlockSparse.init", init)


def test_dense_format_is_nn_dense_bitwise():
    x = jax.random.normal(jax.random.key(1), (10, 24))
    proj = Projection(40, ("embed", "mlp"), use_bias=True)
    ref = nn.Dense(40, use_bias=True)
    pv = nn.meta.unbox(proj.init(jax.random.key(0), x))
    rv = ref.init(jax.random.key(0), x)
    assert jax.tree.structure(pv) == jax.tree.structure(rv)
    for a, b in zip(jax.tree.leaves(pv), jax.tree.leaves(rv)):
        np.testing.assert_array_equal(a, b)
    rv = jax.tree.map(lambda a: a + 0.5, rv)  # a nonzero bias too
    np.testing.assert_array_equal(proj.apply(rv, x), ref.apply(rv, x))


def test_default_model_params_are_unchanged_by_the_format_machinery():
    params = init_params(ModelConfig(**TINY))
    assert set(params["layer_0"]["attn"]) == {"query", "key", "value", "out"}
    assert set(params["layer_0"]["mlp"]["wi_gate"]) == {"kernel"}
    assert set(params["lm_head"]) == {"kernel"}


def test_block_sparse_everywhere_but_the_lm_head_unless_asked():
    bind_blocks()
    params = init_params(ModelConfig(**TINY, weight_format="block_sparse"))
    for layer in ("layer_0", "layer_1"):
        for proj in ("query", "key", "value", "out"):
            assert set(params[layer]["attn"][proj]) == {"values", "indices"}
        for proj in ("wi_gate", "wi_up", "wo"):
            assert set(params[layer]["mlp"][proj]) == {"values", "indices"}
    # wi_gate: [64 -> 128], 16x16 blocks: 4 input blocks, density 0.25 -> k = 1
    assert params["layer_0"]["mlp"]["wi_gate"]["values"].shape == (8, 1, 16, 16)
    assert params["layer_0"]["mlp"]["wo"]["indices"].shape == (4, 2)
    assert set(params["lm_head"]) == {"kernel"}
    gin.clear_config()
    bind_blocks()
    params = init_params(ModelConfig(**TINY, weight_format_overrides={"mlp/wi_": "block_sparse",
                                                                      "lm_head": "block_sparse"}))
    assert set(params["layer_1"]["mlp"]["wi_up"]) == {"values", "indices"}
    assert set(params["layer_1"]["mlp"]["wo"]) == {"kernel"}
    assert set(params["layer_1"]["attn"]) == {"query", "key", "value", "out"}
    assert set(params["lm_head"]) == {"values", "indices"}


def test_block_sparse_model_computes_its_dense_twin():
    """The compact model's logits equal those of the dense model whose kernels are
    to_dense(values, indices): the format changes the storage, not the function."""
    bind_blocks(bi=16, bo=32, density=0.5)
    cfg = ModelConfig(**TINY, weight_format="block_sparse")
    params = init_params(cfg)
    fmt = BlockSparse()
    dense_params = jax.tree.map(lambda x: x, params)
    for layer in ("layer_0", "layer_1"):
        for group, names in (("attn", ("query", "key", "value", "out")),
                             ("mlp", ("wi_gate", "wi_up", "wo"))):
            for name in names:
                p = params[layer][group][name]
                in_features = TINY["embed_dim"] if name not in ("out", "wo") else (
                    TINY["mlp_dim"] if name == "wo" else 64)
                kernel = fmt.to_dense(p, in_features)
                dense_params[layer][group][name] = (
                    kernel if group == "attn" else {"kernel": kernel})
    tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, 259)
    got = Transformer(cfg).apply({"params": params}, tokens)
    want = Transformer(ModelConfig(**TINY)).apply({"params": dense_params}, tokens)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("init", ["random", "magnitude"])
def test_layout_at_init(init):
    """k distinct input blocks per column, whose values are the blocks of the dense layer's
    initial draw; 'magnitude' keeps the blocks of largest Frobenius norm in each column."""
    fmt = BlockSparse(block_in=8, block_out=16, density=0.4, init=init)
    values, idx = fmt.draw(jax.random.key(0), 40, 64, jnp.float32, None)
    assert idx.shape == (4, 2) and values.shape == (4, 2, 8, 16)
    assert all(len(set(row)) == 2 for row in np.asarray(idx).tolist())
    kernel = DEFAULT_KERNEL_INIT(jax.random.split(jax.random.key(0))[0], (40, 64), jnp.float32)
    np.testing.assert_array_equal(values, gather_blocks(kernel, idx, 8, 16))
    if init == "magnitude":
        norms = np.asarray(block_norms(kernel, 8, 16))  # [in_blocks, out_blocks]
        for o, row in enumerate(np.asarray(idx)):
            assert set(row) == set(np.argsort(-norms[:, o])[:2]), o


def test_conversion_round_trips_exactly():
    fmt = BlockSparse(block_in=8, block_out=4, density=0.5)
    rng = np.random.default_rng(0)
    idx = jnp.asarray(np.stack([np.sort(rng.choice(6, 3, replace=False)) for _ in range(5)]),
                      jnp.int32)
    values = jnp.asarray(rng.normal(size=(5, 3, 8, 4)).astype(np.float32))
    kernel = fmt.to_dense({"values": values, "indices": idx}, 48)
    mask = block_mask(idx, 48, 8, 4)
    np.testing.assert_array_equal(kernel != 0, mask)
    back = fmt.from_dense(kernel)  # layout read from the nonzero blocks
    np.testing.assert_array_equal(back["indices"], idx)
    np.testing.assert_array_equal(back["values"], values)
    back = fmt.from_dense(kernel * mask, mask=mask)
    np.testing.assert_array_equal(back["values"], values)
    np.testing.assert_array_equal(fmt.to_dense(back, 48), kernel)


def test_conversion_refuses_what_it_would_lose():
    fmt = BlockSparse(block_in=4, block_out=4, density=0.5)
    kernel = np.zeros((8, 8), np.float32)
    kernel[0, 0] = kernel[4, 4] = kernel[0, 5] = 1.0  # column block 1 has 2 blocks, 0 has 1
    with pytest.raises(ValueError, match="constant fan-in"):
        fmt.from_dense(kernel)
    with pytest.raises(ValueError, match="outside the blocks"):
        fmt.from_dense(kernel, indices=np.array([[0], [1]], np.int32))


def test_split_and_merge_layout():
    bind_blocks()
    params = init_params(ModelConfig(**TINY, weight_format_overrides={"wo": "block_sparse"}))
    weights, layout = split_layout(params)
    assert not any(jnp.issubdtype(x.dtype, jnp.integer) for x in jax.tree.leaves(weights))
    assert set(layout) == {"layer_0", "layer_1"}
    assert set(layout["layer_0"]["mlp"]["wo"]) == {"indices"}
    merged = merge_layout(weights, layout)
    assert jax.tree.structure(merged) == jax.tree.structure(params)


@pytest.mark.parametrize("kwargs, match", [
    (dict(weight_format="sparse"), "ModelConfig.weight_format='sparse'"),
    (dict(weight_format_overrides={"mlp": "nope"}), r"weight_format_overrides\['mlp'\]"),
    (dict(weight_format_overrides={"(": "dense"}), "not a valid regex"),
    (dict(weight_format_overrides=["mlp"]), "must be a dict"),
])
def test_bad_format_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**TINY, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_in=0), "BlockSparse.block_in=0"),
    (dict(density=0.0), "BlockSparse.density"),
    (dict(init="top"), "BlockSparse.init='top'"),
])
def test_bad_block_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockSparse(**kwargs)


def test_block_size_must_divide_the_projection():
    bind_blocks(bi=24, bo=16)
    with pytest.raises(ValueError, match="BlockSparse.block_in=24 does not divide"):
        init_params(ModelConfig(**TINY, weight_format="block_sparse"))


def test_registry_lists_the_shipped_formats():
    assert {"dense", "block_sparse"} <= set(WEIGHT_FORMATS.names())
    assert FormatSpec("block_sparse").format_at("layer_0/mlp/wo") == "block_sparse"
    assert FormatSpec("block_sparse").format_at("lm_head") == "dense"
