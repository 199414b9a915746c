"""Compact block-sparse training is the masked-dense training it replaces: same losses over 20
steps from the same weights and block mask; it runs sharded on the 8-device mesh."""
import flax.linen as nn
import gin
import jax
import numpy as np
import pytest

import sparsejax.sparsity.posttrain.recovery  # noqa: F401  (registers the fixed_masks method)
from sparsejax import cli
from sparsejax.models.formats.block_sparse import BlockSparse
from sparsejax.models.transformer import ModelConfig
from sparsejax.parallel.mesh import make_mesh
from sparsejax.parallel.rules import LOGICAL_RULES, batch_sharding, replicated
from sparsejax.sparsity.layout import merge_layout
from sparsejax.train.build import build_run
from sparsejax.train.checkpoint import restore_state_numpy
from sparsejax.train.metrics import read_metrics
from sparsejax.train.step import make_train_step
from sparsejax.train.trainer import TrainConfig, global_batch

MODEL = dict(num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
             max_seq_len=32)
BATCH, SEQ, STEPS = 8, 16, 20
BLOCKS = dict(block_in=16, block_out=16, density=0.5)
# The compact product sums k blocks where the dense one sums every input (zeros included) in
# another order: rounding-level differences that 20 AdamW steps carry; seen ~2e-6 relative.
LOSS_RTOL = 2e-5


def batches(n, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        tokens = rng.integers(0, 259, size=(BATCH, SEQ + 1), dtype=np.int32)
        yield {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
               "loss_mask": np.ones((BATCH, SEQ), np.float32),
               "segment_ids": np.ones((BATCH, SEQ), np.int32),
               "positions": np.tile(np.arange(SEQ, dtype=np.int32), (BATCH, 1))}


def make_run(mesh, method="dense", blocks=BLOCKS, **model):
    gin.clear_config()
    for k, v in blocks.items():
        gin.bind_parameter(f"BlockSparse.{k}", v)
    gin.bind_parameter("make_method.name", method)
    gin.bind_parameter("learning_rate_schedule.warmup_steps", 5)
    cfg = TrainConfig(num_steps=STEPS, global_batch_size=BATCH, seq_len=SEQ)
    return build_run(cfg, model_config=ModelConfig(**MODEL, **model), mesh=mesh)


def train(run, state):
    mesh = run.mesh
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        step = jax.jit(make_train_step(run.model, run.tx, run.sparsity_method),
                       in_shardings=(run.state_shardings, batch_sharding(mesh)),
                       out_shardings=(run.state_shardings, replicated(mesh)))
        losses = []
        for b in batches(STEPS):
            state, m = step(state, global_batch(b, batch_sharding(mesh)))
            losses.append(float(m["loss"]))
    return losses, state


def to_dense_params(params, layout):
    """The compact model's params as dense kernels (the layout written into them)."""
    fmt = BlockSparse(**BLOCKS)
    merged = merge_layout(jax.device_get(params), jax.device_get(layout))

    def convert(tree, in_features):
        out = {}
        for k, v in tree.items():
            if isinstance(v, dict) and "values" in v:
                kernel = fmt.to_dense(v, in_features(k))
                out[k] = {"kernel": kernel} if k in ("wi_gate", "wi_up", "wo") else kernel
            elif isinstance(v, dict):
                out[k] = convert(v, in_features)
            else:
                out[k] = v
        return out

    return convert(merged, lambda name: MODEL["mlp_dim"] if name == "wo" else MODEL["embed_dim"])


def test_compact_run_equals_the_masked_dense_run():
    mesh = make_mesh(num_devices=1)
    compact = make_run(mesh, weight_format="block_sparse")
    c_state = compact.init_state()
    dense_params = to_dense_params(c_state.params, c_state.sparsity["layout"])
    c_losses, c_final = train(compact, c_state)

    masked = make_run(mesh, method="fixed_masks")  # masks: the nonzero entries = the blocks
    with jax.set_mesh(mesh):
        m_state = masked.init_state(jax.device_put(dense_params, jax.tree.map(
            lambda a: a.sharding, masked.abstract_model_params)))
    kept = [np.asarray(m) for m in jax.tree.leaves(m_state.sparsity["masks"])]
    assert 0.3 < sum(k.sum() for k in kept) / sum(k.size for k in kept) < 0.9
    m_losses, m_final = train(masked, m_state)

    np.testing.assert_allclose(c_losses, m_losses, rtol=LOSS_RTOL)
    final_dense = to_dense_params(c_final.params, c_final.sparsity["layout"])
    moved = final_dense["layer_1"]["mlp"]["wo"]["kernel"] - dense_params["layer_1"]["mlp"]["wo"]["kernel"]
    assert np.abs(moved).max() > 1e-3  # the weights trained
    np.testing.assert_allclose(final_dense["layer_1"]["mlp"]["wo"]["kernel"],
                               m_final.params["layer_1"]["mlp"]["wo"]["kernel"], atol=2e-5)
    np.testing.assert_array_equal(c_final.sparsity["layout"]["layer_0"]["attn"]["query"]["indices"],
                                  c_state.sparsity["layout"]["layer_0"]["attn"]["query"]["indices"])


def test_compact_params_and_optimizer_state_scale_with_the_density():
    mesh = make_mesh(num_devices=1)
    compact = make_run(mesh, weight_format="block_sparse")
    dense = make_run(mesh)
    size = lambda tree, key: sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(tree)
                                 if "mlp" in jax.tree_util.keystr(path) and x.ndim >= 2
                                 and key in jax.tree_util.keystr(path))
    for part in ("params", "opt_state"):
        c = size(getattr(compact.abstract_state, part), "wi_gate")
        d = size(getattr(dense.abstract_state, part), "wi_gate")
        assert c == pytest.approx(0.5 * d), part


