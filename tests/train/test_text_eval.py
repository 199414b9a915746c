"""`sparsejax eval --text_file / --dataset=files:GLOB`: the protocols' windows, the rows they
become, and bad input refused in one line (the equality with transformers is in
tests/interop/test_text_perplexity.py)."""
import json

import numpy as np
import pytest

from sparsejax import cli
from sparsejax.train import text_eval
from sparsejax.train.text_eval import TextEval, text_eval_set, windows


def scored(spans):
    return [t for _, end, first in spans for t in range(first, end)]


def test_concat_windows_tile_the_text_and_drop_the_tail():
    spans = windows(100, 16, "concat")
    assert spans == [(16 * i, 16 * i + 16, 16 * i + 1) for i in range(6)]
    assert len(scored(spans)) == 6 * 15


@pytest.mark.parametrize("stride", [1, 5, 16])
def test_sliding_windows_score_each_token_once(stride):
    spans = windows(100, 16, "sliding", stride)
    s = scored(spans)
    assert len(s) == len(set(s)) and spans[-1][1] == 100
    assert all(end - begin <= 16 and first > begin for begin, end, first in spans)
    if stride < 16:
        assert s == list(range(1, 100))
    else:  # the windows are concat's, the tail included; their first tokens have no context
        assert s == [t for t in range(1, 100) if t % 16]


def test_rows_hold_the_windows_inputs_targets_and_scored_tokens():
    ids = np.arange(1000, 1040)
    es = text_eval_set(ids, 16, "sliding", 8, global_batch_size=4)
    rows = {k: np.concatenate([b[k] for b in es.batches]) for k in es.batches[0]}
    assert es.rows == 4 and rows["inputs"].shape == (4, 15)  # padded to a batch of 4
    np.testing.assert_array_equal(rows["inputs"][1], ids[8:23])
    np.testing.assert_array_equal(rows["targets"][1], ids[9:24])
    # window 2 (tokens 8..23) scores the tokens window 1 (0..15) did not reach: 16..23
    np.testing.assert_array_equal(rows["loss_mask"][1], np.arange(9, 24) >= 16)
    last = windows(40, 16, "sliding", 8)[-1]
    assert last == (24, 40, 32) and rows["loss_mask"].sum() == 39


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_tokens=10, window=16, protocol="concat"), "fewer than one window"),
    (dict(n_tokens=100, window=16, protocol="sliding", stride=17), "--stride=17 is larger"),
    (dict(n_tokens=100, window=16, protocol="sliding"), "needs --stride"),
    (dict(n_tokens=100, window=16, protocol="concat", stride=4), "sliding only"),
    (dict(n_tokens=100, window=1, protocol="concat"), "--seq_len=1"),
    (dict(n_tokens=100, window=16, protocol="strided"), "--protocol='strided'"),
])
def test_bad_windows_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        windows(**kwargs)


def test_files_are_joined_with_a_blank_line_in_path_order(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    assert text_eval.read_texts(dataset=f"files:{tmp_path}/*.txt") == "first\n\nsecond"
    with pytest.raises(ValueError, match="matches no files"):
        text_eval.read_texts(dataset=f"files:{tmp_path}/*.md")
    with pytest.raises(ValueError, match="give 'files:GLOB'"):
        text_eval.read_texts(dataset="stdlib")
    with pytest.raises(ValueError, match="is not a file"):
        text_eval.read_texts([str(tmp_path / "nope.txt")])


def test_an_imported_model_without_a_tokenizer_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(text_eval, "has_pretrained", lambda w: True)
    (tmp_path / "t.txt").write_text("x" * 100)
    with pytest.raises(ValueError, match="without a tokenizer"):
        TextEval((str(tmp_path / "t.txt"),)).eval_set(str(tmp_path), 4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    w = str(tmp_path_factory.mktemp("w"))
    assert cli.main(["train", "--gin_file=tiny.gin", f"--workdir={w}", "--quiet",
                     "--gin.TrainConfig.num_steps=2", "--gin.TrainConfig.eval_tokens=0",
                     "--gin.TrainConfig.progress_bar=False"]) == 0
    return w


def test_eval_scores_a_text_file(trained, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("abcdefghij" * 30)  # 300 bytes + BOS
    capsys.readouterr()
    assert cli.main(["eval", f"--workdir={trained}", f"--text_file={text}", "--seq_len=64"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out["text_tokens"], out["windows"], out["eval_tokens"]) == (301, 4, 4 * 63)
    assert out["protocol"] == "concat" and np.isfinite(out["eval_perplexity"])


@pytest.mark.parametrize("args, match", [
    (["--stride=4"], "apply to a text"),
    (["--text_file={text}", "--seq_len=1000"], "more than ModelConfig.max_seq_len"),
    (["--text_file={text}", "--seq_len=128"], "fewer than one window"),
    (["--text_file={text}", "--protocol=sliding", "--stride=100", "--seq_len=64"],
     "--stride=100 is larger"),
])
def test_bad_text_input_is_one_line(trained, tmp_path, capsys, args, match):
    text = tmp_path / "t.txt"
    text.write_text("abc" * 40)
    capsys.readouterr()
    rc = cli.main(["eval", f"--workdir={trained}", *[a.format(text=text) for a in args]])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and match in err and len(err.splitlines()) == 1
