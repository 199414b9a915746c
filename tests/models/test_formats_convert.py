"""models/formats/convert.py: a compact model's dense twin computes the same logits, and
the conversion back is exact, scanned or not; params without their layout are refused."""
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.models.formats.convert import (compact_projections, dense_twin,
                                              from_dense_params, to_dense_params)
from sparsejax.models.transformer import ModelConfig, Transformer
from sparsejax.sparsity.layout import split_layout

TINY = dict(num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
            max_seq_len=32)
TOKENS = jnp.asarray(np.arange(24, dtype=np.int32)[None] * 7 % 250)


def init(cfg):
    params = Transformer(cfg).init(jax.random.key(1), TOKENS)["params"]
    return jax.device_get(nn.meta.unbox(params))


@pytest.mark.parametrize("fmt,scan", [("block_sparse", False), ("block_sparse", True),
                                      ("monarch", False)])
def test_the_dense_twin_computes_the_same_logits_and_converts_back(fmt, scan):
    for k, v in dict(block_in=16, block_out=16, density=0.5).items():
        gin.bind_parameter(f"BlockSparse.{k}", v)
    cfg = ModelConfig(**TINY, weight_format=fmt, scan_layers=scan)
    params = init(cfg)
    assert len(compact_projections(cfg)) == (7 if scan else 14)  # per block group / layer
    dense = to_dense_params(params, cfg)
    twin = Transformer(dense_twin(cfg))
    assert jax.tree.structure(dense) == jax.tree.structure(init(dense_twin(cfg)))
    np.testing.assert_allclose(twin.apply({"params": dense}, TOKENS),
                               Transformer(cfg).apply({"params": params}, TOKENS),
                               atol=1e-5, rtol=1e-5)
    if fmt == "block_sparse":  # exact both ways; zeros outside the stored blocks
        kernel = np.asarray(dense["layers"]["block_0"]["mlp"]["wi_gate"]["kernel"] if scan
                            else dense["layer_0"]["mlp"]["wi_gate"]["kernel"])
        assert (kernel == 0).mean() == pytest.approx(0.5)
        back = from_dense_params(dense, cfg)
        assert jax.tree.structure(back) == jax.tree.structure(params)
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_params_without_their_layout_are_refused():
    gin.bind_parameter("BlockSparse.block_in", 16)
    gin.bind_parameter("BlockSparse.block_out", 16)
    cfg = ModelConfig(**TINY, weight_format="block_sparse")
    weights, _ = split_layout(init(cfg))
    with pytest.raises(ValueError, match=r"lack \['indices'\].*layout merged in"):
        to_dense_params(weights, cfg)


def test_a_kernel_whose_fan_in_differs_from_the_format_is_refused():
    gin.bind_parameter("BlockSparse.block_in", 16)
    gin.bind_parameter("BlockSparse.block_out", 16)
    gin.bind_parameter("BlockSparse.density", 0.5)
    cfg = ModelConfig(**TINY, weight_format="block_sparse")
    dense = jax.tree.map(np.array, to_dense_params(init(cfg), cfg))
    dense["layer_0"]["mlp"]["wo"]["kernel"][:] = 1.0  # every block nonzero: fan-in 8, not 4
    with pytest.raises(ValueError, match=r"layer_0/mlp/wo/values: .*shape \(4, 8, 16, 16\).*"
                                         r"\(4, 4, 16, 16\)"):
        from_dense_params(dense, cfg)
