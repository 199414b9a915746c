"""MoE options of released checkpoints: DeepSeek-V3 routing (sigmoid + correction bias,
group-limited top-k, top-k normalization, routed scaling) and Qwen2-MoE's sigmoid-gated shared
expert, against numpy and, when installed, transformers' own modules."""
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.models.moe.layer import MoeMlp
from sparsejax.models.moe.router import SigmoidTopKRouter, group_limited

RNG = np.random.default_rng(0)


def np_deepseek_route(logits, bias, k, groups, top_groups, renorm, scale):
    """Per-token brute force of DeepSeek-V3's router."""
    t, e = logits.shape
    scores = 1 / (1 + np.exp(-logits))
    sel = scores + bias
    idx_out, w_out = [], []
    for row, srow in zip(sel, scores):
        g = row.reshape(groups, e // groups)
        gscore = np.sort(g, axis=1)[:, -2:].sum(1)
        best = set(np.argsort(-gscore, kind="stable")[:top_groups])
        allowed = [j for j in range(e) if j // (e // groups) in best]
        chosen = sorted(allowed, key=lambda j: -row[j])[:k]
        w = srow[chosen]
        if renorm:
            w = w / (w.sum() + 1e-20)
        idx_out.append(chosen)
        w_out.append(w * scale)
    return np.array(idx_out), np.array(w_out)


def test_group_limited_masks_all_but_the_best_groups():
    sel = jnp.array([[0.9, 0.1, 0.5, 0.6, 0.2, 0.95]])  # groups of 2: sums 1.0, 1.1, 1.15
    out = np.asarray(group_limited(sel, 3, 2))
    assert np.isneginf(out[0, :2]).all() and np.isfinite(out[0, 2:]).all()


@pytest.mark.parametrize("renorm", [True, False])
def test_deepseek_routing_matches_brute_force(renorm):
    logits = RNG.standard_normal((32, 16)).astype(np.float32)
    bias = (RNG.standard_normal(16) * 0.3).astype(np.float32)
    router = SigmoidTopKRouter(renormalize=renorm, routed_scaling=2.5, num_groups=4, top_groups=2)
    r = router.route(jnp.asarray(logits), top_k=4, capacity=32, bias=jnp.asarray(bias))
    idx, w = np_deepseek_route(logits, bias, 4, 4, 2, renorm, 2.5)
    got_idx = np.asarray(r.expert_index).reshape(32, 4)
    got_w = np.asarray(r.weight).reshape(32, 4)
    for t in range(32):  # same set of experts, same weight per expert
        want = dict(zip(idx[t], w[t]))
        got = dict(zip(got_idx[t], got_w[t]))
        assert set(got) == set(want)
        for j in want:
            assert got[j] == pytest.approx(want[j], rel=1e-5)


def moe_params(layer, x):
    params = nn.meta.unbox(layer.init(jax.random.key(1), x))
    return jax.tree.map(lambda p: jnp.asarray(RNG.standard_normal(p.shape) * 0.3, p.dtype),
                        params)


def test_shared_expert_gate_matches_numpy():
    x = jnp.asarray(RNG.standard_normal((2, 5, 8)), jnp.float32)
    gated = MoeMlp(embed_dim=8, mlp_dim=6, num_experts=4, top_k=2, num_shared_experts=1,
                   shared_expert_gate=True, dispatch="ragged_dot")
    v = moe_params(gated, x)
    plain = gated.clone(shared_expert_gate=False)
    no_gate = {"params": {k: a for k, a in v["params"].items() if k != "router_shared_gate"}}
    zero_shared = jax.tree.map(jnp.zeros_like, no_gate["params"]["shared_experts"])
    routed = plain.apply({"params": {**no_gate["params"], "shared_experts": zero_shared}}, x)
    s = v["params"]["shared_experts"]
    xn = np.asarray(x).reshape(-1, 8)
    g = xn @ np.asarray(s["wi_gate"])
    shared = ((g / (1 + np.exp(-g))) * (xn @ np.asarray(s["wi_up"]))) @ np.asarray(s["wo"])
    gate = 1 / (1 + np.exp(-(xn @ np.asarray(v["params"]["router_shared_gate"]))))
    want = np.asarray(routed).reshape(-1, 8) + gate * shared
    got = gated.apply(v, x)
    np.testing.assert_allclose(np.asarray(got).reshape(-1, 8), want, rtol=1e-5, atol=1e-5)


def test_correction_bias_lives_in_moe_state_and_steers_selection():
    x = jnp.asarray(RNG.standard_normal((1, 6, 8)), jnp.float32)
    layer = MoeMlp(embed_dim=8, mlp_dim=6, num_experts=4, top_k=1, router="sigmoid_topk",
                   correction_bias=True, dispatch="ragged_dot")
    v = moe_params(layer, x)
    assert v["moe_state"]["bias"].shape == (4,)
    big = jnp.array([0.0, 0.0, 0.0, 100.0])
    y0 = layer.apply({**v, "moe_state": {"bias": jnp.zeros(4)}}, x)
    y1, mut = layer.apply({**v, "moe_state": {"bias": big}}, x, deterministic=False,
                          mutable=["moe_state"])
    assert not np.allclose(y0, y1)
    np.testing.assert_array_equal(mut["moe_state"]["bias"], big)  # fixed: no update rate


@pytest.mark.parametrize("kwargs, router, needle", [
    (dict(), dict(num_groups=3), "SoftmaxTopKRouter.num_groups=3 must divide"),
    (dict(), dict(num_groups=2, top_groups=3), "top_groups"),
    (dict(top_k=3), dict(num_groups=4, top_groups=1), "top_k"),
    (dict(shared_expert_gate=True), {}, "shared_expert_gate"),
    (dict(correction_bias=True, router="expert_choice"), {}, "correction_bias"),
])
def test_bad_moe_options_name_the_setting(kwargs, router, needle):
    # (Group-limited routing with the ReLU router cannot be asked for: num_groups is a setting
    # of the top-k routers' classes, and a binding of a router that is not used is refused.)
    for name, value in router.items():
        gin.bind_parameter(f"SoftmaxTopKRouter.{name}", value)
    layer = MoeMlp(embed_dim=8, mlp_dim=6, num_experts=8, **{"top_k": 2, **kwargs})
    with pytest.raises(ValueError, match=needle):
        layer.init(jax.random.key(0), jnp.zeros((1, 4, 8)))


@pytest.mark.hf
def test_deepseek_v3_moe_block_matches_transformers():
    pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    cfg = DeepseekV3Config(hidden_size=16, moe_intermediate_size=8, n_routed_experts=8,
                           num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=2,
                           routed_scaling_factor=2.5, norm_topk_prob=True)
    torch.manual_seed(0)
    block = DeepseekV3MoE(cfg).float().eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
        block.gate.e_score_correction_bias.normal_(0, 0.3)
    x = RNG.standard_normal((2, 7, 16)).astype(np.float32)
    with torch.no_grad():
        want = block(torch.from_numpy(x)).numpy()
    ex = block.experts
    gate_up = ex.gate_up_proj.detach().numpy()  # [E, 2f, d]
    f = 8
    params = {
        "router_kernel": block.gate.weight.detach().numpy().T,
        "experts": {"wi_gate": gate_up[:, :f].transpose(0, 2, 1),
                    "wi_up": gate_up[:, f:].transpose(0, 2, 1),
                    "wo": ex.down_proj.detach().numpy().transpose(0, 2, 1)},
        "shared_experts": {"wi_gate": block.shared_experts.gate_proj.weight.detach().numpy().T,
                           "wi_up": block.shared_experts.up_proj.weight.detach().numpy().T,
                           "wo": block.shared_experts.down_proj.weight.detach().numpy().T},
    }
    for name, value in dict(renormalize=True, routed_scaling=2.5, num_groups=4,
                            top_groups=2).items():
        gin.bind_parameter(f"SigmoidTopKRouter.{name}", value)
    layer = MoeMlp(embed_dim=16, mlp_dim=8, num_experts=8, top_k=3, router="sigmoid_topk",
                   num_shared_experts=2, correction_bias=True, dispatch="ragged_dot")
    bias = block.gate.e_score_correction_bias.detach().numpy()
    got = layer.apply({"params": params, "moe_state": {"bias": bias}}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
