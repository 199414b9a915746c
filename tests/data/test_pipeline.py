import itertools

import numpy as np
import pytest

from sparsejax.data import ByteTokenizer, make_dataset, make_iterator
from sparsejax.data.stdlib_corpus import is_validation

TOK = ByteTokenizer()
SEQ = 32


def _rows_tokens(batches):
    """Each row's seq_len + 1 tokens (inputs plus the last target), with padding removed, concatenated."""
    out = []
    for b in batches:
        for inp, tgt in zip(b["inputs"], b["targets"]):
            row = np.concatenate([inp, tgt[-1:]])
            out.append(row[row != TOK.pad_id])
    return np.concatenate(out) if out else np.zeros([0], np.int32)


def _docs(stream):
    """Split a token stream at eos into documents (bytes), checking each is framed by bos ... eos."""
    ends = np.flatnonzero(stream == TOK.eos_id)
    assert ends.size and ends[-1] == stream.size - 1, "stream must end with eos"
    docs, start = [], 0
    for end in ends:
        doc = stream[start:end]
        assert doc[0] == TOK.bos_id and np.all(doc[1:] < 256)
        docs.append(doc[1:].astype(np.uint8).tobytes())
        start = end + 1
    return docs


def _split_docs(corpus, split):
    names = sorted(corpus["docs"])
    return [corpus["docs"][n] for n in names if is_validation(n, 5) == (split == "validation")]