SMALL_BLOCKS = dict(block_in=8, block_out=8, density=0.5)  # k/v: 4 output blocks


def test_compact_run_on_the_8_device_mesh_matches_one_device():
    one = make_run(make_mesh(num_devices=1), blocks=SMALL_BLOCKS, weight_format="block_sparse")
    losses1, _ = train(one, one.init_state())
    run = make_run(make_mesh(data=2, fsdp=2, tensor=2), blocks=SMALL_BLOCKS,
                   weight_format="block_sparse")
    values = run.state_shardings.params["layer_0"]["mlp"]["wi_gate"]["values"]
    assert values.spec[0] == ("fsdp", "tensor")  # out_blocks split over FSDP and tensor
    losses8, state = train(run, run.init_state())
    assert len(state.params["layer_0"]["mlp"]["wo"]["values"].sharding.device_set) == 8
    np.testing.assert_allclose(losses8, losses1, rtol=1e-4)


def test_blocks_that_do_not_split_over_the_mesh_are_refused_by_name():
    with pytest.raises(ValueError, match=r"attn.*key.*does not split over mesh axes"):
        make_run(make_mesh(fsdp=4, tensor=2), weight_format="block_sparse")


# the drop/grow configs update every 2 of the 6 steps; the others take no extra binding
# (block_gmp shrinks its fan-in in stages instead of moving blocks)
MOVES = {"sparsity/block_static.gin": False, "sparsity/block_set.gin": True,
         "sparsity/block_rigl.gin": True, "sparsity/block_gmp.gin": False,
         "sparsity/monarch.gin": False}


@pytest.mark.parametrize("config_file", sorted(MOVES))
def test_shipped_compact_configs_train_through_the_cli_on_8_devices(config_file, tmp_path):
    """tiny + each compact config on the 8 simulated devices (data 4 x fsdp 2): the run
    finishes with finite losses, drop/grow configs move blocks, block_gmp's stored fraction
    falls from 1 (its resized params keep their shardings), and the checkpoint holds the
    compact params."""
    extra = ["--gin.DropGrowSchedule.frequency=2"] if MOVES[config_file] else []
    rc = cli.main(["train", "--gin_file=tiny.gin", f"--gin_file={config_file}",
                   f"--workdir={tmp_path}", "--quiet", "--gin.make_mesh.fsdp=2",
                   "--gin.TrainConfig.num_steps=6", "--gin.TrainConfig.log_every=2",
                   "--gin.TrainConfig.eval_every=6", "--gin.TrainConfig.eval_tokens=512",
                   "--gin.TrainConfig.checkpoint_every=6",
                   "--gin.TrainConfig.progress_bar=False", *extra])
    assert rc == 0
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3 and all(np.isfinite(losses))
    churn = [r["sparsity/churn"] for r in records if "sparsity/churn" in r]
    density = [r["sparsity/density"] for r in records if "sparsity/density" in r]
    if "block_gmp" in config_file:  # its stages are its updates: the fan-in shrinks
        assert density[0] == 1.0 and density[-1] < 0.3
    else:
        assert (len(churn) > 0 and all(c > 0 for c in churn)) == MOVES[config_file]
    _, state = restore_state_numpy(str(tmp_path))
    wo = state["params"]["layer_0"]["mlp"]["wo"]
    assert set(wo) == ({"blkdiag1", "blkdiag2"} if "monarch" in config_file else {"values"})
