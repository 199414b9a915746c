"""Profiler traces of a step range in TensorBoard's profile-plugin layout, FLOPs per token
(dense, MoE active, masked sparse) against counts spelled out here, MFU in the logs, and the
errors for profile steps outside the run."""
import glob
import os

import jax
import numpy as np
import pytest

import sparsejax.models.moe.layer  # noqa: F401  (registers MoeMlp with gin)
from sparsejax import config
from sparsejax.models.transformer import ModelConfig
from sparsejax.parallel.mesh import make_mesh
from sparsejax.train import flops as flops_lib
from sparsejax.train.build import build_run
from sparsejax.train.metrics import read_metrics
from sparsejax.train.profiling import resolve_profile_steps
from sparsejax.train.trainer import TrainConfig

D, F, H, KV, HD, V, L, S = 32, 64, 4, 2, 8, 259, 2, 16


def hand_counts(experts=0, top_k=0, fe=0):
    """Training FLOPs per token of the 2-layer model below: 6 x kernel entries (attention
    q, k, v, out; gated MLP or E experts + router; LM head over the real vocab) + attention."""
    attn_proj = D * H * HD + 2 * D * KV * HD + H * HD * D
    mlp = 3 * D * F
    head = D * V
    attn = 3 * 2 * 2 * H * HD * (S + 1) / 2  # causal: (S + 1) / 2 keys per query on average
    if not experts:
        return 6 * (L * (attn_proj + mlp) + head) + L * attn, None
    moe_all = experts * 3 * D * fe
    router = D * experts
    dense = 6 * (L * attn_proj + mlp + moe_all + router + head) + L * attn
    active = 6 * (L * attn_proj + mlp + moe_all * top_k / experts + router + head) + L * attn
    return dense, active


def meter(mlp_kinds=("dense",), bindings=()):
    config.parse_gin([], list(bindings))
    mc = ModelConfig(num_layers=L, embed_dim=D, num_heads=H, num_kv_heads=KV, head_dim=HD,
                     mlp_dim=F, max_seq_len=32, mlp_kinds=mlp_kinds)
    run = build_run(TrainConfig(global_batch_size=4, seq_len=S), mc, make_mesh(num_devices=1))
    return run, flops_lib.FlopsMeter(run, S)


def test_flops_per_token_dense_moe_and_masked():
    _, m = meter()
    want, _ = hand_counts()
    assert m.dense == pytest.approx(want) and m.active == pytest.approx(want)
    run, m = meter(("dense", "moe"), ["MoeMlp.num_experts=4", "MoeMlp.top_k=2",
                                      "MoeMlp.mlp_dim=16"])
    dense, active = hand_counts(experts=4, top_k=2, fe=16)
    assert m.dense == pytest.approx(dense) and m.active == pytest.approx(active)
    with jax.set_mesh(run.mesh):
        state = run.init_state()
        assert float(m._sparse(state)) == pytest.approx(active)  # no masks: sparse = active
    # static 50% magnitude masks on every prunable kernel: the kernels' share halves
    run, m = meter(bindings=["make_method.name='masked_pruning'",
                             "MaskedPruningMethod.density=0.5",
                             "MaskedPruningMethod.distribution='uniform'",
                             "MaskedPruningMethod.init_criterion='magnitude'"])
    with jax.set_mesh(run.mesh):
        state = run.init_state()
        sparse = float(m._sparse(state))
    masks = jax.device_get(state.sparsity["masks"])
    kept = sum(int(np.sum(x)) for x in jax.tree.leaves(masks))
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(masks))
    total -= D * (ModelConfig().padded_vocab_size - V)  # the LM head's padding: never counted
    want, _ = hand_counts()
    attn = L * 3 * 2 * 2 * H * HD * (S + 1) / 2
    assert sparse == pytest.approx(want - 6 * (total - kept) + 0.0, rel=1e-6)
    assert sparse < 0.7 * want and sparse > attn


def test_peak_from_the_datasheet_or_a_measured_matmul():
    assert flops_lib.datasheet_peak("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert flops_lib.datasheet_peak("NVIDIA H100 80GB HBM3", "float32") == 494e12
    assert flops_lib.datasheet_peak("TPU v4", "float32") == 275e12
    assert flops_lib.datasheet_peak("Some new chip", "bfloat16") is None
    peak, source = flops_lib.peak_flops(jax.devices()[:1], "float32")
    assert peak > 1e8 and source.startswith("measured float32 matmul on cpu")


def test_profile_trace_and_mfu_in_the_logs(run_cli, tmp_path):
    w = tmp_path / "w"
    assert run_cli(str(w), "--gin.TrainConfig.num_steps=6", "--gin.TrainConfig.log_every=3",
                   "--gin.TrainConfig.profile_steps=(2, 4)", "--gin.TrainConfig.eval_tokens=0",
                   "--gin.ModelConfig.num_layers=1", "--gin.make_mesh.num_devices=1") == 0
    traces = glob.glob(str(w / "tensorboard" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
    records = read_metrics(str(w / "metrics.jsonl"))
    assert records[0]["peak_flops_source"].startswith("measured float32 matmul")
    logged = [r for r in records if "mfu" in r]
    assert [r["step"] for r in logged] == [3, 6]
    for r in logged:
        assert r["flops_per_token/active"] == r["flops_per_token/dense"] == \
            records[0]["flops_per_token/dense"]
        want = r["flops_per_token/active"] * r["tokens_per_s"] / records[0]["peak_flops"]
        assert r["mfu"] == pytest.approx(want) and 0 < r["mfu"] < 1.5


@pytest.mark.parametrize("spec", [(5, 30), (4, 4), (-1, 3), (0.5, 1.5), (3,)])
def test_profile_steps_outside_the_run_are_refused(spec):
    with pytest.raises(ValueError, match=r"TrainConfig.profile_steps"):
        TrainConfig(num_steps=20, profile_steps=spec)
    assert resolve_profile_steps((0.25, 1.0), 20) == (5, 20)
