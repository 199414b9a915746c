"""Sparse upcycling through the CLI: an MoE run started from a dense checkpoint computes the
dense model's function (renormalized top-k over identical experts), also when the dense run
scanned its layers and the MoE run does not (the checkpoint's stacked params convert)."""
import os

from sparsejax.train.metrics import read_metrics


def eval_losses(workdir):
    return [r["eval_loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
            if "eval_loss" in r]


def test_upcycled_moe_matches_dense_then_trains(run_cli, tmp_path, capsys):
    dense = str(tmp_path / "dense")
    assert run_cli(dense, "--gin.ModelConfig.scan_layers=True") == 0
    dense_eval = eval_losses(dense)[-1]
    up = str(tmp_path / "up")
    # One step with a vanishing learning rate: the eval loss is the upcycled model's at init.
    assert run_cli(up, "--gin_file=moe/upcycle.gin", f"--gin.warm_start.from_workdir='{dense}'",
                   "--gin.TrainConfig.num_steps=1", "--gin.TrainConfig.eval_every=1",
                   "--gin.learning_rate_schedule.peak_lr=1e-12",
                   "--gin.learning_rate_schedule.warmup_steps=0",
                   "--gin.MoeMlp.router_jitter=0.0") == 0
    assert abs(eval_losses(up)[-1] - dense_eval) < 1e-4
    records = [r for r in read_metrics(os.path.join(up, "metrics.jsonl")) if "loss" in r]
    assert any(k.endswith("/moe/expert_load") for k in records[0])

    capsys.readouterr()
    bad = str(tmp_path / "bad")
    assert run_cli(bad, "--gin_file=moe/upcycle.gin", f"--gin.warm_start.from_workdir='{dense}'",
                   "--gin.MoeMlp.mlp_dim=64") == 2
    assert "mlp_dim" in capsys.readouterr().err