def _equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_batch_format_and_packing(text_corpus):
    batches = list(make_dataset("train", global_batch_size=4, seq_len=SEQ, dataset=text_corpus["dataset"], num_epochs=1))
    assert batches
    for b in batches:
        assert set(b) == {"inputs", "targets", "loss_mask", "segment_ids", "positions"}
        for k, dtype in [("inputs", np.int32), ("targets", np.int32), ("loss_mask", np.float32),
                         ("segment_ids", np.int32), ("positions", np.int32)]:
            assert b[k].shape == (4, SEQ) and b[k].dtype == dtype, k
        inp, tgt, mask, seg, pos = (b[k] for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions"))
        np.testing.assert_array_equal(tgt[:, :-1], inp[:, 1:])
        # Loss on every real input except eos (whose next token starts another document or is padding).
        np.testing.assert_array_equal(mask, ((inp < 256) | (inp == TOK.bos_id)).astype(np.float32))
        for r in range(4):
            assert seg[r, 0] == 1
            d = np.diff(seg[r])
            real = seg[r] > 0
            assert np.all((d == 0) | (d == 1) | ((d < 0) & (seg[r, 1:] == 0)))  # 1, 1, 2, ..., then zeros.
            np.testing.assert_array_equal(inp[r][~real], TOK.pad_id)
            for s in np.unique(seg[r][real]):
                np.testing.assert_array_equal(pos[r][seg[r] == s], np.arange(np.sum(seg[r] == s)))
                starts_doc = inp[r][seg[r] == s][0] == TOK.bos_id
                assert starts_doc or (s == 1), "only the row's first segment may continue a document"
    # Train is shuffled and drops the last incomplete batch; every packed document is a real train document.
    train = _split_docs(text_corpus, "train")
    docs = _docs(_rows_tokens(batches)[: np.flatnonzero(_rows_tokens(batches) == TOK.eos_id)[-1] + 1])
    assert set(docs) <= set(train)
    assert len(docs) > len(train) // 2


def test_validation_is_one_ordered_padded_pass(text_corpus):
    batches = list(make_dataset("validation", global_batch_size=3, seq_len=SEQ, dataset=text_corpus["dataset"]))
    assert _docs(_rows_tokens(batches)) == _split_docs(text_corpus, "validation")
    last = batches[-1]
    assert np.any(last["segment_ids"] == 0)
    np.testing.assert_array_equal(last["loss_mask"][last["segment_ids"] == 0], 0.0)


def test_each_train_epoch_is_a_shuffled_permutation(text_corpus):
    train = _split_docs(text_corpus, "train")
    docs = _docs(_rows_tokens(make_dataset("train", global_batch_size=1, seq_len=SEQ, dataset=text_corpus["dataset"],
                                           num_epochs=2)))
    assert sorted(docs[: len(train)]) == sorted(train) == sorted(docs[len(train):])
    assert docs[: len(train)] != train and docs[: len(train)] != docs[len(train):]


def test_train_process_shards_are_disjoint_and_cover(text_corpus):
    kw = dict(global_batch_size=2, seq_len=SEQ, dataset=text_corpus["dataset"], num_epochs=1, process_count=2)
    shards = [list(make_dataset("train", process_index=i, **kw)) for i in range(2)]
    docs = [_docs(_rows_tokens(s)) for s in shards]
    assert all(b["inputs"].shape == (1, SEQ) for s in shards for b in s)
    assert not set(docs[0]) & set(docs[1])
    assert sorted(docs[0] + docs[1]) == sorted(_split_docs(text_corpus, "train"))


def test_validation_process_shards_split_global_batches(text_corpus):
    kw = dict(global_batch_size=4, seq_len=SEQ, dataset=text_corpus["dataset"])
    whole = list(make_dataset("validation", process_count=1, process_index=0, **kw))
    parts = [list(make_dataset("validation", process_count=2, process_index=i, **kw)) for i in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(whole)
    for w, p0, p1 in zip(whole, *parts):
        assert p0["inputs"].shape == (2, SEQ)
        for k in w:
            np.testing.assert_array_equal(w[k], np.concatenate([p0[k], p1[k]]))


def test_same_seed_same_batches_other_seed_differs(text_corpus):
    kw = dict(global_batch_size=4, seq_len=SEQ, dataset=text_corpus["dataset"])
    a = list(itertools.islice(make_iterator("train", seed=1, **kw), 5))
    b = list(itertools.islice(make_iterator("train", seed=1, **kw), 5))
    c = list(itertools.islice(make_iterator("train", seed=2, **kw), 5))
    assert all(_equal(x, y) for x, y in zip(a, b))
    assert not all(_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("split, skip", [("train", 0), ("train", 3), ("train", 80), ("validation", 5)])
def test_restore_state_mid_stream(text_corpus, split, skip):
    # 80 batches of 4 x 33 tokens cross the first epoch boundary of the ~8k-token train split.
    kw = dict(global_batch_size=4, seq_len=SEQ, dataset=text_corpus["dataset"], seed=7)
    it = make_iterator(split, **kw)
    for _ in range(skip):
        next(it)
    state = it.get_state()
    want = list(itertools.islice(it, 6))
    fresh = make_iterator(split, **kw)
    next(fresh)  # A used iterator must be moved too, not just a new one.
    fresh.set_state(state)
    got = list(itertools.islice(fresh, 6))
    assert len(got) == len(want) > 0
    assert all(_equal(x, y) for x, y in zip(want, got))


def test_default_stdlib_dataset(tmp_path):
    b = next(make_iterator("train", global_batch_size=2, seq_len=64, data_dir=str(tmp_path)))
    assert b["inputs"].shape == (2, 64)
    assert np.all(b["inputs"] < TOK.vocab_size) and b["loss_mask"].sum() > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(split="test"), "split must be one of"),
        (dict(seq_len=0), "seq_len"),
        (dict(global_batch_size=0), "global_batch_size"),
        (dict(global_batch_size=6, process_count=4, process_index=0), "global_batch_size=6.*process_count=4"),
        (dict(process_count=2, process_index=2), "process_index"),
        (dict(seed=-1), "seed"),
        (dict(num_epochs=0), "num_epochs"),
        (dict(dataset="nope"), "dataset must be"),
        (dict(dataset="files:/definitely/missing/*.txt"), "files:/definitely/missing"),
    ],
)
def test_bad_arguments_raise(text_corpus, kwargs, match):
    args = dict(split="train", global_batch_size=4, seq_len=SEQ, dataset=text_corpus["dataset"])
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        make_dataset(args.pop("split"), **args)


def test_empty_split_raises(tmp_path):
    (tmp_path / "only.txt").write_text("one document")
    split = "validation" if not is_validation("only.txt", 5) else "train"
    with pytest.raises(ValueError, match=f"none falls in split '{split}'"):
        make_dataset(split, global_batch_size=1, seq_len=8, dataset=f"files:{tmp_path}/*.txt")
