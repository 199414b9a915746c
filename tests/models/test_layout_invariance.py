"""Settings that change only speed or memory change no number: scanned layers, every remat
policy, gradient accumulation and the exact MoE dispatch strategies start from the same
params (bitwise) and train to the same losses as the plain run.

Tolerances. Initial params and MoE state: bitwise, the same keys draw the same values. (The
model-level test builds both inits in one program: XLA:CPU at the optimization level 0 the
tests use, tests/conftest.py, may round the float transform of the same random bits
differently in two different programs, by ~1e-7; the build_run inits compared below, and
separately compiled inits at the default level, are bitwise equal.) Losses of steps 1-3:
rtol 1e-5, float32 rounding: the runs compute the same function, but XLA may fuse and order
the float32 sums differently (inside a scan, around a rematerialized block, across
micro-batches summed one after the other, in the grouped matmul's tiles). Observed: scan,
remat and dispatch losses identical, micro-batches within 2e-7."""
import dataclasses

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax.models.moe.layer  # noqa: F401  (registers MoeMlp with gin)
from sparsejax import config
from sparsejax.models import layer_stack as ls
from sparsejax.models.remat import REMAT_POLICIES
from sparsejax.models.transformer import ModelConfig, Transformer

LOSS_RTOL = 1e-5
STEPS = 3
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 259, (2, 16)), jnp.int32)
SMALL = dict(embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64, max_seq_len=32)


def assert_equal_trees(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(b, a, err_msg=jax.tree_util.keystr(path))


def init_both(cfg, scfg):
    """Both models' variables, from one program: XLA compiles their random draws alike."""
    keys = {"params": jax.random.key(0), "router": jax.random.key(1)}
    return jax.jit(lambda k: (Transformer(cfg).init(k, TOKENS),
                              Transformer(scfg).init(k, TOKENS)))(keys)


def test_scanned_init_is_the_unscanned_init_stacked():
    """Every kind of layer (block-sparse attention with learned gates and an MoE MLP with
    router, experts, a gated shared expert and the aux-free bias in 'moe_state'; dense
    attention and MLP; qkv biases): the scanned model's params and MoE state are the
    unscanned model's through `stack_layers`, bitwise (what init sows, 'aux_loss' and
    'metrics', is computed: to float32 rounding), with the structure and logical axis names
    (boxes included) of the variables nn.scan's own init creates, so the scanned model
    applies them."""
    for name, value in dict(num_experts=4, mlp_dim=16, num_shared_experts=1,
                            shared_expert_gate=True, bias_update_rate=0.01).items():
        gin.bind_parameter(f"MoeMlp.{name}", value)
    cfg = ModelConfig(**SMALL, num_layers=4, qkv_bias=True, mlp_kinds=("moe", "dense"),
                      attention_kinds=("block_sparse", "dense"),
                      sparse_attention_mask={"kind": "top_k", "top_k": 1, "causal": True,
                                             "block_size": 8, "gate_dim": 8})
    scfg = dataclasses.replace(cfg, scan_layers=True)
    flat, scanned = init_both(cfg, scfg)
    assert {"params", "moe_state"} <= set(flat)
    assert {"router_kernel", "experts", "shared_experts", "router_shared_gate"} <= set(
        scanned["params"]["layers"]["block_0"]["moe"])
    attn = scanned["params"]["layers"]["block_0"]["attn"]
    assert "query_bias" in attn and "gate_wq" in attn["block_sparse"]
    want = nn.unbox(ls.stack_layers(flat, ls.layer_period(cfg)))
    got = nn.unbox(scanned)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for col in ("params", "moe_state"):
        assert_equal_trees(got[col], want[col])
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):  # sown: computed values
        np.testing.assert_allclose(b, a, rtol=LOSS_RTOL)
    native = jax.eval_shape(lambda k: nn.Module.init(Transformer(scfg), k, TOKENS),
                            jax.random.key(0))
    assert jax.tree.structure(native) == jax.tree.structure(scanned)  # names are tree metadata
    assert jax.tree.map(jnp.shape, native) == jax.tree.map(jnp.shape, scanned)


# Runs through build_run and the jitted train step (tests/models/conftest.py), shared by the
# tests below: {setup name: Trained}.
_RUNS = {}
TINY = (("tiny.gin",), ())
TOP2 = (("tiny.gin", "moe/top2.gin"), ("ModelConfig.num_layers=4",))


def trained(train_losses, base, *bindings, microbatches=1):
    key = (base, bindings, microbatches)
    if key not in _RUNS:
        files, base_bindings = base
        config.parse_gin(files, [*base_bindings, *bindings])
        _RUNS[key] = train_losses(ModelConfig(), STEPS, microbatches=microbatches)
    return _RUNS[key]


def assert_same_run(got, want):
    """Same initial params (bitwise, in the unscanned layout) and the same losses of every
    step."""
    assert_equal_trees(ls.unstack_layers(got.init_params), ls.unstack_layers(want.init_params))
    np.testing.assert_allclose(got.losses, want.losses, rtol=LOSS_RTOL)


@pytest.mark.parametrize("base", [TINY, TOP2], ids=["tiny", "tiny+top2-4-layers"])
def test_scanned_layers_train_like_unscanned(train_losses, base):
    flat = trained(train_losses, base)
    scanned = trained(train_losses, base, "ModelConfig.scan_layers=True")
    assert ls.is_stacked(scanned.init_params) and not ls.is_stacked(flat.init_params)
    assert_same_run(scanned, flat)
    embedding = flat.state.params["embed"]["embedding"]
    assert not np.array_equal(embedding, flat.init_params["embed"]["embedding"])  # it trained


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p != "none"])
def test_remat_policy_trains_like_no_remat(train_losses, policy):
    """tiny + top2 (MoE every other layer, so the MoE dispatch tags are in play), scanned as
    at scale (scale/pod.gin): the remat wraps the scanned group, and the init goes through
    the unscanned blocks, rematerialized."""
    scan = "ModelConfig.scan_layers=True"
    assert_same_run(trained(train_losses, TOP2, scan, f"ModelConfig.remat_policy='{policy}'"),
                    trained(train_losses, TOP2, scan))


@pytest.mark.parametrize("k", [2, 4])
def test_microbatches_train_like_the_whole_batch(train_losses, k):
    assert_same_run(trained(train_losses, TINY, microbatches=k), trained(train_losses, TINY))


def test_pallas_gmm_dispatch_trains_like_ragged_dot(train_losses):
    """The documented-equal dropless strategies: 'pallas_gmm' (top2.gin's; on CPU the
    grouped-matmul op's XLA formulation) and 'ragged_dot' (jax.lax.ragged_dot)."""
    assert_same_run(trained(train_losses, TOP2, "MoeMlp.dispatch='ragged_dot'"),
                    trained(train_losses, TOP2))
