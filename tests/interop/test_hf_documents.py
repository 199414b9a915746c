"""Training documents under an imported tokenizer.json (no torch): encoded as the tokenizer
encodes them (its own specials, never a BOS it does not add), then EOS as the separator when the
config defines one; documents of fewer than 2 tokens (an empty file under a tokenizer without
specials) are skipped by the row plan and counted, and a corpus of nothing else is refused with
a message naming a file and the fix."""
import gin
import numpy as np
import pytest
from tokenizers import Tokenizer, processors

from sparsejax.data import pipeline
from sparsejax.data.stdlib_corpus import is_validation
from sparsejax.data.tokenizer import HFTokenizer

TEXT = "def add(a, b):\n    return a + b\n"


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory, bpe_tokenizer):
    """(a tokenizer.json that adds no specials, the same with a BOS post-processor)."""
    root = tmp_path_factory.mktemp("tok")
    plain = root / "plain.json"
    bpe_tokenizer(plain)
    tok = Tokenizer.from_file(str(plain))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", 1)])
    with_bos = root / "bos.json"
    tok.save(str(with_bos))
    return str(plain), str(with_bos)


def test_a_document_is_encoded_as_the_tokenizer_does(tokenizer_files):
    plain, with_bos = tokenizer_files
    body = HFTokenizer(plain).encode(TEXT).tolist()
    assert 1 not in body and 2 not in body
    # config.json's BOS is not added (the tokenizer adds none); its EOS separates documents
    assert HFTokenizer(plain, bos_id=1, eos_id=2).encode_document(TEXT).tolist() == body + [2]
    assert HFTokenizer(plain, bos_id=1).encode_document(TEXT).tolist() == body
    # a tokenizer whose post-processor adds a BOS keeps it
    assert HFTokenizer(with_bos, eos_id=2).encode_document(TEXT).tolist() == [1] + body + [2]
    assert HFTokenizer(plain).encode_document("").size == 0
    assert HFTokenizer(plain, eos_id=2).encode_document(b"").tolist() == [2]


@pytest.mark.parametrize("eos_id", [None, 2])
def test_documents_under_two_tokens_are_skipped_and_counted(tokenizer_files, tmp_path, eos_id):
    gin.bind_parameter("make_tokenizer.kind", "hf")
    gin.bind_parameter("make_tokenizer.path", tokenizer_files[0])
    gin.bind_parameter("make_tokenizer.eos_id", eos_id)
    for i in range(30):
        (tmp_path / f"doc_{i:02d}.txt").write_text(TEXT * (1 + i % 3))
    empty = [n for n in (f"empty_{i}.txt" for i in range(4)) if not is_validation(n, 5)]
    for name in empty:
        (tmp_path / name).write_text("")
    plan = pipeline.row_plan("train", seq_len=16, dataset=f"files:{tmp_path}/*.txt")
    docs = plan.reader.docs
    assert sorted(docs.paths[d].rpartition("/")[2] for d in plan.skipped) == sorted(empty)
    assert plan.num_documents == len(docs) and len(plan.skipped) == len(empty) > 0
    assert not set(plan.index.doc.tolist()) & set(plan.skipped.tolist())
    tok = plan.reader.tokenizer
    want = sum(len(tok.encode_document(docs[d])) for d in range(len(docs))
               if d not in plan.skipped)
    assert int(plan.index.length.sum()) == want  # every token of the other documents, once
    rows = [plan.reader[r] for r in range(len(plan.index))]
    assert all(np.any(r["tokens_segment_ids"] > 0) for r in rows)


def test_a_corpus_of_empty_documents_is_refused_by_name(tokenizer_files, tmp_path):
    gin.bind_parameter("make_tokenizer.kind", "hf")
    gin.bind_parameter("make_tokenizer.path", tokenizer_files[0])
    (tmp_path / "empty_0.txt").write_text("")
    with pytest.raises(ValueError) as e:
        pipeline.row_plan("train", seq_len=16, dataset=f"files:{tmp_path}/*.txt")
    message = str(e.value)
    assert "split 'train': all 1 documents encode to fewer than 2 tokens" in message
    assert "empty_0.txt" in message and "make_tokenizer.path" in message
