"""The commands a researcher stacks on a run, on a compact (block-sparse) run: a tiny block
RigL run (its layout moves at every update step) is trained uninterrupted, and again stopped
at step 13 (the trainer's SIGTERM path) and resumed. Resume gives the same losses, params and
layout; the layout survives the checkpoint; `eval` gives the logged eval loss; `sample` is
deterministic and decodes (KV cache, block-sparse matmul at 1-token steps) what the dense twin
of the params decodes; `export-hf` writes dense kernels with exact zeros outside the stored
blocks, which import back into a dense model with the same logits; activation thresholds are
refused before anything compiles."""
import json
import os

import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from sparsejax import cli
from sparsejax.data.tokenizer import make_tokenizer
from sparsejax.infer.generate import generate
from sparsejax.infer.workdir import sample_workdir
from sparsejax.models.formats import block_sparse as block_sparse_lib
from sparsejax.models.formats.block_sparse import block_mask
from sparsejax.models.formats.convert import dense_twin, to_dense_params
from sparsejax.models.transformer import ModelConfig, Transformer
from sparsejax.sparsity.activation.thresholding import check_model
from sparsejax.train import trainer
from sparsejax.train.checkpoint import restore_state_numpy
from sparsejax.train.commands import parse_workdir_config

STEPS, STOP = 20, 13
RUN = ["--gin_file=tiny.gin", "--gin_file=sparsity/block_rigl.gin", "--quiet",
       f"--gin.TrainConfig.num_steps={STEPS}", "--gin.TrainConfig.checkpoint_every=10",
       "--gin.TrainConfig.eval_every=10", "--gin.TrainConfig.log_every=1",
       "--gin.TrainConfig.eval_tokens=1024", "--gin.TrainConfig.progress_bar=False",
       "--gin.TrainConfig.async_checkpoints=False",
       "--gin.ModelConfig.scale_embeddings=False"]  # (an option HF checkpoints cannot express)
PROJECTIONS = [("attn", n) for n in ("query", "key", "value", "out")] + \
    [("mlp", n) for n in ("wi_gate", "wi_up", "wo")]
HF = {"query": "self_attn.q_proj", "key": "self_attn.k_proj", "value": "self_attn.v_proj",
      "out": "self_attn.o_proj", "wi_gate": "mlp.gate_proj", "wi_up": "mlp.up_proj",
      "wo": "mlp.down_proj"}


