import itertools

import numpy as np
import pytest

from sparsejax.data import ByteTokenizer, make_dataset, make_iterator, pipeline
from sparsejax.data.sharded import ShardedTrainIterator
from sparsejax.data.stdlib_corpus import is_validation

TOK = ByteTokenizer()
SEQ = 32


def _split_docs(corpus, split):
    names = sorted(corpus["docs"])
    return [corpus["docs"][n] for n in names if is_validation(n, 5) == (split == "validation")]


def _equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _rows(batches):
    """Each row's seq_len + 1 tokens (inputs plus the last target) and segment ids."""
    toks, segs = [], []
    for b in batches:
        toks += list(np.concatenate([b["inputs"], b["targets"][:, -1:]], 1))
        segs += list(np.concatenate([b["segment_ids"], b["segment_ids"][:, -1:]], 1))
    return toks, segs


def _expected_row(plan, row, docs):
    """Row `row` of `plan` built by hand from the document bytes (independently of RowReader)."""
    ix = plan.index
    sl = ix.segments(row)
    out = []
    for d, start, n in zip(ix.doc[sl], ix.start[sl], ix.length[sl]):
        ids = np.concatenate([[TOK.bos_id], np.frombuffer(docs[d], np.uint8), [TOK.eos_id]])
        out.append(ids[start:start + n])
    row_tokens = np.concatenate(out)
    return np.pad(row_tokens, (0, ix.row_len - row_tokens.size), constant_values=TOK.pad_id)


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


def test_train_rows_are_the_planned_pieces_and_an_epoch_covers_every_token(text_corpus):
    """Batches hold exactly the rows the plan names, in its order; one epoch reads every train
    token once (the last incomplete batch dropped)."""
    kw = dict(seq_len=SEQ, seed=5, dataset=text_corpus["dataset"])
    plan = pipeline.row_plan("train", num_epochs=1, **kw)
    docs = _split_docs(text_corpus, "train")
    batches = list(make_dataset("train", global_batch_size=3, num_epochs=1, **kw))
    toks, _ = _rows(batches)
    assert len(toks) == len(plan.index) // 3 * 3
    order = [plan.order[i] for i in range(len(toks))]
    for got, r in zip(toks, order):
        np.testing.assert_array_equal(got, _expected_row(plan, r, docs))
    assert order != sorted(order)  # shuffled, not index order
    assert plan.index.length.sum() == sum(len(d) + 2 for d in docs)


def test_each_epoch_is_a_new_permutation_of_all_rows(text_corpus):
    plan = pipeline.row_plan("train", seq_len=SEQ, dataset=text_corpus["dataset"], num_epochs=2)
    n = len(plan.index)
    epochs = [[plan.order[i] for i in range(e * n, (e + 1) * n)] for e in (0, 1)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(n))
    assert epochs[0] != epochs[1]


def test_rows_of_a_batch_come_from_distinct_documents(text_corpus):
    """i.i.d. rows: a batch of 8 rows touches about as many documents as it has rows, where
    concat-then-split of shuffled documents gave ~1.2 on the stdlib corpus (8 rows of 257
    tokens from 17 kB files). This corpus has 38 documents of 20-400 bytes."""
    plan = pipeline.row_plan("train", seq_len=SEQ, dataset=text_corpus["dataset"])
    counts = plan.distinct_docs(8, 50)
    assert counts.size == 50 and counts.mean() >= 0.9 * 8


def test_default_corpus_base_batch_draws_distinct_documents(tmp_path):
    """On the default (whole-stdlib) corpus a base batch (8 x 257 tokens) reads its rows from at
    least 90% as many documents as rows; the batches read are the planned rows."""
    kw = dict(global_batch_size=8, seq_len=256, seed=0, data_dir=str(tmp_path))
    it = ShardedTrainIterator(**kw)
    mean = it.distinct_docs_per_batch(num_batches=200)
    assert mean >= 0.9 * 8, mean
    plan = pipeline.row_plan("train", seq_len=256, seed=0, data_dir=str(tmp_path))
    assert pipeline.mean_distinct_docs([plan], 8, 200) == mean
    docs = plan.reader.docs
    for b in range(3):
        toks, _ = _rows([next(it)])
        for i, got in enumerate(toks):
            np.testing.assert_array_equal(got, _expected_row(plan, plan.order[b * 8 + i], docs))


def test_validation_is_one_padded_pass_over_every_token(text_corpus):
    batches = list(make_dataset("validation", global_batch_size=3, seq_len=SEQ, dataset=text_corpus["dataset"]))
    docs = _split_docs(text_corpus, "validation")
    toks, segs = _rows(batches)
    real = np.concatenate([t[s > 0] for t, s in zip(toks, segs)])
    assert real.size == sum(len(d) + 2 for d in docs)
    np.testing.assert_array_equal(np.sort(real), np.sort(np.concatenate(
        [np.concatenate([[TOK.bos_id], np.frombuffer(d, np.uint8), [TOK.eos_id]]) for d in docs])))
    n_rows = len(pipeline.row_plan("validation", seq_len=SEQ, dataset=text_corpus["dataset"]).index)
    assert len(batches) == -(-n_rows // 3)
    pad = batches[-1]["segment_ids"][n_rows % 3 or 3:]  # padding rows of the last batch
    assert n_rows % 3 == 0 or (pad.size and np.all(pad == 0))
    assert np.all(batches[-1]["loss_mask"][n_rows % 3 or 3:] == 0)


def test_validation_num_rows_is_a_prefix_of_the_seeded_order(text_corpus):
    kw = dict(global_batch_size=4, seq_len=SEQ, dataset=text_corpus["dataset"], seed=2)
    whole, _ = _rows(make_dataset("validation", **kw))
    five = list(make_dataset("validation", num_rows=5, **kw))
    assert len(five) == 2 and five[1]["loss_mask"][1:].sum() == 0  # rows 6-8 are padding
    for a, b in zip(_rows(five)[0][:5], whole[:5]):
        np.testing.assert_array_equal(a, b)
    other, _ = _rows(make_dataset("validation", **{**kw, "seed": 3}))
    assert not all(np.array_equal(a, b) for a, b in zip(whole, other))


def test_train_process_shards_are_disjoint_and_cover(text_corpus):
    kw = dict(seq_len=SEQ, dataset=text_corpus["dataset"], num_shards=2)
    plans = [pipeline.row_plan("train", shard_index=i, **kw) for i in range(2)]
    docs = [set(p.index.doc.tolist()) for p in plans]
    assert not docs[0] & docs[1]
    assert docs[0] | docs[1] == set(range(len(_split_docs(text_corpus, "train"))))
    shards = [list(itertools.islice(make_dataset("train", global_batch_size=2, process_count=2, process_index=i,
                                                 dataset=text_corpus["dataset"], seq_len=SEQ), 3))
              for i in range(2)]
    assert all(b["inputs"].shape == (1, SEQ) for s in shards for b in s)


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
    if split == "train":
        assert 80 * 4 > len(pipeline.row_plan("train", seq_len=SEQ, dataset=kw["dataset"]).index)
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
        (dict(num_rows=3), "num_rows=3: only the validation split"),
        (dict(split="validation", num_rows=0), "num_rows=0"),
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


def test_more_shards_than_documents_raises(text_corpus):
    with pytest.raises(ValueError, match="fewer than the 64 document shards"):
        make_dataset("train", global_batch_size=64, process_count=64, process_index=50, seq_len=SEQ,
                     dataset=text_corpus["dataset"])
