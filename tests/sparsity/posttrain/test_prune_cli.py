"""`sparsejax prune` end to end on tiny models: the output workdir (checkpoint with exact
zeros and masks, fixed-mask fine-tune config, report, step-0 metrics), sparse recovery
fine-tuning that keeps the masks, expert merging into a smaller MoE, an imported HF model
pruned 2:4 and exported with exact zeros, and bad input refused before any work."""
import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sparsejax import cli
from sparsejax.train.checkpoint import restore_state_numpy

RUN = ["--gin.TrainConfig.global_batch_size=8", "--gin.TrainConfig.seq_len=32",
       "--gin.TrainConfig.log_every=2", "--gin.TrainConfig.eval_every=4",
       "--gin.TrainConfig.eval_tokens=512", "--gin.TrainConfig.checkpoint_every=4",
       "--gin.TrainConfig.progress_bar=False", "--gin.TrainConfig.async_checkpoints=False"]
PRUNE = ["--calibration_samples=8", "--quiet"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus, make_source):
    return make_source(tmp_path_factory.mktemp("src") / "w", *RUN, corpus)


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_pruned_workdir_and_recovery_fine_tune(trained, tmp_path, capsys):
    out = str(tmp_path / "pruned")
    capsys.readouterr()
    assert cli.main(["prune", f"--workdir={trained}", f"--out={out}", "--method=sparsegpt",
                     "--sparsity=0.5", "--finetune_steps=4", *PRUNE]) == 0
    summary = last_json(capsys)
    assert summary["density"] == pytest.approx(0.5)
    report = json.load(open(os.path.join(out, "prune_report.json")))
    assert report["settings"]["method"] == "sparsegpt" and report["calibration"]["samples"] == 8
    assert report["calibration"]["seq_len"] == 32 and report["calibration"]["seed"] == 0
    assert {l["path"] for l in report["layers"]} >= {"layer_0/attn/query", "layer_1/mlp/wo/kernel"}
    for layer in report["layers"]:
        assert layer["density"] == pytest.approx(0.5) and layer["recon_error"] >= 0
        assert layer["seconds"] > 0
    assert report["eval_before"]["eval_loss"] > 0 and report["eval_after"]["eval_perplexity"] > 1
    text = open(os.path.join(out, "config.gin")).read()
    assert "make_method.name = 'fixed_masks'" in text and "TrainConfig.num_steps = 4" in text
    assert "# PruneConfig.method = 'sparsegpt'" in text  # a record, not a binding
    step, state = restore_state_numpy(out)
    assert step == 0
    masks = state["sparsity"]["masks"]
    assert masks["lm_head"]["kernel"] is None  # the LM head stays dense by default
    q, mq = state["params"]["layer_0"]["attn"]["query"], masks["layer_0"]["attn"]["query"]
    assert np.all(q[~mq] == 0) and mq.mean() == 0.5
    records = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert records[0]["step"] == 0 and "corpus_fingerprint" in records[0]
    assert any(r.get("eval_loss") == pytest.approx(report["eval_after"]["eval_loss"])
               for r in records)
    # sparse recovery fine-tuning: `train` continues from the pruned checkpoint, masks fixed
    assert cli.main(["train", f"--workdir={out}", "--quiet"]) == 0
    step, tuned = restore_state_numpy(out)
    assert step == 4
    tq = tuned["params"]["layer_0"]["attn"]["query"]
    np.testing.assert_array_equal(tuned["sparsity"]["masks"]["layer_0"]["attn"]["query"], mq)
    assert np.all(tq[~mq] == 0) and not np.array_equal(tq[mq], q[mq])


def test_scanned_model_is_pruned_in_its_own_layout(tmp_path, corpus, make_source, capsys):
    """A scan_layers run is calibrated block by block (unscanned), written back stacked, and
    its recovery fine-tune keeps the stacked masks."""
    src = make_source(tmp_path / "scanned", *RUN, corpus, "--gin.ModelConfig.scan_layers=True")
    out = str(tmp_path / "pruned")
    capsys.readouterr()
    assert cli.main(["prune", f"--workdir={src}", f"--out={out}", "--method=wanda",
                     "--sparsity=0.5", "--finetune_steps=2", *PRUNE]) == 0
    report = json.load(open(os.path.join(out, "prune_report.json")))
    assert {l["path"] for l in report["layers"]} >= {"layer_0/attn/query", "layer_1/mlp/wo/kernel"}
    assert all(l["density"] == pytest.approx(0.5) for l in report["layers"])
    _, state = restore_state_numpy(out)
    assert "layer_0" not in state["params"] and "layers" in state["params"]
    q = state["params"]["layers"]["block_0"]["attn"]["query"]
    mq = state["sparsity"]["masks"]["layers"]["block_0"]["attn"]["query"]
    assert q.shape[0] == 2 and np.all(q[~mq] == 0)
    for i in range(2):  # each layer of the stack is pruned to the target on its own
        assert mq[i].mean() == pytest.approx(0.5)
    capsys.readouterr()
    assert cli.main(["eval", f"--workdir={out}", "--quiet"]) == 0
    assert last_json(capsys)["eval_loss"] == pytest.approx(report["eval_after"]["eval_loss"],
                                                           rel=1e-5)
    assert cli.main(["train", f"--workdir={out}", "--quiet"]) == 0
    _, tuned = restore_state_numpy(out)
    np.testing.assert_array_equal(tuned["sparsity"]["masks"]["layers"]["block_0"]["attn"]["query"],
                                  mq)
    assert np.all(tuned["params"]["layers"]["block_0"]["attn"]["query"][~mq] == 0)


