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


class TwoLayer(nn.Module):
    """Two MoE layers (or two dense MLPs) named like the transformer's."""
    moe: bool

    @nn.compact
    def __call__(self, x):
        for i in range(2):
            if self.moe:
                x = x + MoeMlp(embed_dim=16, mlp_dim=40, num_experts=4, top_k=2,
                               name=f"layer_{i}_moe")(x)
            else:
                x = x + GatedMlp(16, 40, name=f"layer_{i}_mlp")(x)
        return x


def _upcycle_two_layers(fraction, rng=3):
    x = jnp.ones((1, 2, 16))
    dense = nn.unbox(TwoLayer(moe=False).init(jax.random.key(1), x)["params"])
    # name the dense MLPs like the MoE layers' paths expect: prefix/<mlp>, prefix/<moe>
    dense = {f"layer_{i}": {"mlp": dense[f"layer_{i}_mlp"]} for i in range(2)}
    template = nn.unbox(TwoLayer(moe=True).init(jax.random.key(2), x)["params"])
    template = {f"layer_{i}": {"moe": template[f"layer_{i}_moe"]} for i in range(2)}
    out = upcycle_params(dense, template, jax.random.key(rng), reinit_fraction=fraction)
    return dense, out


@pytest.mark.parametrize("fraction", [0.25, 0.5, 1.0])
def test_drop_upcycling_reinitializes_the_fraction_per_expert(fraction):
    """floor(r * mlp_dim) intermediate dims per expert re-drawn (the same dims in wi_gate,
    wi_up columns and wo rows), the rest an exact copy; different dims per expert and per
    layer; the new entries have the dense matrix's mean and std."""
    dense, out = _upcycle_two_layers(fraction)
    n = int(fraction * 40)
    sets = []
    for i in range(2):
        d, e = dense[f"layer_{i}"]["mlp"], out[f"layer_{i}"]["moe"]["experts"]
        for j in range(4):
            changed = {}
            for name, axis in (("wi_gate", 0), ("wi_up", 0), ("wo", 1)):
                dk, ek = np.asarray(d[name]["kernel"]), np.asarray(e[name][j])
                same = np.all(dk == ek, axis=axis)  # per intermediate dim
                changed[name] = ~same
                new = ek[:, ~same] if axis == 0 else ek[~same, :]
                if fraction == 1.0:  # enough entries to compare the statistics
                    np.testing.assert_allclose(new.mean(), dk.mean(), atol=0.1 * dk.std())
                    np.testing.assert_allclose(new.std(), dk.std(), rtol=0.15)
            assert changed["wi_gate"].sum() == n, (i, j)
            np.testing.assert_array_equal(changed["wi_gate"], changed["wi_up"])
            np.testing.assert_array_equal(changed["wi_gate"], changed["wo"])
            sets.append(frozenset(np.flatnonzero(changed["wi_gate"])))
    if fraction < 1.0:
        assert len(set(sets)) == len(sets), "two experts re-initialized the same dims"
    # different rng: different dims; fraction 0 (the default): plain copies
    _, other = _upcycle_two_layers(fraction, rng=4)
    if fraction < 1.0:
        assert not np.array_equal(other["layer_0"]["moe"]["experts"]["wo"],
                                  out["layer_0"]["moe"]["experts"]["wo"])
    _, plain = _upcycle_two_layers(0.0)
    np.testing.assert_array_equal(plain["layer_1"]["moe"]["experts"]["wi_up"][2],
                                  dense["layer_1"]["mlp"]["wi_up"]["kernel"])


def test_reinit_fraction_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match=r"upcycle_params.reinit_fraction=1.5 must be in \[0, 1\]"):
        _upcycle_two_layers(1.5)
