"""`sparsejax prune --structure=block --compact`: the pruned workdir stores the projections in
the compact block-sparse format, computes what the same pruning written as masked dense
kernels computes (selected by hand here: each block column's largest blocks by sum |w|), and
fine-tunes; BlockStructure.per_column keeps a constant fan-in; --compact without the block
structure is refused."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import cli
from sparsejax.models.formats.block_sparse import block_mask
from sparsejax.sparsity.structures import BlockStructure
from sparsejax.train import trainer
from sparsejax.train.checkpoint import restore_state_numpy
from sparsejax.train.commands import parse_workdir_config

RUN = ["TrainConfig.global_batch_size=8", "TrainConfig.seq_len=32", "TrainConfig.log_every=1",
       "TrainConfig.eval_tokens=512", "TrainConfig.progress_bar=False",
       "TrainConfig.async_checkpoints=False"]
PRUNE = ["--method=magnitude", "--structure=block", "--gin.BlockStructure.block=(16, 16)",
         "--sparsity=0.5", "--finetune_steps=2", "--calibration_samples=8", "--quiet"]
PROJECTIONS = [("attn", n) for n in ("query", "key", "value", "out")] + \
    [("mlp", n) for n in ("wi_gate", "wi_up", "wo")]


@pytest.fixture(scope="module")
def source(tmp_path_factory, corpus, make_source):
    """A dense tiny workdir: a run's step-0 checkpoint and config (no train step compiled)."""
    return make_source(tmp_path_factory.mktemp("prune_compact") / "dense", corpus,
                       *[f"--gin.{b}" for b in RUN])


def model_params(workdir):
    parse_workdir_config(workdir, [], [])
    run, _, state = trainer.load_state_for_eval(workdir, trainer.TrainConfig())
    method = run.sparsity_method
    return run, jax.device_get(jax.jit(lambda s: method.finalize(s.params, s.sparsity))(state))


def masked_dense_prune(params):
    """The source's params with magnitude block pruning written as masked dense kernels: in
    every 16x16 block column the half of the blocks with the largest sum |w| (by hand)."""
    out = jax.tree.map(np.array, params)
    masks = {}
    for layer in ("layer_0", "layer_1"):
        for group, name in PROJECTIONS:
            node = out[layer][group]
            key = "kernel" if name in ("wi_gate", "wi_up", "wo") else None
            w = node[name][key] if key else node[name]
            i, o = w.shape
            sums = np.abs(w).reshape(i // 16, 16, o // 16, 16).sum(axis=(1, 3))
            kept = np.zeros_like(sums, bool)
            for col in range(o // 16):
                kept[np.argsort(-sums[:, col], kind="stable")[:i // 32], col] = True
            mask = np.repeat(np.repeat(kept, 16, 0), 16, 1)
            w *= mask
            masks[f"{layer}/{group}/{name}"] = mask
    return out, masks


def test_compact_prune_equals_the_masked_dense_prune_and_fine_tunes(source, tmp_path):
    compact = str(tmp_path / "compact")
    assert cli.main(["prune", f"--workdir={source}", f"--out={compact}", "--compact",
                     *PRUNE]) == 0
    text = open(os.path.join(compact, "config.gin")).read()
    for line in ("ModelConfig.weight_format = 'block_sparse'", "BlockSparse.block_in = 16",
                 "BlockSparse.block_out = 16", "BlockSparse.density = 0.5",
                 "make_method.name = 'dense'", "TrainConfig.num_steps = 2"):
        assert line in text, line

    src_run, src_params = model_params(source)
    dense, masks = masked_dense_prune(src_params)
    _, c_state = restore_state_numpy(compact)
    for path, mask in masks.items():
        layer, group, name = path.split("/")
        idx = c_state["sparsity"]["layout"][layer][group][name]["indices"]
        assert idx.shape[1] == mask.shape[0] // 32  # constant fan-in: half the input blocks
        np.testing.assert_array_equal(block_mask(idx, mask.shape[0], 16, 16), mask, path)
    c_run, c_params = model_params(compact)
    tokens = jnp.asarray(np.arange(32, dtype=np.int32)[None] * 5 % 250)
    np.testing.assert_allclose(c_run.model.apply({"params": c_params}, tokens),
                               src_run.model.apply({"params": dense}, tokens),
                               atol=1e-5, rtol=1e-5)
    first = [json.loads(line) for line in open(os.path.join(compact, "metrics.jsonl"))]
    assert {"step": 0, "sparsity/density": 0.5} in first

    # the recovery fine-tune trains the stored blocks; the layout stays
    assert cli.main(["train", f"--workdir={compact}", "--quiet"]) == 0
    step, tuned = restore_state_numpy(compact)
    assert step == 2
    before = c_state["params"]["layer_0"]["mlp"]["wo"]["values"]
    after = tuned["params"]["layer_0"]["mlp"]["wo"]["values"]
    assert after.shape == before.shape and np.abs(after - before).max() > 1e-4
    for a, b in zip(jax.tree.leaves(tuned["sparsity"]["layout"]),
                    jax.tree.leaves(c_state["sparsity"]["layout"])):
        np.testing.assert_array_equal(a, b)
    losses = [r["loss"] for r in map(json.loads, open(os.path.join(compact, "metrics.jsonl")))
              if "loss" in r]
    assert len(losses) == 2 and np.all(np.isfinite(losses))


@pytest.mark.parametrize("args", [[], ["--structure=per_output"]])
def test_compact_without_the_block_structure_is_refused(source, tmp_path, capsys, args):
    capsys.readouterr()
    out = str(tmp_path / "o")
    assert cli.main(["prune", f"--workdir={source}", f"--out={out}", "--method=magnitude",
                     "--compact", "--quiet", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "--compact" in err and "--structure=block" in err, err
    assert not os.path.exists(os.path.join(out, "checkpoints"))


def test_per_column_block_selection_keeps_a_constant_fan_in():
    rng = np.random.default_rng(0)
    blocks = rng.random((8, 4)) + np.array([10.0, 0, 0, 0])  # [in_blocks, out_blocks]
    scores = jnp.asarray(np.repeat(np.repeat(blocks, 2, axis=0), 2, axis=1))  # 2x2 blocks
    ones = {"w": jnp.ones((16, 8), bool)}
    count = {"w": jnp.asarray(8 * 2 * 2)}  # 8 of the 32 blocks
    for per_column, expected in ((False, [8, 0, 0, 0]), (True, [2, 2, 2, 2])):
        keep = BlockStructure(block=(2, 2), per_column=per_column).select(
            {"w": scores}, ones, count, scale=1.0, alive_only=False)["w"]
        kept = np.asarray(keep)[::2, ::2]  # [in_blocks, out_blocks]
        assert list(kept.sum(axis=0)) == expected, per_column
        np.testing.assert_array_equal(np.asarray(keep), np.repeat(np.repeat(kept, 2, 0), 2, 1))
    # per column: each column's best blocks
    assert set(np.nonzero(kept[:, 1])[0]) == set(np.argsort(-blocks[:, 1])[:2])
