"""Gradient accumulation: k micro-batches in one step give the un-split step (loss, params,
MoE state, global load balance), the NaN guard sees every micro-batch, memory falls with k."""
import flax.linen as nn
import gin
import jax
import numpy as np
import pytest

import sparsejax.models.moe.layer  # noqa: F401  (registers MoeMlp with gin)
from sparsejax.models.transformer import ModelConfig
from sparsejax.parallel.mesh import make_mesh
from sparsejax.parallel.rules import LOGICAL_RULES, batch_sharding, replicated
from sparsejax.train.build import build_run
from sparsejax.train.step import make_train_step
from sparsejax.train.trainer import TrainConfig, global_batch

MODEL = dict(num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
             max_seq_len=32)
BATCH, SEQ, STEPS = 8, 16, 3
# Float32 sums over micro-batches are reordered: losses agree to rounding level; params after
# 3 AdamW steps (lr up to 3e-4) to 2e-6 (Adam divides by sqrt(v), which amplifies rounding in
# entries whose gradient is tiny, but never beyond a fraction of one step's lr).
LOSS_RTOL, PARAM_ATOL = 1e-5, 2e-6


def batches(n, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        tokens = rng.integers(0, 259, size=(BATCH, SEQ + 1), dtype=np.int32)
        mask = np.ones((BATCH, SEQ), np.float32)
        mask[1, SEQ // 2:] = 0  # uneven token counts per micro-batch
        yield {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
               "segment_ids": np.ones((BATCH, SEQ), np.int32),
               "positions": np.tile(np.arange(SEQ, dtype=np.int32), (BATCH, 1))}


_COMPILED = {}  # (k, moe, mesh shape) -> (run, jitted step): tests share compilations


def compiled_step(k, moe=None, mesh=None):
    mesh = mesh or make_mesh(num_devices=1)
    key = (k, None if moe is None else tuple(sorted(moe.items())), tuple(mesh.shape.items()))
    if key in _COMPILED:
        return _COMPILED[key]
    gin.clear_config()
    if moe is not None:
        gin.bind_parameter("MoeMlp.num_experts", 4)
        gin.bind_parameter("MoeMlp.mlp_dim", 32)
        for name, value in moe.items():
            gin.bind_parameter(f"MoeMlp.{name}", value)
    gin.bind_parameter("learning_rate_schedule.warmup_steps", 10)
    model = ModelConfig(**MODEL, mlp_kinds=("dense", "moe") if moe is not None else ("dense",))
    cfg = TrainConfig(num_steps=20, global_batch_size=BATCH, seq_len=SEQ, microbatches=k)
    run = build_run(cfg, model_config=model, mesh=mesh)
    _COMPILED[key] = run, jitted_step(run, mesh, k)
    return _COMPILED[key]


def jitted_step(run, mesh, k):
    """The run's train step with `k` micro-batches, jitted with the run's shardings."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        return jax.jit(make_train_step(run.model, run.tx, run.sparsity_method, microbatches=k),
                       in_shardings=(run.state_shardings, batch_sharding(mesh)),
                       out_shardings=(run.state_shardings, replicated(mesh)))


def run_steps(k, moe=None, mesh=None, steps=STEPS, state_fn=None):
    """Metrics of each step and the final state of `steps` train steps with k micro-batches."""
    run, step = compiled_step(k, moe, mesh)
    bsh = batch_sharding(run.mesh)
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(LOGICAL_RULES):
        state = run.init_state()
        if state_fn is not None:
            state = state_fn(state)
        out = []
        for b in batches(steps):
            state, metrics = step(state, global_batch(b, bsh))
            out.append(jax.device_get(metrics))
    return out, jax.device_get(state)


def assert_same(a, b):
    (ma, sa), (mb, sb) = a, b
    np.testing.assert_allclose([m["loss"] for m in mb], [m["loss"] for m in ma], rtol=LOSS_RTOL)
    np.testing.assert_allclose([m["aux_loss"] for m in mb], [m["aux_loss"] for m in ma],
                               rtol=LOSS_RTOL)
    np.testing.assert_allclose([m["grad_norm"] for m in mb], [m["grad_norm"] for m in ma],
                               rtol=1e-4)
    for x, y in zip(jax.tree.leaves(sa.params), jax.tree.leaves(sb.params)):
        np.testing.assert_allclose(y, x, atol=PARAM_ATOL, rtol=0)


def test_dense_microbatches_match_the_unsplit_step():
    ref = run_steps(1)
    for k in (2, 4):
        assert_same(ref, run_steps(k))


# Dropless top-2 routing is a per-token function, so MoE layers compute the same thing on a
# micro-batch; expert frequencies of the load-balance loss and the aux-free bias update are
# taken over the whole global batch (the per-micro-batch loss is off: it differs by definition,
# tests/models/moe/test_losses.py).
GLOBAL_MOE = {"load_balance_weight": 0.0, "global_load_balance_weight": 0.5,
              "bias_update_rate": 0.01}


def test_moe_microbatches_with_global_balancing_match_the_unsplit_step():
    """Loss, aux loss (the global load-balance loss in it), gradient norm, params and the
    aux-free bias after 3 steps equal the un-split step's for k = 2, 4."""
    ref = run_steps(1, GLOBAL_MOE)
    key = [k for k in ref[0][0] if k.endswith("global_load_balance_loss")]
    assert key, sorted(ref[0][0])
    assert np.any(jax.tree.leaves(ref[1].moe_state)[0] != 0)
    for k in (2, 4):
        got = run_steps(k, GLOBAL_MOE)
        assert_same(ref, got)
        for a, b in zip(ref[0], got[0]):
            np.testing.assert_allclose(b[key[0]], a[key[0]], rtol=1e-5)
        np.testing.assert_array_equal(jax.tree.leaves(got[1].moe_state),
                                      jax.tree.leaves(ref[1].moe_state))


def test_global_load_balance_on_an_expert_parallel_mesh():
    """Data x expert parallel (routing on global arrays, experts in shard_map): with 2
    micro-batches the first step's global load-balance loss and aux-free bias equal the
    un-split step's on one device (the capacity-limited exchange may drop tokens, which
    changes the token loss but not the routing)."""
    one = run_steps(1, GLOBAL_MOE, steps=1)
    got = run_steps(2, GLOBAL_MOE, make_mesh(data=2, expert=2, devices=jax.devices()[:4]),
                    steps=1)
    key = [k for k in one[0][0] if k.endswith("global_load_balance_loss")][0]
    np.testing.assert_allclose(got[0][0][key], one[0][0][key], rtol=1e-5)
    np.testing.assert_array_equal(jax.tree.leaves(got[1].moe_state),
                                  jax.tree.leaves(one[1].moe_state))


def test_nan_in_one_microbatch_skips_the_whole_step():
    """A NaN embedding row used only by micro-batch 1 (row 1 of the batch, k=2) makes the
    accumulated step non-finite: params stay as they were."""
    first = next(batches(1))
    even = first["inputs"][0::2]
    bad = int(next(t for t in first["inputs"][1] if not np.isin(t, even)))

    def poison(state):
        emb = state.params["embed"]["embedding"]
        return state.replace(params={**state.params, "embed": {"embedding": emb.at[bad].set(
            np.nan)}})
    metrics, state = run_steps(2, steps=1, state_fn=poison)
    assert metrics[0]["nonfinite"] == 1
    assert int(state.step) == 1
    emb = np.asarray(state.params["embed"]["embedding"])
    assert np.isnan(emb[bad]).all() and np.isfinite(np.delete(emb, bad, 0)).all()


def test_peak_memory_falls_with_microbatches():
    """Compiled temp memory of the step (XLA's memory analysis) shrinks as k grows."""
    mesh = make_mesh(num_devices=1)
    model = ModelConfig(**{**MODEL, "max_seq_len": 128})
    temps = []
    for k in (1, 2, 4):
        cfg = TrainConfig(num_steps=20, global_batch_size=16, seq_len=128, microbatches=k)
        run = build_run(cfg, model_config=model, mesh=mesh)
        bsh = batch_sharding(mesh)
        step = jitted_step(run, mesh, k)
        with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
            batch = {n: jax.ShapeDtypeStruct((16, 128), np.float32 if n == "loss_mask" else
                                             np.int32, sharding=bsh)
                     for n in ("inputs", "targets", "loss_mask", "segment_ids", "positions")}
            compiled = step.lower(run.abstract_state, batch).compile()
        temps.append(compiled.memory_analysis().temp_size_in_bytes)
    print("temp bytes for k=1,2,4:", temps)
    assert temps[0] > 1.5 * temps[1] > 1.5 * 1.5 * temps[2] * 0.9, temps


def test_microbatches_not_dividing_the_per_device_batch_are_refused():
    mesh = make_mesh(data=2, devices=jax.devices()[:2])
    model = ModelConfig(**MODEL)
    with pytest.raises(ValueError, match=r"TrainConfig.microbatches=3 does not divide the "
                                         r"per-device batch 4.*valid: \[1, 2, 4\]"):
        build_run(TrainConfig(global_batch_size=8, seq_len=SEQ, microbatches=3),
                  model_config=model, mesh=mesh)
    with pytest.raises(ValueError, match="per-device batch 4"):  # 8 divides 8 but not 8 / 2
        build_run(TrainConfig(global_batch_size=8, seq_len=SEQ, microbatches=8),
                  model_config=model, mesh=mesh)
    with pytest.raises(ValueError, match="must be an int >= 1"):
        build_run(TrainConfig(global_batch_size=8, seq_len=SEQ, microbatches=0),
                  model_config=model, mesh=mesh)


def test_rigl_update_grows_by_the_accumulated_dense_gradient():
    """The mask update's dense gradient is accumulated like the step's: RigL's drop/grow with
    k = 2 picks the same masks as with k = 1."""
    from sparsejax import config
    config.parse_gin(["sparsity/rigl.gin"], ["make_mesh.num_devices=1"])
    masks = []
    for k in (1, 2):
        cfg = TrainConfig(num_steps=20, global_batch_size=BATCH, seq_len=SEQ, microbatches=k)
        run = build_run(cfg, model_config=ModelConfig(**MODEL))
        t = next(s for s in range(1, 20) if run.sparsity_method.is_update_step(s))
        bsh = batch_sharding(run.mesh)
        with jax.set_mesh(run.mesh), nn.logical_axis_rules(LOGICAL_RULES):
            state = run.init_state().replace(step=np.int32(t))
            state, metrics = run.sparsity_update_fn()(state, global_batch(next(batches(1)), bsh))
        assert float(metrics["sparsity/churn"]) > 0
        masks.append(jax.device_get(state.sparsity["masks"]))
    for a, b in zip(jax.tree.leaves(masks[0]), jax.tree.leaves(masks[1])):
        np.testing.assert_array_equal(a, b)
