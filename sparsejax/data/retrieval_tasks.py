"""Synthetic retrieval tasks after RULER's definitions (NVIDIA/RULER), generated locally from a
seed at any length in tokens: what `sparsejax longeval` asks a model and what the training
stream may mix in (`data/retrieval_mix.py`).

Every task hides one or more *needles* in a haystack of RULER's noise sentences ("The grass is
green. The sky is blue. ...") and ends with a question whose answer the model must generate:

- ``passkey``: "The pass key is 71432. Remember it. 71432 is the pass key." (a 5-digit key);
- ``niah_single``: "One of the special magic numbers for {key} is: {7 digits}.", one needle;
- ``niah_multikey``: four such needles with distinct keys, one of them asked for;
- ``niah_multivalue``: four needles with the same key and different numbers, all asked for;
- ``variable_tracking``: a chain "VAR ABCDE = 12345", "VAR FGHIJ = VAR ABCDE", ... (4 hops)
  spread through the haystack; the answer is every variable holding the value.

An example is scored as RULER's `string_match_all`: the fraction of its answers found in the
generated text (case-insensitive). The haystack is sized so that the prompt plus the tokens
the answer may take fill the requested length under the given token counter, and needles sit
at uniformly drawn sentence depths. Examples are a pure function of (seed, task, length,
index, stream): `stream` separates evaluation examples from training documents.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "variable_tracking")
STREAMS = ("eval", "train")

NOISE = ("The grass is green. ", "The sky is blue. ", "The sun is yellow. ", "Here we go. ",
         "There and back again. ")  # the haystack's sentences, repeated
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it "
                 "and memorize it. I will quiz you about the important information there.\n")
NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to "
              "memorize it. I will quiz you about the numbers afterwards.\n")
VT_INTRO = ("Memorize and track the chain(s) of variable assignment hidden in the following "
            "text.\n")
NUM_NEEDLES = 4  # needles of niah_multikey and niah_multivalue
VT_HOPS = 4  # assignments after the first in variable_tracking
# Keys are adjective-noun pairs (RULER draws words from a word list).
ADJECTIVES = ("amber", "bold", "calm", "dark", "eager", "faint", "grand", "hollow", "icy",
              "jolly", "keen", "lofty", "mellow", "noble", "odd", "plain", "quiet", "rapid",
              "silver", "tidy", "upper", "vivid", "warm", "young", "zesty", "brave", "crisp",
              "dusty", "early", "fancy")
NOUNS = ("apple", "bridge", "candle", "desert", "engine", "forest", "garden", "harbor",
         "island", "jacket", "kettle", "ladder", "meadow", "needle", "orchard", "pencil",
         "quarry", "river", "saddle", "tunnel", "valley", "window", "yard", "anchor", "basket",
         "castle", "dragon", "feather", "glacier", "hammer")


@dataclasses.dataclass(frozen=True)
class Example:
    """One generated task. `prompt` is the text given to the model, `answers` the strings the
    generation must contain, `answer_text` the canonical continuation (what a training document
    appends), `needles` the character spans [start, end) of the prompt that hold each answer's
    needle sentence, in order of appearance, and `max_new_tokens` the tokens the answer may
    take."""

    task: str
    length: int
    index: int
    prompt: str
    answers: tuple[str, ...]
    answer_text: str
    needles: tuple[tuple[int, int], ...]
    max_new_tokens: int


def check_tasks(tasks: Sequence[str], setting: str = "tasks") -> tuple[str, ...]:
    """`tasks` as a tuple, each one of TASKS (else a ValueError naming `setting`)."""
    if isinstance(tasks, str):
        tasks = (tasks,)
    tasks = tuple(tasks)
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ValueError(f"{setting}={','.join(tasks)!r}: unknown task {bad[0] if bad else ''!r}"
                         f"; valid: {', '.join(TASKS)}")
    return tasks


def _rng(seed: int, task: str, length: int, index: int, stream: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(
        [int(seed), STREAMS.index(stream), TASKS.index(task), int(length), int(index)]))


def _number(rng: np.random.Generator, digits: int) -> str:
    return str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))


def _keys(rng: np.random.Generator, n: int) -> list[str]:
    picks = rng.choice(len(ADJECTIVES) * len(NOUNS), size=n, replace=False)
    return [f"{ADJECTIVES[p // len(NOUNS)]}-{NOUNS[p % len(NOUNS)]}" for p in picks]


def _variable(rng: np.random.Generator, n: int) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = "".join(chr(ord("A") + int(c)) for c in rng.integers(0, 26, 5))
        if name not in names:
            names.append(name)
    return names


def _content(task: str, rng: np.random.Generator):
    """(intro, needle sentences in chain order, question, answers, answer_text)."""
    if task == "passkey":
        key = _number(rng, 5)
        return (PASSKEY_INTRO, [f"The pass key is {key}. Remember it. {key} is the pass key. "],
                "What is the pass key? The pass key is", (key,), f" {key}.")
    if task in ("niah_single", "niah_multikey"):
        n = 1 if task == "niah_single" else NUM_NEEDLES
        keys = _keys(rng, n)
        values = [_number(rng, 7) for _ in keys]
        asked = int(rng.integers(n))
        needles = [f"One of the special magic numbers for {k} is: {v}. " for k, v in
                   zip(keys, values)]
        question = (f"What is the special magic number for {keys[asked]} mentioned in the "
                    f"provided text? The special magic number for {keys[asked]} mentioned in "
                    f"the provided text is")
        # the asked needle first: its span is needles[0] (the others are distractors)
        order = [asked] + [i for i in range(n) if i != asked]
        return (NIAH_INTRO, [needles[i] for i in order], question, (values[asked],),
                f" {values[asked]}.")
    if task == "niah_multivalue":
        key = _keys(rng, 1)[0]
        values = []
        while len(values) < NUM_NEEDLES:
            v = _number(rng, 7)
            if v not in values:
                values.append(v)
        needles = [f"One of the special magic numbers for {key} is: {v}. " for v in values]
        question = (f"What are all the special magic numbers for {key} mentioned in the "
                    f"provided text? The special magic numbers for {key} mentioned in the "
                    f"provided text are")
        return (NIAH_INTRO, needles, question, tuple(values), " " + ", ".join(values) + ".")
    if task == "variable_tracking":
        value = _number(rng, 5)
        names = _variable(rng, VT_HOPS + 1)
        needles = [f"VAR {names[0]} = {value}. "] + [
            f"VAR {names[i]} = VAR {names[i - 1]}. " for i in range(1, len(names))]
        question = (f"Question: Find all variables that are assigned the value {value} in the "
                    f"text above. Answer: According to the chain(s) of variable assignment in "
                    f"the text above, {len(names)} variables are assigned the value {value}, "
                    f"they are:")
        return VT_INTRO, needles, question, tuple(names), " " + " ".join(names) + "."
    raise ValueError(f"task={task!r} is unknown; valid: {', '.join(TASKS)}")


def _assemble(intro, needles, question, noise_sentences, depths):
    """The prompt with `noise_sentences` haystack sentences and needle i inserted before
    sentence depths[i] (sorted, in chain order); returns (prompt, needle spans)."""
    parts, spans, at = [intro], [], len(intro)
    j = 0
    for i in range(noise_sentences + 1):
        while j < len(needles) and depths[j] == i:
            spans.append((at, at + len(needles[j].rstrip())))
            parts.append(needles[j])
            at += len(needles[j])
            j += 1
        if i < noise_sentences:
            s = NOISE[i % len(NOISE)]
            parts.append(s)
            at += len(s)
    body = "".join(parts).rstrip()
    return body + "\n" + question, tuple(spans)


def generate_example(task: str, length: int, index: int, count_tokens: Callable[[str], int],
                     *, seed: int = 0, stream: str = "eval",
                     answer_tokens: Callable[[str], int] | None = None,
                     setting: str = "length") -> Example:
    """Example `index` of `task` whose prompt takes at most `length - max_new_tokens` tokens
    under `count_tokens` (the model's encoding of a prompt), with as much haystack as fits.
    `answer_tokens(answer_text)` is what the answer may take (default: the canonical answer's
    tokens + 4). A length too short for the task is a ValueError naming `setting`."""
    if stream not in STREAMS:
        raise ValueError(f"stream={stream!r} must be one of {STREAMS}")
    rng = _rng(seed, task, length, index, stream)
    intro, needles, question, answers, answer_text = _content(task, rng)
    n_new = int(answer_tokens(answer_text)) if answer_tokens is not None else \
        max(1, count_tokens(answer_text) - count_tokens("")) + 4
    budget = int(length) - n_new
    draw = rng.random(len(needles))  # depths as fractions of the haystack, fixed per example

    def build(n):
        depths = np.floor(draw * (n + 1)).astype(int).clip(0, n)
        if task == "variable_tracking":  # a chain must read in order
            depths = np.sort(depths)
        order = np.argsort(depths, kind="stable")
        text, spans = _assemble(intro, [needles[o] for o in order], question, n,
                                [int(depths[o]) for o in order])
        return text, spans, order

    text, spans, order = build(0)
    if count_tokens(text) > budget:
        raise ValueError(f"{setting}={length}: task {task!r} needs {count_tokens(text)} prompt "
                         f"tokens + {n_new} answer tokens without any haystack; use longer "
                         f"lengths")
    lo, hi = 0, 1
    while count_tokens(build(hi)[0]) <= budget:  # gallop, then bisect the haystack size
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count_tokens(build(mid)[0]) <= budget else (lo, mid)
    text, spans, order = build(lo)
    # spans in chain order (the order of `needles`): answers map onto them
    chain_spans = [None] * len(needles)
    for pos, o in enumerate(order):
        chain_spans[o] = spans[pos]
    return Example(task, int(length), int(index), text, answers, answer_text,
                   tuple(chain_spans), n_new)


def generate_examples(tasks: Sequence[str], lengths: Sequence[int], num_samples: int,
                      count_tokens: Callable[[str], int], *, seed: int = 0,
                      stream: str = "eval", answer_tokens: Callable[[str], int] | None = None,
                      settings: tuple[str, str] = ("tasks", "length")) -> list[Example]:
    """`num_samples` examples of every task at every length (task-major); an unknown task or
    a length too short is a ValueError naming `settings[0]` or `settings[1]`."""
    return [generate_example(t, n, i, count_tokens, seed=seed, stream=stream,
                             answer_tokens=answer_tokens, setting=settings[1])
            for t in check_tasks(tasks, settings[0]) for n in lengths for i in range(num_samples)]


def score(prediction: str, answers: Sequence[str]) -> float:
    """RULER's string_match_all: the fraction of `answers` found in `prediction`, ignoring
    case."""
    pred = prediction.lower()
    return sum(a.lower() in pred for a in answers) / len(answers)
