"""Document-sharded training batches: the global batch and its checkpointed position do not
depend on the number of processes reading it."""
import os

import numpy as np
import orbax.checkpoint as ocp
import pytest

from etils import epath

from sparsejax.data.sharded import (ShardedIteratorHandler, ShardedIteratorRestore,
                                    ShardedIteratorSave, ShardedTrainIterator)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(40):
        words = rng.choice(["alpha", "beta", "gamma", "delta", "eps"], size=rng.integers(5, 60))
        (root / f"doc{i:02d}.txt").write_text(f"doc {i}: " + " ".join(words))
    return f"files:{root}/*.txt"


def make(corpus, **kw):
    return ShardedTrainIterator(global_batch_size=4, seq_len=16, seed=3, dataset=corpus, **kw)


def test_one_process_with_two_shards_equals_two_processes(corpus):
    one = make(corpus, num_shards=2, process_index=0, process_count=1)
    p0 = make(corpus, num_shards=2, process_index=0, process_count=2)
    p1 = make(corpus, num_shards=2, process_index=1, process_count=2)
    for _ in range(5):
        a, b, c = next(one), next(p0), next(p1)
        assert a["inputs"].shape == (4, 16) and b["inputs"].shape == (2, 16)
        for k in a:
            np.testing.assert_array_equal(a[k], np.concatenate([b[k], c[k]]))


def test_position_restores_on_another_process_count(corpus, tmp_path):
    p0 = make(corpus, num_shards=2, process_index=0, process_count=2)
    p1 = make(corpus, num_shards=2, process_index=1, process_count=2)
    for _ in range(3):
        next(p0), next(p1)
    # Two "processes" write their shards into the same checkpoint item directory.
    item_dir = epath.Path(tmp_path / "data")
    item_dir.mkdir()
    handler = ShardedIteratorHandler()
    for it in (p0, p1):
        handler.save(item_dir, ShardedIteratorSave(it))
    assert sorted(os.listdir(item_dir)) == ["shard_0-of-2.json", "shard_1-of-2.json"]
    one = make(corpus, num_shards=2, process_index=0, process_count=1)
    handler.restore(item_dir, ShardedIteratorRestore(one))
    a, b, c = next(one), next(p0), next(p1)
    np.testing.assert_array_equal(a["inputs"], np.concatenate([b["inputs"], c["inputs"]]))

    other = make(corpus, num_shards=4, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="data_shards"):
        handler.restore(item_dir, ShardedIteratorRestore(other))


def test_through_checkpoint_manager(corpus, tmp_path):
    it = make(corpus, num_shards=2)
    next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as mngr:
        mngr.save(1, args=ocp.args.Composite(data=ShardedIteratorSave(it)))
        mngr.wait_until_finished()
    expected = next(it)
    again = make(corpus, num_shards=2)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as mngr:
        mngr.restore(1, args=ocp.args.Composite(data=ShardedIteratorRestore(again)))
    np.testing.assert_array_equal(next(again)["targets"], expected["targets"])


@pytest.mark.parametrize("kw,match", [
    (dict(num_shards=3, process_count=2, process_index=0), "data_shards=3"),
    (dict(num_shards=8, process_count=1, process_index=0), "global_batch_size=4"),
])
def test_bad_shard_counts(corpus, kw, match):
    with pytest.raises(ValueError, match=match):
        make(corpus, **kw)
