"""MoeMlp end to end: gin examples, bad input, mesh-invariant losses, bias update, EP path."""
import os

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from sparsejax.models.moe.layer import MoeMlp, num_active_params

import sparsejax.models.transformer  # noqa: F401  (registers ModelConfig, bound by the configs)

GIN_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "..", "configs", "moe")
ROUTER_CONFIGS = ["switch_top1.gin", "top2.gin", "shared_sigmoid_auxfree.gin", "expert_choice.gin",
                  "relu_router.gin"]
X = jax.random.normal(jax.random.key(0), (2, 8, 16))


def _apply(layer, x=X, deterministic=True, variables=None):
    variables = variables or layer.init(jax.random.key(1), x)
    y, state = layer.apply(variables, x, deterministic=deterministic,
                           mutable=["aux_loss", "metrics", "moe_state"],
                           rngs={"dropout": jax.random.key(2)})
    return y, state, variables


@pytest.mark.parametrize("path", [os.path.join(GIN_DIR, n) for n in ROUTER_CONFIGS],
                         ids=os.path.basename)
def test_gin_examples_build_and_apply(path):
    gin.clear_config()
    try:
        gin.parse_config_file(path)
        layer = MoeMlp(embed_dim=16)
        y, state, variables = _apply(layer, deterministic=False)
    finally:
        gin.clear_config()
    assert y.shape == X.shape and bool(jnp.all(jnp.isfinite(y)))
    load = state["metrics"]["expert_load"][0]
    assert load.shape == (layer.num_experts,)
    np.testing.assert_allclose(jnp.sum(load), 1.0, rtol=1e-5)
    assert "router_kernel" in variables["params"]
    assert len(jax.tree.leaves(state["aux_loss"])) >= 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_k=9), "top_k=9"),
    (dict(capacity_factor=0.0), "capacity_factor=0.0"),
    (dict(router="hash"), "router='hash'"),
    (dict(dispatch="magic"), "dispatch='magic'"),
    (dict(load_balance_normalization="mixtral"), "load_balance_normalization='mixtral'.*tokens"),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoeMlp(embed_dim=16, mlp_dim=8, **kwargs).init(jax.random.key(0), X)


def _mesh(shape, names=("data", "expert")):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


def test_experts_not_divisible_by_expert_axis():
    with jax.set_mesh(_mesh((1, 8))):
        with pytest.raises(ValueError, match="num_experts=6"):
            MoeMlp(embed_dim=16, mlp_dim=8, num_experts=6).init(jax.random.key(0), X)


def test_expert_biases_refused_under_an_expert_mesh():
    with jax.set_mesh(_mesh((1, 8))):
        with pytest.raises(ValueError, match="MoeMlp.expert_bias=True is not supported with "
                                             "expert parallelism"):
            MoeMlp(embed_dim=16, mlp_dim=8, num_experts=8, expert_bias=True).init(
                jax.random.key(0), X)


def test_layer_under_expert_mesh_matches_single_device():
    """Same params: outputs, aux losses and metrics agree between 1 device and a
    (data=2, expert=4) mesh running the all_to_all exchange."""
    layer = MoeMlp(embed_dim=16, mlp_dim=16, num_experts=8, top_k=2, capacity_factor=8.0,
                   seq_load_balance_weight=0.01, concentration_weight=0.01)
    y_ref, st_ref, variables = _apply(layer)
    mesh = _mesh((2, 4))
    with jax.set_mesh(mesh), nn.logical_axis_rules([("batch", ("data", "expert")),
                                                    ("expert", "expert")]):
        y, st = jax.jit(lambda v, x: layer.apply(v, x, mutable=["aux_loss", "metrics"]))(
            variables, X)
    np.testing.assert_allclose(y, y_ref, rtol=2e-4, atol=2e-5)
    for a, b in zip(jax.tree.leaves(st["aux_loss"]), jax.tree.leaves(st_ref["aux_loss"])):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert float(st["metrics"]["dropped_fraction"][0]) == 0


