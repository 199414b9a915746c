import itertools
import json

import numpy as np
import orbax.checkpoint as ocp
import pytest

from sparsejax.data import iterator_restore_args, iterator_save_args, make_iterator


def test_orbax_round_trip_gives_identical_next_batches(text_corpus, tmp_path):
    kw = dict(global_batch_size=4, seq_len=16, dataset=text_corpus["dataset"], seed=3)
    it = make_iterator("train", **kw)
    for _ in range(11):
        next(it)
    saved_state = json.loads(json.dumps(it.get_state()))
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(11, args=ocp.args.Composite(data=iterator_save_args(it)))
        mngr.wait_until_finished()
    want = list(itertools.islice(it, 5))

    fresh = make_iterator("train", **kw)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        assert mngr.latest_step() == 11
        restored = mngr.restore(11, args=ocp.args.Composite(data=iterator_restore_args(fresh)))
    assert restored.data is fresh
    got = list(itertools.islice(fresh, 5))
    for w, g in zip(want, got, strict=True):
        for k in w:
            np.testing.assert_array_equal(w[k], g[k])
    # One JSON state file per JAX process, so hosts never overwrite each other.
    (state_file,) = (tmp_path / "ckpt" / "11" / "data").glob("process_*-of-*.json")
    assert state_file.name == "process_0-of-1.json"
    assert json.loads(state_file.read_text()) == saved_state


def test_rejects_non_iterators():
    with pytest.raises(ValueError, match="grain iterator"):
        iterator_save_args([1, 2, 3])
    with pytest.raises(ValueError, match="grain iterator"):
        iterator_restore_args(object())
