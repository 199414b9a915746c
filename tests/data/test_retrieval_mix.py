"""RetrievalMix: the fraction of synthetic retrieval documents in the training stream is the
one set, at the places it says, each a whole document (prompt, answer, EOS) with its loss on;
the corpus rows around them are the unmixed stream's; fraction 0 changes nothing."""
import gin
import numpy as np
import pytest

from sparsejax.data import retrieval_tasks as rt
from sparsejax.data.pipeline import make_dataset
from sparsejax.data.retrieval_mix import RetrievalMix
from sparsejax.data.tokenizer import ByteTokenizer

SEQ = 511
TASKS = ("passkey", "niah_single")


def rows(text_corpus, n_batches, **mix):
    gin.clear_config()
    for k, v in mix.items():
        gin.bind_parameter(f"RetrievalMix.{k}", v)
    it = iter(make_dataset("train", global_batch_size=4, seq_len=SEQ,
                           dataset=text_corpus["dataset"], process_index=0, process_count=1,
                           num_threads=1))
    batches = [next(it) for _ in range(n_batches)]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def synthetic(batch):
    tok = ByteTokenizer()
    starts = (rt.PASSKEY_INTRO, rt.NIAH_INTRO)
    return np.array([tok.decode(r[:40]).startswith(tuple(s[:30] for s in starts))
                     for r in batch["inputs"]])


@pytest.mark.parametrize("fraction", [0.25, 0.1])
def test_mixing_fraction_is_honoured(text_corpus, fraction):
    plain = rows(text_corpus, 10)
    mixed = rows(text_corpus, 10, fraction=fraction, tasks=TASKS, seed=1)
    syn = synthetic(mixed)
    n = len(syn)
    assert syn.sum() == round(n * fraction)
    mix = RetrievalMix(fraction, TASKS, 1)
    np.testing.assert_array_equal(syn, [mix.is_synthetic(i) for i in range(n)])
    assert not synthetic(plain).any()
    # the corpus rows are the unmixed stream's rows at the same places
    for k in plain:
        np.testing.assert_array_equal(mixed[k][~syn], plain[k][~syn])
    tok = ByteTokenizer()
    for i in np.flatnonzero(syn):
        seg = mixed["segment_ids"][i]
        n_doc = int((seg == 1).sum())
        assert n_doc > SEQ - 40 and (seg[n_doc:] == 0).all()  # the document fills the row
        full = np.append(mixed["inputs"][i], mixed["targets"][i][-1])
        full = full[full != tok.pad_id]
        text = tok.decode(full)
        assert full[-1] == tok.eos_id and mixed["loss_mask"][i][:len(full) - 1].all()
        # the canonical answer ends the document, after its question, and is the needle's
        answer = text.rsplit(" is ", 1)[1]
        assert answer.endswith(".") and answer[:-1].isdigit()
        assert f"The pass key is {answer} Remember" in text or f"is: {answer}" in text


def test_fraction_zero_is_the_plain_stream(text_corpus):
    a, b = rows(text_corpus, 3), rows(text_corpus, 3, fraction=0.0)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("kw, needle", [(dict(fraction=1.0), "RetrievalMix.fraction=1.0"),
                                        (dict(fraction=-0.1), "RetrievalMix.fraction=-0.1"),
                                        (dict(tasks=("bogus",)), "RetrievalMix.tasks='bogus'")])
def test_bad_settings(kw, needle):
    with pytest.raises(ValueError, match=needle):
        RetrievalMix(**kw)
