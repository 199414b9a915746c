"""End-to-end training through the CLI (in process): outputs, resume, corrupt checkpoints,
the NaN guard and fail-fast validation."""
import json
import logging
import os

import jax
import numpy as np
import pytest

from sparsejax import cli, config
from sparsejax.train import trainer
from sparsejax.train.checkpoint import restore_state_numpy
from sparsejax.train.metrics import read_metrics


def _steps(workdir):
    return [r["step"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]


def _checkpoints(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def _restore_params(workdir, step):
    return restore_state_numpy(workdir, step)[1]["params"]


def test_train_writes_outputs_then_resumes(run_cli, tmp_path):
    w = str(tmp_path / "run")
    assert run_cli(w) == 0
    records = read_metrics(os.path.join(w, "metrics.jsonl"))
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == [5, 10, 15, 20]
    assert train[-1]["loss"] < train[0]["loss"] - 0.3  # loss visibly falls
    assert [r["step"] for r in evals] == [10, 20]
    # The same fixed sample at every eval: 32768 tokens of tiny.gin = 512 rows of 64 tokens.
    assert [(r["eval_rows"], r["eval_tokens"]) for r in evals] == [(512, evals[0]["eval_tokens"])] * 2
    assert all(0 < r["eval_loss_stderr"] < 0.05 for r in evals)
    assert os.path.getsize(os.path.join(w, "loss.png")) > 1000
    assert os.path.exists(os.path.join(w, "config.gin"))
    assert "TrainConfig.num_steps = 20" in open(os.path.join(w, "config.gin")).read()
    assert _checkpoints(w) == [10, 20]
    # More steps on resume re-stretch the LR and sparsity schedules: refused without the flag,
    # logged with it; the run then continues from step 20 instead of restarting.
    assert run_cli(w, "--gin.TrainConfig.num_steps=30") == 2
    assert _steps(w) == [5, 10, 15, 20]
    assert run_cli(w, "--gin.TrainConfig.num_steps=30", "--allow_config_change") == 0
    assert _steps(w) == [5, 10, 15, 20, 25, 30]
    assert _checkpoints(w)[-1] == 30
    change = [r for r in read_metrics(os.path.join(w, "metrics.jsonl")) if "config_changes" in r]
    assert change == [{"step": 20, "config_changes": ["TrainConfig.num_steps: 20 -> 30"]}]


def test_logged_loss_is_the_interval_mean_and_the_run_starts_with_its_corpus(run_cli, tmp_path,
                                                                             caplog):
    """log_every=5 logs the mean of the 5 per-step losses a log_every=1 run logs (same seed, same
    batches), the last one as loss_last; eval_tokens=0 turns eval off; step 0 records the
    corpus fingerprint and the batches' document diversity."""
    from sparsejax.data.sources import corpus_summary
    runs = {}
    for every in (1, 5):
        w = str(tmp_path / f"every{every}")
        with caplog.at_level(logging.INFO):
            assert run_cli(w, "--gin.TrainConfig.num_steps=10", f"--gin.TrainConfig.log_every={every}",
                           "--gin.TrainConfig.eval_tokens=0", "--gin.make_mesh.num_devices=1") == 0
        runs[every] = read_metrics(os.path.join(w, "metrics.jsonl"))
    per_step = {r["step"]: r["loss"] for r in runs[1] if "loss" in r}
    assert sorted(per_step) == list(range(1, 11))
    interval = {r["step"]: r for r in runs[5] if "loss" in r}
    assert sorted(interval) == [5, 10]
    for end in (5, 10):
        steps = range(end - 4, end + 1)
        assert interval[end]["loss"] == pytest.approx(np.mean([per_step[s] for s in steps]), rel=1e-6)
        assert interval[end]["loss_last"] == pytest.approx(per_step[end], rel=1e-6)
        assert interval[end]["loss_steps"] == 5 and interval[end]["nonfinite"] == 0
    assert interval[5]["loss"] != pytest.approx(interval[5]["loss_last"], rel=1e-4)
    assert not any("eval_loss" in r for r in runs[5])
    start = runs[5][0]
    assert start["step"] == 0
    assert start["corpus_fingerprint"] == corpus_summary("stdlib")["corpus_fingerprint"]
    assert start["data_rows_per_batch"] == 8 and start["data_distinct_docs_per_batch"] >= 0.9 * 8
    assert start["data_skipped_documents"] == 0  # an empty file is [bos, eos] in bytes
    logged = [r.message for r in caplog.records if "distinct documents per batch" in r.message]
    assert logged and f"{start['data_distinct_docs_per_batch']:.2f} distinct documents" in logged[-1]


def test_corrupt_latest_checkpoint_falls_back(run_cli, tmp_path, caplog):
    w = str(tmp_path / "run")
    assert run_cli(w) == 0
    params20 = _restore_params(w, 20)
    state_dir = os.path.join(w, "checkpoints", "20", "state")
    for root, _, files in os.walk(state_dir):  # truncate every file of the latest checkpoint
        for f in files:
            open(os.path.join(root, f), "w").close()
    with caplog.at_level(logging.WARNING):
        assert run_cli(w) == 0
    assert any("unreadable" in r.message for r in caplog.records)
    assert os.path.isdir(os.path.join(w, "checkpoints", "corrupt.20"))
    # Resumed from step 10 and recomputed step 20 exactly.
    assert _checkpoints(w) == [10, 20]
    again = _restore_params(w, 20)
    for a, b in zip(jax.tree.leaves(params20), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)


def test_nan_guard_skip_keeps_params_finite(run_cli, tmp_path):
    w = str(tmp_path / "run")
    assert run_cli(w, "--gin.learning_rate_schedule.peak_lr=1e30",
                   "--gin.learning_rate_schedule.warmup_steps=0") == 0
    records = [r for r in read_metrics(os.path.join(w, "metrics.jsonl")) if "loss" in r]
    assert any(r["nonfinite"] for r in records)
    params = _restore_params(w, 20)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def test_nan_guard_stop_saves_last_good_state(run_cli, tmp_path):
    w = str(tmp_path / "run")
    config.parse_gin(["tiny.gin"], [b[len("--gin."):] for b in
                                 ["--gin.learning_rate_schedule.peak_lr=1e30",
                                  "--gin.learning_rate_schedule.warmup_steps=0",
                                  "--gin.TrainConfig.nan_policy='stop'",
                                  "--gin.TrainConfig.progress_bar=False"]])
    with pytest.raises(trainer.NonFiniteLossError, match="nan_policy='stop'"):
        trainer.train(w)
    steps = _checkpoints(w)
    assert len(steps) == 1 and steps[0] < 20
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(_restore_params(w, steps[0])))


def test_eval_command_uses_the_training_eval_sample(run_cli, tmp_path, capsys, caplog):
    w = str(tmp_path / "run")
    assert run_cli(w) == 0
    final = [r for r in read_metrics(os.path.join(w, "metrics.jsonl")) if "eval_loss" in r][-1]
    capsys.readouterr()
    with caplog.at_level(logging.INFO):
        assert cli.main(["eval", "--gin_file=tiny.gin", f"--workdir={w}"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["step"] == 20 and np.isclose(out["eval_perplexity"], np.exp(out["eval_loss"]))
    # The same rows as the run's own eval at step 20 (tiny.gin: 32768 tokens = 512 rows of 64).
    assert out["eval_rows"] == final["eval_rows"] == 512
    assert out["eval_tokens"] == final["eval_tokens"]
    assert out["eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-6)
    assert out["eval_loss_stderr"] == pytest.approx(final["eval_loss_stderr"], rel=1e-5)
    assert any("512 validation rows x 64 tokens" in r.message and "±" in r.message
               for r in caplog.records)
    capsys.readouterr()
    assert cli.main(["eval", "--gin_file=tiny.gin", f"--workdir={w}",
                     "--gin.evaluate_checkpoint.eval_tokens=640"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval_rows"] == 10


@pytest.mark.parametrize("binding,match", [
    ("TrainConfig.bogus_setting=1", "bogus_setting"),
    ("make_mesh.data=3", "mesh"),
    ("TrainConfig.global_batch_size=6", "global_batch_size=6"),
    ("TrainConfig.seq_len=4096", "max_seq_len"),
    ("TrainConfig.dataset='files:/nonexistent/dir/*.txt'", "nonexistent"),
    ("ModelConfig.num_kv_heads=3", "num_kv_heads=3"),
    ("TrainConfig.nan_policy='ignore'", "nan_policy"),
])
def test_bad_input_fails_fast(run_cli, tmp_path, capsys, binding, match):
    code = cli.main(["train", "--gin_file=tiny.gin", f"--workdir={tmp_path}", "--quiet",
                     f"--gin.{binding}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "error:" in err and match in err
    assert not os.path.exists(tmp_path / "checkpoints" / "10")


def test_workdir_with_other_model_shape_is_rejected(run_cli, tmp_path, capsys):
    w = str(tmp_path / "run")
    assert run_cli(w) == 0
    capsys.readouterr()
    assert run_cli(w, "--gin.ModelConfig.embed_dim=32") == 2
    assert "different model shape" in capsys.readouterr().err