def records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(workdir):
    return [(r["step"], r["loss"]) for r in records(workdir) if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{'ref': uninterrupted workdir, 'resumed': stopped at STOP and resumed,
    'restored_layout': the layout the resumed run started from}."""
    root = tmp_path_factory.mktemp("compact")
    ref, resumed = str(root / "ref"), str(root / "resumed")
    assert cli.main(["train", f"--workdir={ref}", *RUN]) == 0
    seen = {}
    with pytest.MonkeyPatch.context() as mp:
        # the loop's SIGTERM check says "stop" after step STOP (a checkpoint is forced there)
        mp.setattr(trainer, "preemption_agreed", lambda req, ckpt, step: step == STOP)
        assert cli.main(["train", f"--workdir={resumed}", *RUN]) == 0
    assert sorted(int(d) for d in os.listdir(os.path.join(resumed, "checkpoints"))) == [10, STOP]
    original = trainer.warm_start

    def spy(state, shardings, **kw):
        if kw.get("resumed"):
            seen["step"] = int(state.step)
            seen["layout"] = jax.device_get(state.sparsity["layout"])
        return original(state, shardings, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "warm_start", spy)
        assert cli.main(["train", f"--workdir={resumed}", *RUN]) == 0
    return {"ref": ref, "resumed": resumed, "restored_step": seen["step"],
            "restored_layout": seen["layout"]}


def assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resumed_run_equals_the_uninterrupted_run(runs):
    ref, res = losses(runs["ref"]), losses(runs["resumed"])
    assert [s for s, _ in ref] == list(range(1, STEPS + 1))
    assert res == ref  # every step's loss, bit for bit
    _, a = restore_state_numpy(runs["ref"], STEPS)
    _, b = restore_state_numpy(runs["resumed"], STEPS)
    for part in ("params", "opt_state"):
        assert_trees_equal(a[part], b[part])
    assert_trees_equal(a["sparsity"]["layout"], b["sparsity"]["layout"])


def test_the_layout_survives_the_checkpoint(runs):
    _, at10 = restore_state_numpy(runs["resumed"], 10)
    _, saved = restore_state_numpy(runs["resumed"], STOP)
    moved = [not np.array_equal(at10["sparsity"]["layout"][layer][g][n]["indices"],
                                saved["sparsity"]["layout"][layer][g][n]["indices"])
             for layer in ("layer_0", "layer_1") for g, n in PROJECTIONS]
    assert any(moved)  # RigL moved blocks between the two checkpoints
    assert runs["restored_step"] == STOP
    assert_trees_equal(runs["restored_layout"], saved["sparsity"]["layout"])


def test_eval_of_the_workdir_is_the_logged_eval(runs, capsys):
    logged = [r["eval_loss"] for r in records(runs["ref"]) if r.get("step") == STEPS
              and "eval_loss" in r]
    capsys.readouterr()
    assert cli.main(["eval", f"--workdir={runs['ref']}", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["step"] == STEPS and out["eval_rows"] == 16
    assert out["eval_loss"] == pytest.approx(logged[0], rel=1e-6, abs=0)


def model_params(workdir):
    """(run, params the compact model computes with) of the workdir's latest checkpoint."""
    parse_workdir_config(workdir, [], [])
    run, _, state = trainer.load_state_for_eval(workdir, trainer.TrainConfig())
    method = run.sparsity_method
    return run, jax.device_get(jax.jit(
        lambda s: method.forward_params(s.params, s.sparsity, rng=None))(state))


def test_sample_is_deterministic_and_decodes_the_compact_params(runs, monkeypatch):
    rows = []
    original = block_sparse_lib.block_sparse_matmul

    def spy(x, *args, **kw):
        rows.append(x.shape[0])
        return original(x, *args, **kw)

    monkeypatch.setattr(block_sparse_lib, "block_sparse_matmul", spy)
    prompts = ["def fib(n):", "import "]
    parse_workdir_config(runs["ref"], [], [])
    first = sample_workdir(runs["ref"], prompts, max_new_tokens=12)
    assert 2 in rows  # decode steps: 2 rows x 1 token through the block-sparse matmul
    assert sample_workdir(runs["ref"], prompts, max_new_tokens=12)["tokens"] == first["tokens"]

    run, params = model_params(runs["ref"])
    twin = Transformer(dense_twin(run.model_config))
    dense = to_dense_params(params, run.model_config)
    tok = make_tokenizer()
    ids = [list(tok.encode(p, add_bos=True)) for p in prompts]
    expected = generate(twin, dense, ids, max_new_tokens=12, pad_id=tok.pad_id,
                        eos_id=tok.eos_id)
    assert first["tokens"] == expected["tokens"]
    tokens = jnp.asarray([ids[0]], jnp.int32)
    np.testing.assert_allclose(run.model.apply({"params": params}, tokens),
                               twin.apply({"params": dense}, tokens), atol=1e-5, rtol=1e-5)


def test_export_writes_dense_kernels_that_import_back_with_the_same_logits(runs, tmp_path):
    hf, imported = str(tmp_path / "hf"), str(tmp_path / "imported")
    assert cli.main(["export-hf", f"--workdir={runs['ref']}", f"--out={hf}"]) == 0
    run, params = model_params(runs["ref"])
    tensors = load_file(os.path.join(hf, "model.safetensors"))
    for i in range(2):
        for group, name in PROJECTIONS:
            p = params[f"layer_{i}"][group][name]
            kernel = tensors[f"model.layers.{i}.{HF[name]}.weight"].T  # HF [out, in]
            _, _, bi, bo = p["values"].shape
            np.testing.assert_array_equal(kernel, block_sparse_lib.BlockSparse().to_dense(
                p, kernel.shape[0]))
            blocks = kernel.reshape(kernel.shape[0] // bi, bi, kernel.shape[1] // bo, bo)
            nonzero = np.abs(blocks).sum(axis=(1, 3)) > 0  # [in_blocks, out_blocks]
            stored = np.asarray(block_mask(p["indices"], kernel.shape[0], bi, bo))[::bi, ::bo]
            # a stored block may hold exact zeros (RigL grows blocks at zero, and one grown
            # where its partner is zero, a key block for a query block or an up block for a
            # gate block, gets no gradient): nonzero where stored and its values are, exactly
            # zero everywhere else
            stored_nonzero = np.zeros_like(stored)
            for o, (idx, norms) in enumerate(zip(p["indices"], np.abs(p["values"]).sum((2, 3)))):
                stored_nonzero[idx, o] = norms > 0
            assert stored_nonzero.sum() >= 0.5 * stored.sum()
            np.testing.assert_array_equal(nonzero, stored_nonzero, err_msg=f"layer_{i}/{name}")
    assert cli.main(["import-hf", f"--src={hf}", f"--workdir={imported}"]) == 0
    drun, dparams = model_params(imported)
    assert drun.model_config.formats().all_dense
    tokens = jnp.asarray(np.arange(40, dtype=np.int32)[None] % 250 + 3)
    np.testing.assert_allclose(drun.model.apply({"params": dparams}, tokens),
                               run.model.apply({"params": params}, tokens), atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("command,bindings,site", [
    ("eval", ["--gin.Thresholding.method='teal'", "--gin.Thresholding.target=0.5"],
     "layer_0/attn/query_in"),
    ("eval", ["--gin.Thresholding.method='cats'", "--gin.Thresholding.target=0.5"],
     "layer_0/mlp/gate_act"),
    ("sample", ["--prompt=x", "--gin.Thresholding.method='wina'",
                "--gin.Thresholding.target=0.5", "--gin.Thresholding.projections=('down',)"],
     "layer_0/mlp/wo_in"),
    ("act-curves", ["--gin.ThresholdCurves.methods=('teal',)"], "layer_0/attn/query_in"),
])
def test_thresholds_on_compact_projections_are_refused_before_compiling(
        runs, capsys, command, bindings, site):
    events = []
    listener = lambda name, *a, **k: events.append(name)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        capsys.readouterr()
        assert cli.main([command, f"--workdir={runs['ref']}", *bindings]) == 2
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    err = capsys.readouterr().err
    assert "ModelConfig.weight_format='block_sparse'" in err and site in err, err
    assert not [e for e in events if e.startswith("/jax/core/compile")]


def test_thresholds_are_allowed_on_projections_kept_dense():
    cfg = ModelConfig(num_layers=2, weight_format="block_sparse",
                      weight_format_overrides={"attn/": "dense"})
    check_model(cfg, "teal", ("q", "k", "v", "o"))
    with pytest.raises(ValueError, match=r"layer_0/mlp/wi_up_in.*weight_format"):
        check_model(cfg, "teal", ("q", "up"))
