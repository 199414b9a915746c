"""Activation sparsity through the CLI on one tiny ReLU checkpoint: `eval` writes the
activation metrics, scores under TEAL/CATS/WINA thresholds and finds PPL-p% sparsity (its
bisection bracket checked independently); `act-curves` writes the curves with paired
differences; `sample` under thresholds at target 0 decodes exactly like the model; bad
settings exit 2 naming them."""
import json
import os

import flax.linen as nn
import gin
import jax
import pytest

from sparsejax import cli

COMMON = ["--gin.make_mesh.num_devices=1", "--gin.ModelConfig.num_layers=2"]
SMALL = ["--gin.Thresholding.calibration_tokens=2048"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    w = str(tmp_path_factory.mktemp("relu"))
    rc = cli.main(["train", "--gin_file=tiny.gin", "--gin_file=activation/relu.gin",
                   f"--workdir={w}", "--quiet", *COMMON, "--gin.TrainConfig.num_steps=12",
                   "--gin.TrainConfig.eval_every=12", "--gin.TrainConfig.eval_tokens=512",
                   "--gin.TrainConfig.checkpoint_every=12", "--gin.TrainConfig.progress_bar=False",
                   "--gin.TrainConfig.async_checkpoints=False"])
    assert rc == 0
    return w


def run_cli(capsys, *args):
    capsys.readouterr()
    gin.clear_config()
    rc = cli.main(list(args))
    cap = capsys.readouterr()
    return rc, (json.loads(cap.out.strip().splitlines()[-1]) if rc == 0 else cap.err)


def test_eval_writes_activation_metrics_and_thresholded_loss(workdir, capsys):
    ev = ["eval", f"--workdir={workdir}", "--gin.evaluate_checkpoint.eval_tokens=1024", *COMMON[:1]]
    rc, dense = run_cli(capsys, *ev)
    assert rc == 0 and 0.2 < dense["act/zero_fraction"] < 0.9
    assert {"act/zero_fraction/layer_0/mlp", "act/below_0.01", "act/chunk8_zero_fraction"} <= set(dense)
    for method in ("teal", "cats", "wina"):
        rc, out = run_cli(capsys, *ev, *SMALL, f"--gin.Thresholding.method='{method}'",
                          "--gin.Thresholding.target=0.7")
        assert rc == 0, out
        assert out["dense_eval_loss"] == pytest.approx(dense["eval_loss"], rel=1e-6)
        assert out["eval_loss"] > dense["eval_loss"]  # 70% of the entries gone costs something
        assert out["threshold/method"] == method
        # calibrated on training rows, measured on the eval rows (layer 1 sees layer 0's shift)
        assert abs(out["threshold/sparsity/layer_0/" + ("mlp/gate_act" if method == "cats"
                                                        else "attn/query_in")] - 0.7) < 0.03
        if method == "cats":  # the MLP intermediate carries CATS's zeros
            assert out["act/zero_fraction"] >= 0.69


def test_ppl_p_sparsity_bisection_bracket(workdir, capsys):
    from sparsejax.parallel.rules import LOGICAL_RULES
    from sparsejax.sparsity.activation.calibrate import (ThresholdEval, calibration_batches,
                                                         histograms)
    from sparsejax.sparsity.activation.ppl_sparsity import PplSparsity
    from sparsejax.sparsity.activation.thresholding import make_sites, site_layout
    from sparsejax.train.commands import parse_workdir_config
    from sparsejax.train.trainer import TrainConfig, load_state_for_eval
    rc, out = run_cli(capsys, "eval", f"--workdir={workdir}", COMMON[0],
                      "--gin.evaluate_checkpoint.eval_tokens=1024", "--gin.PplSparsity.percents=(2.0,)",
                      "--gin.PplSparsity.bisection_steps=6", "--gin.PplSparsity.calibration_tokens=2048")
    assert rc == 0, out
    target, ratio = out["act/ppl_2%_target"], out["act/ppl_2%_calibration_ppl_ratio"]
    assert ratio <= 1.02 and out["act/ppl_2%_sparsity"] >= out["act/zero_fraction"] - 0.05
    assert out["act/ppl_2%_sparsity/layer_0/mlp"] > 0
    # independently: the next bisection point above the target breaks the 2% limit
    gin.clear_config()
    parse_workdir_config(workdir, [], [COMMON[0][len("--gin."):]])
    cfg = TrainConfig()
    run, _, state = load_state_for_eval(workdir, cfg)
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(LOGICAL_RULES):
        host = jax.device_get(state.params)
        layout = site_layout(host, run.model_config, "teal", ("down",))
        calib = calibration_batches(cfg, 2048, PplSparsity(percents=(2.0,)).seed)
        hists = histograms(run, state.params, None, layout, calib)
        ev = ThresholdEval(run)
        base = ev(state.params, None, make_sites(layout, 0.0, hists), calib)["eval_perplexity"]
        at = lambda s: ev(state.params, None, make_sites(layout, s, hists), calib)["eval_perplexity"]
        assert at(target) / base == pytest.approx(ratio, rel=1e-6)
        assert at(target + 2 ** -6) / base > 1.02


def test_act_curves(workdir, capsys):
    rc, out = run_cli(capsys, "act-curves", f"--workdir={workdir}", COMMON[0],
                      "--gin.TrainConfig.eval_tokens=1024", "--gin.ThresholdCurves.targets=(0.3, 0.6)",
                      "--gin.ThresholdCurves.calibration_tokens=2048")
    assert rc == 0, out
    data = json.load(open(os.path.join(workdir, "activation_curves.json")))
    assert os.path.exists(os.path.join(workdir, "activation_curves.png"))
    pts = data["points"]
    dense = pts[0]
    assert dense["method"] == "dense" and dense["delta_vs_dense"] == 0
    assert [(p["method"], p["target"]) for p in pts[1:]] == [
        (m, t) for m in ("teal", "cats", "wina") for t in (0.3, 0.6)]
    for m in ("teal", "wina"):
        a, b = [p for p in pts if p["method"] == m]
        assert a["sparsity"] < b["sparsity"] and a["eval_loss"] <= b["eval_loss"] + 1e-6
        assert b["delta_vs_dense"] == pytest.approx(b["eval_loss"] - dense["eval_loss"], abs=1e-9)
        assert b["delta_stderr"] > 0


def test_sample_under_thresholds(workdir, capsys):
    base = ["sample", f"--workdir={workdir}", "--prompt=def f(x):", "--max_new_tokens=8", COMMON[0]]
    rc, dense = run_cli(capsys, *base)
    assert rc == 0
    # target 0 masks only exact zeros: the same computation, the same tokens
    rc, zero = run_cli(capsys, *base, *SMALL, "--gin.Thresholding.method='teal'",
                       "--gin.Thresholding.target=0.0")
    assert rc == 0 and zero["tokens"] == dense["tokens"]


def test_sample_sparse_decode_settings_take_effect(workdir, capsys):
    """SparseDecode's bindings decide which sites decode sparsely (reported by `sample`),
    and the sparse path gives the tokens of the masked dense one."""
    base = ["sample", f"--workdir={workdir}", "--prompt=def f(x):", "--max_new_tokens=8",
            COMMON[0], *SMALL, "--gin.Thresholding.method='teal'", "--gin.Thresholding.target=0.5"]
    rc, sparse = run_cli(capsys, *base)
    assert rc == 0 and sparse["sparse_decode"]["sparse"] > 0
    n = sparse["sparse_decode"]["sites"]
    for flag in ("--gin.SparseDecode.max_density=0.05", "--gin.SparseDecode.enabled=False"):
        rc, dense = run_cli(capsys, *base, flag)
        assert rc == 0 and dense["sparse_decode"] == {"sites": n, "sparse": 0}, flag
        assert dense["tokens"] == sparse["tokens"]
    # CATS: one gate_act site per layer, governed by max_neuron_density
    cats = [*base[:5], *SMALL, "--gin.Thresholding.method='cats'", "--gin.Thresholding.target=0.7"]
    rc, on = run_cli(capsys, *cats, "--gin.SparseDecode.max_neuron_density=1.0")
    rc2, off = run_cli(capsys, *cats, "--gin.SparseDecode.max_neuron_density=0.05")
    assert rc == rc2 == 0 and on["sparse_decode"]["sparse"] > 0 == off["sparse_decode"]["sparse"]
    assert on["tokens"] == off["tokens"]


@pytest.mark.parametrize("args, match", [
    (["--gin.Thresholding.method='teal'", "--gin.Thresholding.target=1.0"],
     "Thresholding.target=1.0 must be a sparsity in [0, 1)"),
    (["--gin.Thresholding.target=0.5"], "has no effect with Thresholding.method='none'"),
    (["--gin.PplSparsity.percents=(0,)"], "PplSparsity.percents=(0,) must be a tuple"),
])
def test_bad_settings_exit_2(workdir, capsys, args, match):
    rc, err = run_cli(capsys, "eval", f"--workdir={workdir}", COMMON[0], *args)
    assert rc == 2 and match in err, err
