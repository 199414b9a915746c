"""Gradual magnitude pruning of compact block-sparse weights (configs/sparsity/block_gmp.gin):
the fan-in shrinks in planned stages, keeping each column's largest blocks with their Adam
slots; checkpoints hold the shrunk shapes, a resumed run restores them and continues as the
uninterrupted one, and `eval` reads the final checkpoint; the scanned layout prunes alike."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pallas_kernels.block_sparse_matmul.reference import to_dense
from sparsejax import cli
from sparsejax.sparsity import schedules as S
from sparsejax.sparsity.block_gmp import BlockGMPMethod, keep_slots, take
from sparsejax.sparsity.layout import LAYOUT
from sparsejax.sparsity.method import CompactProjection, RunInfo
from sparsejax.train.checkpoint import restore_state_numpy


def test_a_stage_keeps_each_columns_largest_blocks():
    values = jax.random.normal(jax.random.key(0), (3, 5, 4, 2))
    indices = jnp.array([[0, 2, 3, 5, 7], [1, 2, 4, 6, 7], [0, 1, 2, 3, 4]], jnp.int32)
    slots = keep_slots(values, 2)
    norms = np.asarray(jnp.sqrt(jnp.sum(values ** 2, axis=(2, 3))))
    for col in range(3):
        assert set(np.asarray(slots[col]).tolist()) == set(np.argsort(-norms[col])[:2].tolist())
    kept_v, kept_i = take(values, slots), take(indices, slots)
    dense = np.asarray(to_dense(values, indices, 8))
    mask = np.asarray(to_dense(jnp.ones_like(kept_v), kept_i, 8)).astype(bool)
    np.testing.assert_array_equal(np.asarray(to_dense(kept_v, kept_i, 8)),
                                  np.where(mask, dense, 0))


def bound_method(density=0.1, steps=100):
    method = BlockGMPMethod(density, S.PolynomialSchedule(start=0.1, end=0.7, frequency=0.2))
    compact = {"l/a": CompactProjection(128, 64, 0), "l/b": CompactProjection(256, 128, 0)}
    return method.bind(RunInfo(num_steps=steps, compact=compact))


def params_at(k_a=8, k_b=16):
    return {"l": {"a": {"values": jnp.ones((4, k_a, 16, 16))},
                  "b": {"values": jnp.ones((8, k_b, 16, 16))}}}


def test_stages_shrink_to_the_target_and_skip_steps_that_change_nothing():
    method = bound_method()
    method.init(params_at(), jax.random.key(0))
    steps = [t for t, _ in method.stages]
    assert steps == sorted(steps) and all(method.is_update_step(t) for t in steps)
    assert not method.is_update_step(10)  # the schedule's first step: scale 0, no change
    ks = [(k["l/a/values"], k["l/b/values"]) for _, k in method.stages]
    assert all(a >= c and b >= d and (a, b) != (c, d) for (a, b), (c, d) in zip(ks, ks[1:]))
    assert ks[-1] == (1, 2)  # round(0.1 * 8) -> at least 1; round(0.1 * 16)


def test_an_update_takes_the_next_stage_and_the_kept_blocks_adam_slots():
    method = bound_method()
    params = params_at()
    params = jax.tree.map(lambda x: x * jax.random.uniform(jax.random.key(1), x.shape), params)
    _, sparsity = method.init(params, jax.random.key(0))
    layout = {"l": {n: {"indices": jnp.tile(jnp.arange(params["l"][n]["values"].shape[1],
                                                       dtype=jnp.int32),
                                            (params["l"][n]["values"].shape[0], 1))}
                    for n in ("a", "b")}}
    sparsity = {**sparsity, LAYOUT: layout}
    tx = optax.adam(1e-3)
    opt = tx.init(params)
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(2), x.shape), params)
    _, opt = tx.update(grads, opt, params)
    step, first = method.stages[0]
    new_p, new_o, new_s, metrics = method.update(params, opt, sparsity, step=step)
    for n in ("a", "b"):
        v = params["l"][n]["values"]
        k = first[f"l/{n}/values"]
        slots = keep_slots(v, k)
        assert new_p["l"][n]["values"].shape == (v.shape[0], k, 16, 16)
        assert new_s[LAYOUT]["l"][n]["indices"].shape == (v.shape[0], k)
        np.testing.assert_array_equal(new_o[0].mu["l"][n]["values"],
                                      take(opt[0].mu["l"][n]["values"], slots))
        np.testing.assert_array_equal(new_s[LAYOUT]["l"][n]["indices"], slots)  # arange layout
    assert float(metrics["sparsity/density"]) < 1.0 and float(metrics["sparsity/churn"]) > 0
    # the next update starts from the shrunk shapes and takes the stage after
    _, _, _, m2 = method.update(new_p, new_o, new_s, step=method.stages[1][0])
    assert float(m2["sparsity/density"]) < float(metrics["sparsity/density"])


@pytest.mark.parametrize("density, match", [(1.0, "must be below the stored fraction"),
                                            (0.0, "BlockGMPMethod.density")])
def test_bad_targets_are_refused(density, match):
    with pytest.raises(ValueError, match=match):
        bound_method(density).init(params_at(), jax.random.key(0))


def test_a_model_without_block_sparse_weights_is_refused():
    method = BlockGMPMethod(0.1).bind(RunInfo(num_steps=10))
    with pytest.raises(ValueError, match="weight_format='block_sparse'"):
        method.init({"w": {"kernel": jnp.ones((4, 4))}}, jax.random.key(0))


def test_a_non_gradual_schedule_is_refused():
    with pytest.raises(ValueError, match="BlockGMPMethod.schedule"):
        BlockGMPMethod(0.1, S.DropGrowSchedule())


STEPS = 24
RUN = ["--gin_file=tiny.gin", "--gin_file=sparsity/block_gmp.gin", "--quiet",
       "--gin.ModelConfig.num_layers=2", f"--gin.TrainConfig.num_steps={STEPS}",
       "--gin.TrainConfig.checkpoint_every=8", f"--gin.TrainConfig.eval_every={STEPS}",
       "--gin.TrainConfig.log_every=4", "--gin.TrainConfig.eval_tokens=1024",
       "--gin.TrainConfig.progress_bar=False", "--gin.TrainConfig.async_checkpoints=False"]


def records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gmp")
    out = {}
    for name, extra in (("ref", []), ("scanned", ["--gin.ModelConfig.scan_layers=True"])):
        assert cli.main(["train", *RUN, *extra, f"--workdir={root / name}"]) == 0
        out[name] = str(root / name)
    return out


def test_the_run_shrinks_in_stages_and_resumes_across_them(runs, tmp_path):
    recs = records(runs["ref"])
    stages = [r for r in recs if "sparsity/churn" in r]
    assert len(stages) >= 2
    last = [r for r in recs if "sparsity/avg_param_count" in r][-1]
    assert last["sparsity/avg_density"] > last["sparsity/density"]  # it started with all blocks
    assert last["sparsity/avg_param_count"] > last["sparsity/param_count"]
    _, state = restore_state_numpy(runs["ref"])
    wo = state["params"]["layer_0"]["mlp"]["wo"]["values"]
    assert wo.shape == (4, 1, 16, 16)  # 1 of wo's 8 input blocks at the end (of 8 at init)
    assert state["sparsity"]["layout"]["layer_0"]["mlp"]["wo"]["indices"].shape == (4, 1)
    mu = [x for x in jax.tree.leaves(state["opt_state"]) if np.shape(x) == wo.shape]
    assert mu  # Adam's moments shrank with the values
    # restart from the checkpoint at step 8 (before the later stages): the stages run again
    # and the run ends where the uninterrupted one did
    resumed = tmp_path / "resumed"
    shutil.copytree(runs["ref"], resumed)
    for step in os.listdir(resumed / "checkpoints"):
        if step.isdigit() and int(step) > 8:
            shutil.rmtree(resumed / "checkpoints" / step)
    assert cli.main(["train", *RUN, f"--workdir={resumed}"]) == 0
    want = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    got = [(r["step"], r["loss"]) for r in records(resumed) if "loss" in r]
    assert got == want


def test_eval_reads_the_shrunk_checkpoint(runs, capsys):
    assert cli.main(["eval", f"--workdir={runs['ref']}"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    logged = [r for r in records(runs["ref"]) if "eval_loss" in r][-1]
    assert result["eval_loss"] == pytest.approx(logged["eval_loss"], rel=1e-5)


def test_the_scanned_layout_prunes_alike(runs):
    ref = [(r["step"], r["loss"]) for r in records(runs["ref"]) if "loss" in r]
    scanned = [(r["step"], r["loss"]) for r in records(runs["scanned"]) if "loss" in r]
    assert [s for s, _ in ref] == [s for s, _ in scanned]
    np.testing.assert_allclose([v for _, v in scanned], [v for _, v in ref], rtol=2e-4)
