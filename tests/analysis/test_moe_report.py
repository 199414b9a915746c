"""`sparsejax moe-report` on a sparsejax MoE workdir (no torch): the JSON's expert load is the
model's own routing of the calibration tokens (its sown `expert_load`), its counts,
co-activation and consistency measures agree with each other and with their definitions,
the plots are written, and bad input is refused in one line."""
import json
import os

import gin
import jax
import numpy as np
import pytest

from sparsejax import cli
from sparsejax.analysis.moe_report import MoeReport
from sparsejax.models.transformer import ModelConfig, Transformer
from sparsejax.sparsity.posttrain.workdir import calibration_set
from sparsejax.train import trainer
from sparsejax.train.checkpoint import restore_state_numpy
from sparsejax.train.commands import parse_workdir_config

DOCS = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n",
        "for i in range(10):\n    total += i * i\n", "class Point:\n    x: int = 0\n"]
RUN = ["--gin.TrainConfig.global_batch_size=8", "--gin.TrainConfig.seq_len=32",
       "--gin.TrainConfig.eval_tokens=256"]
MOE = ["--gin.ModelConfig.mlp_kinds=('dense', 'moe')", "--gin.MoeMlp.num_experts=4",
       "--gin.MoeMlp.top_k=2", "--gin.MoeMlp.mlp_dim=32"]
REPORT = ["--calibration_samples=6", "--gin.MoeReport.segment_lengths=(4,16)",
          "--gin.MoeReport.cache_sizes=(2,3,4)"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i in range(40):
        (root / f"doc_{i:02d}.txt").write_text(DOCS[i % 4] * (1 + i % 3))
    return f"files:{root}/*.txt"


def test_moe_report_of_a_sparsejax_moe_workdir(tmp_path, corpus, make_source, capsys):
    src = make_source(tmp_path / "moe", *RUN, f"--gin.TrainConfig.dataset='{corpus}'", *MOE)
    capsys.readouterr()
    # windows of the corpus text (no padding, so the model's own routing metrics compare)
    assert cli.main(["moe-report", f"--workdir={src}", "--quiet", *REPORT,
                     f"--calibration_data={corpus}"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    result = json.load(open(summary["file"]))
    assert all(os.path.isfile(p) for p in result["plots"]) and len(result["plots"]) == 2
    (layer,) = result["layers"]
    assert (layer["layer"], layer["module"], layer["num_experts"], layer["top_k"]) == (
        1, "moe", 4, 2)
    tokens = result["calibration"]["tokens"]
    counts = np.array(layer["counts"])
    assert layer["tokens"] == tokens and counts.sum() == layer["assignments"] == 2 * tokens
    co = np.array(layer["coactivation"])
    np.testing.assert_array_equal(np.diag(co), counts)
    np.testing.assert_array_equal(co, co.T)
    # a token's two experts: each expert's co-activations with the others equal its count
    np.testing.assert_array_equal(co.sum(1) - np.diag(co), counts)
    assert layer["segment_coverage"]["4"]["4"] == 1.0 and layer["segment_coverage"]["4"]["2"] <= 1
    assert layer["segment_coverage"]["16"]["2"] <= layer["segment_coverage"]["4"]["2"] + 1e-12
    rates = layer["cache_hit_rate"]
    assert all(rates[c]["lru"] <= rates[c]["optimal"] <= 1 for c in rates)
    assert rates["2"]["optimal"] <= rates["3"]["optimal"] <= rates["4"]["optimal"]
    # with every expert resident, only the first request of each expert per sequence misses
    assert rates["4"]["optimal"] == pytest.approx(1 - (counts > 0).sum() * 6 / (2 * tokens),
                                                  abs=4 * 6 / (2 * tokens))
    assert len(layer["super_experts"]["output_max"]) == 4 and len(layer["reap_saliency"]) == 4

    # the load is the model's own routing of the calibration tokens
    gin.clear_config()
    parse_workdir_config(src, [], ["MoeReport.calibration_samples=6",
                                   f"MoeReport.calibration_data='{corpus}'"])
    calib = calibration_set(trainer.TrainConfig(), MoeReport())
    assert calib.token_weights.sum() == tokens == calib.inputs.size
    _, state = restore_state_numpy(src)
    _, out = Transformer(ModelConfig()).apply(
        {"params": state["params"]}, calib.inputs, calib.positions, calib.segment_ids,
        mutable=["metrics"])
    sown = [v for p, v in jax.tree_util.tree_leaves_with_path(out["metrics"])
            if "expert_load" in jax.tree_util.keystr(p)]
    np.testing.assert_allclose(np.asarray(sown[0]).reshape(-1), layer["load"], atol=1e-6)


def test_moe_report_refuses_bad_input(tmp_path, corpus, make_source, capsys):
    data = f"--gin.TrainConfig.dataset='{corpus}'"
    dense = make_source(tmp_path / "dense", *RUN, data)
    capsys.readouterr()
    assert cli.main(["moe-report", f"--workdir={dense}", "--quiet"]) == 2
    assert "the model has no MoE layer" in capsys.readouterr().err
    moe = make_source(tmp_path / "moe", *RUN, data, *MOE)
    assert cli.main(["moe-report", f"--workdir={moe}", "--quiet", "--calibration_samples=2",
                     "--calibration_split=train", "--gin.MoeReport.cache_sizes=(2,8)"]) == 2
    assert "MoeReport.cache_sizes=(2, 8) holds 8, more than the layer's 4 experts" in \
        capsys.readouterr().err
    with pytest.raises(ValueError, match=r"MoeReport.segment_lengths=\(0,\) must be"):
        MoeReport(segment_lengths=(0,))
