"""The eval sample (fixed, seeded, spread over the validation split, sized in tokens) and the
eval loss with its standard error over rows, against numpy."""
import logging

import flax.linen as nn
import jax
import numpy as np
import pytest

from sparsejax import config
from sparsejax.data import pipeline
from sparsejax.parallel.rules import LOGICAL_RULES, batch_sharding
from sparsejax.train import evaluation
from sparsejax.train.build import build_run
from sparsejax.train.trainer import TrainConfig


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _ratio_stderr(s, n):
    """The ratio estimator's standard error, written out: sqrt(m/(m-1) sum (s - L n)^2) / sum n."""
    loss = s.sum() / n.sum()
    m = len(s)
    return loss, np.sqrt(m / (m - 1) * np.sum((s - loss * n) ** 2)) / n.sum()


def test_loss_stats_against_numpy():
    rng = np.random.default_rng(0)
    n = rng.integers(1, 65, size=40).astype(float)
    s = n * rng.uniform(1.0, 3.0, size=40)
    got = evaluation.loss_stats(np.append(s, 0.0), np.append(n, 0.0))  # a padding row is dropped
    loss, se = _ratio_stderr(s, n)
    assert got["eval_rows"] == 40 and got["eval_tokens"] == n.sum()
    assert got["eval_loss"] == pytest.approx(loss, rel=1e-12)
    assert got["eval_loss_stderr"] == pytest.approx(se, rel=1e-12)
    # equal rows: the standard error of the mean of the row losses
    means = rng.uniform(1.0, 3.0, size=50)
    eq = evaluation.loss_stats(means * 64, np.full(50, 64.0))
    assert eq["eval_loss_stderr"] == pytest.approx(np.std(means, ddof=1) / np.sqrt(50), rel=1e-12)
    assert evaluation.loss_stats(np.array([3.0]), np.array([2.0]))["eval_loss_stderr"] is None
    with pytest.raises(ValueError, match="no tokens"):
        evaluation.loss_stats(np.zeros(3), np.zeros(3))


def test_sample_is_fixed_spread_over_the_split_and_sized_in_tokens(data_dir):
    kw = dict(eval_tokens=32768, global_batch_size=8, seq_len=64, data_dir=data_dir)
    a, b = evaluation.make_eval_set(**kw), evaluation.make_eval_set(**kw)
    assert a.rows == 512 and len(a.batches) == 64 and a.split_rows > 10 * a.rows
    for x, y in zip(a.batches, b.batches, strict=True):  # the same rows at every eval
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    # The rows are the first 512 of the split's rows in a seeded order: from across the split
    # (the old eval read the first 2 batches in file order: one to three files).
    plan = pipeline.row_plan("validation", seq_len=64, seed=0, data_dir=data_dir)
    rows = [plan.order[i] for i in range(512)]
    got = np.concatenate([np.concatenate([x["inputs"], x["targets"][:, -1:]], 1) for x in a.batches])
    want = np.stack([plan.reader[r]["tokens"] for r in rows])
    seg = np.stack([plan.reader[r]["tokens_segment_ids"] for r in rows])
    np.testing.assert_array_equal(got[seg > 0], want[seg > 0])
    assert plan.index.docs_of_rows(rows).size >= 0.6 * plan.num_documents
    other = evaluation.make_eval_set(**kw, seed=1)
    assert not np.array_equal(other.batches[0]["inputs"], a.batches[0]["inputs"])


def test_sample_does_not_depend_on_training_seed_or_batch_size(data_dir):
    cfgs = [TrainConfig(global_batch_size=b, seq_len=32, seed=s, eval_tokens=1000, data_dir=data_dir)
            for b, s in ((8, 0), (8, 5), (4, 0))]
    sets = [evaluation.eval_set_for(c) for c in cfgs]
    assert [s.rows for s in sets] == [32, 32, 32]  # ceil(1000 / 32)
    rows = [np.concatenate([b["inputs"] for b in s.batches]) for s in sets]
    np.testing.assert_array_equal(rows[0], rows[1])
    np.testing.assert_array_equal(rows[0], rows[2])
    assert evaluation.eval_set_for(TrainConfig(eval_tokens=0)) is None


def test_sample_larger_than_the_split_uses_all_of_it(tmp_path, caplog):
    for i in range(60):
        (tmp_path / f"d{i}.txt").write_text(f"document {i} " * 20)
    with caplog.at_level(logging.WARNING):
        es = evaluation.make_eval_set(eval_tokens=10**6, global_batch_size=4, seq_len=32,
                                      dataset=f"files:{tmp_path}/*.txt")
    assert es.rows == es.split_rows and len(es.batches) == -(-es.rows // 4)
    assert any("evaluating on all of them" in r.message for r in caplog.records)


@pytest.mark.parametrize("kw,match", [(dict(eval_tokens=0), "TrainConfig.eval_tokens=0"),
                                      (dict(seed=-1), "make_eval_set.seed=-1"),
                                      (dict(batch_multiple=0), "make_eval_set.batch_multiple=0")])
def test_bad_eval_settings(kw, match, data_dir):
    args = {**dict(eval_tokens=64, global_batch_size=8, seq_len=32, data_dir=data_dir), **kw}
    with pytest.raises(ValueError, match=match):
        evaluation.make_eval_set(**args)
    with pytest.raises(ValueError, match="TrainConfig.eval_tokens=-1"):
        TrainConfig(eval_tokens=-1)


def test_evaluate_matches_per_row_numpy_losses(data_dir):
    """The jitted eval over the sample against log-softmax losses per row computed in numpy
    from the model's logits: the token-weighted loss and the stderr over rows."""
    config.parse_gin(["tiny.gin"], ["make_mesh.num_devices=1", "ModelConfig.num_layers=1"])
    cfg = TrainConfig(global_batch_size=8, seq_len=32, eval_tokens=1024, data_dir=data_dir)
    run = build_run(cfg)
    es = evaluation.eval_set_for(cfg)
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(LOGICAL_RULES):
        state = run.init_state()
        bs = batch_sharding(run.mesh)
        got = evaluation.evaluate(evaluation.make_eval_fn(run.model, run.sparsity_method, run.state_shardings, run.mesh, bs),
                                  state, es, bs)
        sums, counts = [], []
        apply = jax.jit(run.model.apply)
        for b in es.batches:
            logits = np.asarray(apply({"params": state.params}, b["inputs"], b["positions"],
                                      b["segment_ids"]), np.float64)
            logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
                - logits.max(-1, keepdims=True)
            nll = -np.take_along_axis(logp, b["targets"][..., None], -1)[..., 0]
            sums.append((nll * b["loss_mask"]).sum(1))
            counts.append(b["loss_mask"].sum(1))
    s, n = np.concatenate(sums), np.concatenate(counts)
    loss, se = _ratio_stderr(s[n > 0], n[n > 0])
    assert got["eval_rows"] == 32 and got["eval_tokens"] == n.sum()
    assert got["eval_loss"] == pytest.approx(loss, rel=1e-5)
    assert got["eval_loss_stderr"] == pytest.approx(se, rel=1e-3)
