"""`sparsejax prune --calibration_data=files:GLOB`: the papers' calibration set (random windows
of a text tokenized once, with a seed) instead of the run's own dataset."""
import json
import os

import numpy as np
import pytest

from sparsejax import cli
from sparsejax.data.tokenizer import ByteTokenizer
from sparsejax.sparsity.posttrain.config import PruneConfig
from sparsejax.sparsity.posttrain.workdir import text_calibration_set
from sparsejax.train.checkpoint import restore_state_numpy

RUN = ["--gin.TrainConfig.global_batch_size=8", "--gin.TrainConfig.seq_len=32",
       "--gin.TrainConfig.eval_tokens=512", "--gin.TrainConfig.progress_bar=False",
       "--gin.TrainConfig.async_checkpoints=False"]


class Cfg:
    seq_len = 16


@pytest.fixture()
def text(tmp_path):
    (tmp_path / "b.txt").write_text("0123456789" * 5)
    (tmp_path / "a.txt").write_text("abcdefghij" * 5)
    return f"files:{tmp_path}/*.txt"


def test_windows_are_slices_of_the_text_drawn_with_the_seed(text):
    ids = ByteTokenizer().encode_text("abcdefghij" * 5 + "\n\n" + "0123456789" * 5)
    pc = PruneConfig(calibration_data=text, calibration_samples=6, calibration_seed=3)
    a, b = text_calibration_set(Cfg, pc), text_calibration_set(Cfg, pc)
    np.testing.assert_array_equal(a.inputs, b.inputs)  # the seed fixes the draw
    assert a.inputs.shape == (6, 16) and a.split == text and a.num_samples == 6
    joined = ids.tolist()
    for inp, tgt in zip(a.inputs, a.targets):
        start = next(i for i in range(len(joined)) if joined[i:i + 16] == inp.tolist())
        assert tgt.tolist() == joined[start + 1:start + 17]
    other = text_calibration_set(Cfg, PruneConfig(calibration_data=text, calibration_samples=6,
                                                  calibration_seed=4))
    assert not np.array_equal(a.inputs, other.inputs)


def test_a_text_shorter_than_a_window_is_refused(tmp_path):
    (tmp_path / "t.txt").write_text("short")
    pc = PruneConfig(calibration_data=f"files:{tmp_path}/t.txt")
    with pytest.raises(ValueError, match="fewer than one window"):
        text_calibration_set(Cfg, pc)


def test_only_files_are_valid_calibration_data():
    with pytest.raises(ValueError, match="calibration_data='stdlib'; valid"):
        PruneConfig(calibration_data="stdlib")


def test_prune_calibrates_on_the_text(tmp_path, corpus, make_source, capsys):
    src = make_source(tmp_path / "src", *RUN, corpus)
    glob = corpus.split("'")[1]
    masks = {}
    for name, extra in (("own", []), ("text", [f"--calibration_data={glob}"])):
        out = str(tmp_path / name)
        assert cli.main(["prune", f"--workdir={src}", f"--out={out}", "--method=wanda",
                         "--calibration_samples=8", "--quiet", *extra]) == 0
        report = json.load(open(os.path.join(out, "prune_report.json")))
        masks[name] = restore_state_numpy(out)[1]["sparsity"]["masks"]
        if name == "text":
            assert report["calibration"]["split"] == glob
    q = [m["layer_0"]["attn"]["query"] for m in masks.values()]
    assert q[0].mean() == q[1].mean() == 0.5 and not np.array_equal(q[0], q[1])
