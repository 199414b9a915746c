"""RULER-style retrieval tasks (sparsejax/data/retrieval_tasks.py): deterministic per seed,
filling the requested length under the token counter, with each answer inside the needle
sentence the example says holds it; scoring is RULER's string_match_all."""
import pytest

from sparsejax.data import retrieval_tasks as rt
from sparsejax.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def count(text):
    return len(TOK.encode_text(text))


@pytest.mark.parametrize("task", rt.TASKS)
@pytest.mark.parametrize("length", [1024, 3000])
def test_examples_are_deterministic_fill_the_length_and_hold_their_answers(task, length):
    a = rt.generate_example(task, length, 3, count, seed=7)
    assert a == rt.generate_example(task, length, 3, count, seed=7)
    assert a.prompt != rt.generate_example(task, length, 3, count, seed=8).prompt
    assert a.prompt != rt.generate_example(task, length, 4, count, seed=7).prompt
    assert a.prompt != rt.generate_example(task, length, 3, count, seed=7, stream="train").prompt
    # prompt + answer budget fit, and one more haystack sentence would not
    n = count(a.prompt)
    assert n + a.max_new_tokens <= length
    assert n + a.max_new_tokens > length - max(len(s) for s in rt.NOISE) - 1
    assert a.max_new_tokens == len(a.answer_text.encode()) + 4
    spans = [a.prompt[s:e] for s, e in a.needles]
    assert all(s.strip().endswith(".") for s in spans)
    starts = [s for s, _ in a.needles]
    if task == "passkey":
        (key,) = a.answers
        assert len(key) == 5 and spans[0].count(key) == 2 and len(spans) == 1
    elif task in ("niah_single", "niah_multikey"):
        assert len(spans) == (1 if task == "niah_single" else rt.NUM_NEEDLES)
        key = a.prompt.rsplit("for ", 1)[1].split(" ")[0]  # the key the question asks for
        assert spans[0] == f"One of the special magic numbers for {key} is: {a.answers[0]}."
        assert all(a.answers[0] not in s for s in spans[1:])  # distractors hold other numbers
        assert len({s.split(" is:")[0] for s in spans}) == len(spans)  # distinct keys
    elif task == "niah_multivalue":
        assert len(spans) == len(a.answers) == rt.NUM_NEEDLES
        assert all(s.endswith(f"is: {v}.") for s, v in zip(spans, a.answers))
    else:  # the chain in order: each variable assigned from the one before
        assert starts == sorted(starts) and len(a.answers) == rt.VT_HOPS + 1
        value = spans[0].split("= ")[1].rstrip(".")
        assert spans[0] == f"VAR {a.answers[0]} = {value}."
        for prev, name, s in zip(a.answers, a.answers[1:], spans[1:]):
            assert s == f"VAR {name} = VAR {prev}."
        assert f"assigned the value {value} in the text above" in a.prompt
    # each needle appears once, and the rest of the prompt is intro, haystack and question
    for s in spans:
        assert a.prompt.count(s) == 1 or task == "passkey"


def test_needle_depths_spread_over_the_haystack():
    depths = [rt.generate_example("niah_single", 4096, i, count).needles[0][0] / 4096
              for i in range(40)]
    assert min(depths) < 0.25 and max(depths) > 0.75


def test_score_is_string_match_all():
    assert rt.score(" 1234567.", ("1234567",)) == 1.0
    assert rt.score(" 123456", ("1234567",)) == 0.0
    assert rt.score("ABCDE and fghij", ("abcde", "FGHIJ", "KLMNO", "PQRST")) == 0.5


@pytest.mark.parametrize("kw, needle", [
    (dict(task="foo"), "tasks='foo'"),
    (dict(length=200), "length=200"),
])
def test_bad_input_is_one_line(kw, needle):
    args = dict(task="niah_single", length=1024) | kw
    with pytest.raises(ValueError, match=needle) as e:
        rt.generate_examples([args["task"]], [args["length"]], 1, count)
    assert "\n" not in str(e.value)


def test_stream_seeds_differ_in_content():
    ev = {rt.generate_example("passkey", 1024, i, count).answers for i in range(20)}
    tr = {rt.generate_example("passkey", 1024, i, count, stream="train").answers
          for i in range(20)}
    assert len(ev) == 20 and not ev & tr
