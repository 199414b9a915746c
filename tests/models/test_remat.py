"""Remat policies by name: every policy gives the gradients of no remat, each keeps what its
name says for the backward pass (jax's saved-residual analysis), unknown names are refused."""
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

import sparsejax.models.moe.layer  # noqa: F401  (registers MoeMlp with gin)
from sparsejax.models.remat import REMAT_POLICIES
from sparsejax.models.transformer import ModelConfig, Transformer

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 259, (2, 16)), jnp.int32)


def model(policy, scan):
    gin.bind_parameter("MoeMlp.num_experts", 4)
    gin.bind_parameter("MoeMlp.mlp_dim", 16)
    return Transformer(ModelConfig(num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2,
                                   head_dim=8, mlp_dim=64, max_seq_len=32,
                                   mlp_kinds=("dense", "moe"), remat_policy=policy,
                                   scan_layers=scan))


def loss_fn(m):
    return lambda p: jnp.mean(jnp.square(m.apply({"params": p}, TOKENS)))


@pytest.fixture(scope="module")
def params():
    gin.clear_config()
    out = {scan: nn.unbox(jax.jit(model("none", scan).init)(
        {"params": jax.random.key(0), "router": jax.random.key(0)}, TOKENS))["params"]
           for scan in (False, True)}
    gin.clear_config()
    return out


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_every_policy_gives_the_gradients_of_no_remat(params, scan):
    """Every policy unrolled; scanned (the same remat inside nn.scan) three of them."""
    p = params[scan]
    want = jax.jit(jax.grad(loss_fn(model("none", scan))))(p)
    names = REMAT_POLICIES if not scan else ("full", "dots_saveable", "save_moe_dispatch")
    for name in names:
        got = jax.jit(jax.grad(loss_fn(model(name, scan))))(p)
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7, err_msg=name)


def residuals(name, scan, p):
    res = saved_residuals(loss_fn(model(name, scan)), p)
    return sum(int(np.prod(a.shape)) for a, _ in res), " ".join(d for _, d in res)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_policies_save_what_they_name(params, scan):
    """Saved residual sizes: 'full' keeps the least; naming the attention output or the MoE
    dispatch adds exactly those activations (2 x 16 tokens x 4 heads x 8 for the attention
    output of each of 2 layers; the dispatched [32 assignments, 32] and expert outputs of the
    MoE layer); 'none' keeps the most. Unrolled, the tags appear by name."""
    p = params[scan]
    size = {name: residuals(name, scan, p) for name in
            ("none", "full", "save_attention_out", "save_moe_dispatch",
             "save_attention_out_and_moe_dispatch", "dots_saveable")}
    full = size["full"][0]
    attn = 2 * (2 * 16 * 4 * 8)
    moe = 2 * (2 * 16 * 2) * 32
    assert size["save_attention_out"][0] == full + attn
    assert size["save_moe_dispatch"][0] == full + moe
    assert size["save_attention_out_and_moe_dispatch"][0] == full + attn + moe
    assert full < size["dots_saveable"][0] < size["none"][0]
    if not scan:
        assert "named 'attention_out'" in size["save_attention_out"][1]
        assert "named 'moe_dispatch'" in size["save_moe_dispatch"][1]
        assert "named" not in size["full"][1]


def test_unknown_policy_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"ModelConfig.remat_policy='everything' is unknown; "
                                         r"valid: \[.*'dots_saveable'.*'save_moe_dispatch'"):
        ModelConfig(remat_policy="everything")
