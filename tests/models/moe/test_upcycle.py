"""Sparse upcycling: the upcycled model's first forward pass equals the dense model."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.models.layers import GatedMlp
from sparsejax.models.moe.layer import MoeMlp
from sparsejax.models.moe.upcycle import upcycle_params


class Tiny(nn.Module):
    moe: bool
    mlp_dim: int = 32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(16, name="proj")(x)
        if self.moe:
            h = MoeMlp(embed_dim=16, mlp_dim=self.mlp_dim, num_experts=4, top_k=2,
                       name="moe")(x)
        else:
            h = GatedMlp(16, self.mlp_dim, name="mlp")(x)
        return x + h


def test_upcycled_equals_dense():
    x = jax.random.normal(jax.random.key(0), (2, 4, 16))
    dense_params = Tiny(moe=False).init(jax.random.key(1), x)["params"]
    template = Tiny(moe=True).init(jax.random.key(2), x)["params"]
    moe_params = upcycle_params(dense_params, template, jax.random.key(3))
    y_dense = Tiny(moe=False).apply({"params": dense_params}, x)
    y_moe = Tiny(moe=True).apply({"params": moe_params}, x)
    np.testing.assert_allclose(y_moe, y_dense, rtol=1e-5, atol=1e-5)
    # router freshly initialized from rng (not the template's), and boxes kept
    assert moe_params["moe"]["router_kernel"].names == ("embed", "expert")
    assert not np.allclose(nn.unbox(moe_params["moe"]["router_kernel"]),
                           nn.unbox(template["moe"]["router_kernel"]))


def test_upcycle_shape_mismatch():
    x = jnp.ones((1, 2, 16))
    dense_params = Tiny(moe=False, mlp_dim=24).init(jax.random.key(1), x)["params"]
    template = Tiny(moe=True).init(jax.random.key(2), x)["params"]
    with pytest.raises(ValueError, match="mlp/wi_gate.*shape \\(16, 24\\)"):
        upcycle_params(dense_params, template, jax.random.key(3))