def test_load_balance_normalization_tokens_is_top_k_times_assignments():
    base = dict(embed_dim=16, mlp_dim=8, num_experts=4, top_k=2)
    _, st_a, variables = _apply(MoeMlp(**base))
    _, st_t, _ = _apply(MoeMlp(**base, load_balance_normalization="tokens"), variables=variables)
    a, t = (float(s["metrics"]["load_balance_loss"][0]) for s in (st_a, st_t))
    assert t == pytest.approx(2 * a, rel=1e-6)
    assert float(st_t["aux_loss"]["load_balance_loss"][0]) == pytest.approx(0.01 * t, rel=1e-6)


def test_dropped_fraction_metric():
    layer = MoeMlp(embed_dim=16, mlp_dim=8, num_experts=4, top_k=1, dispatch="onehot",
                   capacity_factor=0.25)
    _, st, _ = _apply(layer)
    # capacity = ceil(0.25 * 16 / 4) = 1 slot per expert: at most 4 of 16 tokens are kept
    assert float(st["metrics"]["dropped_fraction"][0]) >= 0.75


def test_bias_updates_only_when_mutable_and_training():
    layer = MoeMlp(embed_dim=16, mlp_dim=8, bias_update_rate=0.1)
    variables = layer.init(jax.random.key(1), X)
    assert np.all(variables["moe_state"]["bias"] == 0)
    _, st, _ = _apply(layer, deterministic=True, variables=variables)
    np.testing.assert_array_equal(st["moe_state"]["bias"], 0)
    _, st, _ = _apply(layer, deterministic=False, variables=variables)
    load = st["metrics"]["expert_load"][0]
    counts = np.rint(np.asarray(load) * X.shape[0] * X.shape[1] * layer.top_k).astype(int)
    expected = 0.1 * np.sign(counts.sum() - layer.num_experts * counts)
    np.testing.assert_allclose(st["moe_state"]["bias"], expected, rtol=1e-6)
    np.testing.assert_array_equal(st["metrics"]["aux_free_bias"][0], st["moe_state"]["bias"])
    assert float(st["metrics"]["aux_free_bias_max_abs"][0]) == pytest.approx(0.1)
    # no gradient flows into the bias through the layer output
    g = jax.grad(lambda b: jnp.sum(layer.apply(
        {**variables, "moe_state": {"bias": b}}, X, mutable=["aux_loss", "metrics"])[0]))(
        variables["moe_state"]["bias"])
    np.testing.assert_array_equal(g, 0)


def test_shared_experts_and_active_params():
    layer = MoeMlp(embed_dim=16, mlp_dim=8, num_experts=4, top_k=2, num_shared_experts=2)
    y, _, variables = _apply(layer)
    p = variables["params"]
    assert nn.unbox(p["shared_experts"]["wi_gate"]).shape == (16, 16)
    assert p["experts"]["wi_gate"].names == ("expert", "embed", "mlp")
    assert p["router_kernel"].names == ("embed", "expert")
    assert num_active_params(layer) == 16 * 4 + 3 * 16 * 8 * 4
    biased = MoeMlp(embed_dim=16, mlp_dim=8, num_experts=4, top_k=2, router_bias=True,
                    expert_bias=True)  # gpt-oss: + router bias + 2 experts' biases
    assert num_active_params(biased) == 16 * 4 + 3 * 16 * 8 * 2 + 4 + 2 * (8 + 8 + 16)
    pb = biased.init(jax.random.key(0), X)["params"]
    assert pb["experts"]["wo_bias"].names == ("expert", "embed")
    assert nn.unbox(pb["router_bias"]).shape == (4,)
    no_shared = jax.tree.map(lambda a: a, variables)
    del no_shared["params"]["shared_experts"]
    y0 = MoeMlp(embed_dim=16, mlp_dim=8, num_experts=4, top_k=2).apply(no_shared, X)
    assert float(jnp.max(jnp.abs(y - y0))) > 1e-4
