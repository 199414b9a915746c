"""`sparsejax longeval`: scoring of generated answers against a constructed model whose
answers are known, the default lengths, and the command end to end on a tiny workdir (JSON,
predictions, plot) with its one-line refusals."""
import json
import os

import pytest

from sparsejax import cli
from sparsejax.data import retrieval_tasks as rt
from sparsejax.data.tokenizer import ByteTokenizer
from sparsejax.infer import longeval

TOK = ByteTokenizer()


class AnsweringModel:
    """Stands in for infer/batched.BatchedModel: answers every other example correctly
    (its canonical answer, then EOS), the others with the first answer only."""

    def __init__(self, examples):
        self.by_prompt = {tuple(TOK.encode_text(e.prompt)): (i, e) for i, e in
                          enumerate(examples)}
        self.calls = []

    def greedy(self, prompts, max_new_tokens, *, pad_id, eos_id):
        self.calls.append(max_new_tokens)
        out = []
        for p in prompts:
            i, e = self.by_prompt[tuple(p)]
            text = e.answer_text if i % 2 == 0 else f" {e.answers[0]}, 0000000"
            out.append((list(TOK.encode(text)) + [eos_id])[:max_new_tokens])
        return out


def test_scores_of_a_constructed_model():
    examples = longeval.make_examples(TOK, rt.TASKS, [1024, 2048], 4, seed=0)
    acc, records = longeval.evaluate(AnsweringModel(examples), TOK, examples)
    for task in rt.TASKS:
        k = 1 if task in ("passkey", "niah_single", "niah_multikey") else \
            len(examples[[e.task for e in examples].index(task)].answers)
        # indices 0 and 2 right; 1 and 3 get 1 of the k answers
        expect = (2 * 1.0 + 2 * (1 / k)) / 4
        for n in (1024, 2048):
            assert acc[task][n]["n"] == 4
            assert acc[task][n]["mean"] == pytest.approx(expect)
    assert len(records) == len(examples)
    assert all(r["output"] == examples[i].answer_text for i, r in enumerate(records)
               if i % 2 == 0)


def test_default_lengths_and_parsing():
    assert longeval.default_lengths(4096) == [1024, 2048, 4096]
    assert longeval.default_lengths(6000) == [1024, 2048, 4096, 6000]
    assert longeval.default_lengths(512) == [512]
    assert longeval.parse_lengths("2K,1024,1k", 4096) == [1024, 2048]
    with pytest.raises(ValueError, match=r"--lengths='8K': 8192 is beyond the model's limit "
                                         r"ModelConfig.max_seq_len=4096"):
        longeval.parse_lengths("8K", 4096)


def run(capsys, *args):
    capsys.readouterr()
    rc = cli.main(["longeval", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_longeval_command_end_to_end(make_source, tmp_path, capsys):
    w = make_source(tmp_path / "w", "--gin.ModelConfig.max_seq_len=1024")
    tasks = ("passkey", "niah_multivalue", "variable_tracking")
    rc, out, err = run(capsys, f"--workdir={w}", f"--tasks={','.join(tasks)}",
                       "--lengths=768,1K", "--num_samples=2", "--seed=3")
    assert rc == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["lengths"] == [768, 1024] and res["tasks"] == list(tasks)
    for t in tasks:
        for n in ("768", "1024"):
            cell = res["accuracy"][t][n]
            assert cell["n"] == 2 and 0 <= cell["mean"] <= 1
    assert os.path.getsize(res["plot"]) > 0
    assert json.load(open(res["json"]))["accuracy"] == res["accuracy"]
    preds = [json.loads(line) for line in open(os.path.join(w, "longeval", "predictions.jsonl"))]
    assert len(preds) == 12
    # each record is scored as string_match_all of its own output
    assert all(p["score"] == rt.score(p["output"], p["answers"]) for p in preds)
    # bad input: one line naming the setting, before any model is built
    for args, needle in ((["--lengths=2K"], "--lengths='2K': 2048 is beyond the model's limit"),
                         (["--tasks=passkey,foo"], "--tasks='passkey,foo': unknown task 'foo'"),
                         (["--lengths=256"], "--lengths=256: task 'passkey' needs")):
        rc, _, err = run(capsys, f"--workdir={w}", *args)
        assert rc == 2 and needle in err and err.count("\n") == 1, err