def test_merged_experts_make_a_smaller_moe_checkpoint(tmp_path, corpus, make_source, capsys):
    moe = ["--gin.ModelConfig.mlp_kinds=('dense', 'moe')", "--gin.MoeMlp.num_experts=4",
           "--gin.MoeMlp.top_k=2", "--gin.MoeMlp.mlp_dim=32", "--gin.MoeMlp.dispatch='onehot'"]
    src = make_source(tmp_path / "moe", *RUN, corpus, *moe)
    out = str(tmp_path / "merged")
    capsys.readouterr()
    assert cli.main(["prune", f"--workdir={src}", f"--out={out}", "--method=wanda",
                     "--experts=merge", "--num_experts=2", "--finetune_steps=2", *PRUNE]) == 0
    report = json.load(open(os.path.join(out, "prune_report.json")))
    groups = report["experts"][0]["groups"]
    assert len(groups) == 2 and sorted(sum(groups, [])) == [0, 1, 2, 3]
    _, state = restore_state_numpy(out)
    m = state["params"]["layer_1"]["moe"]
    assert m["router_kernel"].shape[-1] == 2 and m["experts"]["wo"].shape[0] == 2
    assert "MoeMlp.num_experts = 2" in open(os.path.join(out, "config.gin")).read()
    capsys.readouterr()
    assert cli.main(["eval", f"--workdir={out}", "--quiet"]) == 0  # the smaller model restores
    assert last_json(capsys)["eval_loss"] == pytest.approx(report["eval_after"]["eval_loss"])


def test_imported_model_pruned_2of4_exports_exact_zeros(tmp_path, corpus, capsys):
    src = tmp_path / "hf"
    src.mkdir()
    d, f, v = 32, 64, 272
    rng = np.random.default_rng(0)
    t = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    for i in range(2):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                  p + "self_attn.q_proj.weight": (32, d), p + "self_attn.k_proj.weight": (16, d),
                  p + "self_attn.v_proj.weight": (16, d), p + "self_attn.o_proj.weight": (d, 32),
                  p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                  p + "mlp.down_proj.weight": (d, f)})
    save_file({k: (rng.standard_normal(s) * 0.3).astype(np.float32) for k, s in t.items()},
              str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(dict(
        model_type="llama", vocab_size=v, hidden_size=d, intermediate_size=f,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_theta=10000.0, hidden_act="silu")))
    w, out, hf = str(tmp_path / "w"), str(tmp_path / "p"), str(tmp_path / "export")
    assert cli.main(["import-hf", f"--src={src}", f"--workdir={w}"]) == 0
    assert cli.main(["prune", f"--workdir={w}", f"--out={out}", "--method=wanda", "--nm=2:4",
                     "--dsnot", corpus, "--gin.TrainConfig.seq_len=32",
                     "--gin.TrainConfig.eval_tokens=512", *PRUNE]) == 0
    assert cli.main(["export-hf", f"--workdir={out}", f"--out={hf}"]) == 0
    tensors = load_file(os.path.join(hf, "model.safetensors"))
    for name, x in tensors.items():
        if "proj" in name:  # HF [out, in]: N:M groups run along the input (last) axis
            nz = (x.reshape(x.shape[0], -1, 4) != 0).sum(-1)
            assert np.all(nz <= 2) and (nz == 2).mean() > 0.99, name
        elif "embed" in name or "norm" in name:
            assert np.all(x != 0), name  # never pruned
    assert json.load(open(os.path.join(hf, "config.json")))["model_type"] == "llama"


@pytest.mark.parametrize("args,match", [
    (["--sparsity=1.5"], r"PruneConfig.sparsity=1.5 must be in \(0, 1\)"),
    (["--nm=3:5"], "not divisible by M=5"),
    (["--calibration_samples=100000"], "PruneConfig.calibration_samples=100000 exceeds the"),
    (["--gin.make_method.name='rigl'"], "is set by `sparsejax prune`"),
    (["--gin.DSnoT.max_cycles=3"], "have no effect on this run.*DSnoT.max_cycles"),
    (["--method=gblm", "--structure=global"], "not available for PruneConfig.method='gblm'"),
])
def test_bad_input_is_refused_with_one_line(trained, tmp_path, capsys, args, match):
    capsys.readouterr()
    out = str(tmp_path / "o")
    assert cli.main(["prune", f"--workdir={trained}", f"--out={out}", *PRUNE, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and __import__("re").search(match, err), err
    assert not os.path.exists(os.path.join(out, "checkpoints"))


def test_a_workdir_without_a_checkpoint_is_refused(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["prune", f"--workdir={empty}", f"--out={tmp_path / 'o'}", *PRUNE]) == 2
    assert "holds no checkpoint and no imported params" in capsys.readouterr().err
