"""`sparsejax longeval`: RULER-style retrieval accuracy of a workdir's model per task and
length (tasks: data/retrieval_tasks.py).

The examples are generated for the model's own tokenizer (a prompt plus its answer budget fill
the length), answered by greedy decoding with the KV cache in fixed-shape batches
(`infer/batched.BatchedModel`, as the lm-evaluation-harness model does) and scored as RULER's
string_match_all. Writes `longeval.json` (accuracy, standard error over examples, per task and
length), `predictions.jsonl` (each example's answers and generated text) and `longeval.png`.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np

from sparsejax.analysis.longeval_plot import plot_longeval
from sparsejax.data import retrieval_tasks
from sparsejax.data.tokenizer import make_tokenizer
from sparsejax.infer.batched import BatchedModel
from sparsejax.infer.workdir import load_workdir
from sparsejax.models.transformer import ModelConfig
from sparsejax.parallel.rules import LOGICAL_RULES

MIN_DEFAULT_LENGTH = 1024


def default_lengths(max_seq_len: int) -> list[int]:
    """Powers of two from 1K up to the model's limit, and the limit itself (just the limit
    when it is below 1K)."""
    out, n = [], MIN_DEFAULT_LENGTH
    while n < max_seq_len:
        out.append(n)
        n *= 2
    return out + [int(max_seq_len)]


def parse_lengths(text: str | None, max_seq_len: int) -> list[int]:
    """`--lengths` ('1024,4K,8k' or None: `default_lengths`) as sorted distinct ints, each in
    [1, max_seq_len]."""
    if text is None or not str(text).strip():
        return default_lengths(max_seq_len)
    out = []
    for item in str(text).split(","):
        s = item.strip().lower()
        try:
            n = int(s[:-1]) * 1024 if s.endswith("k") else int(s)
        except ValueError:
            raise ValueError(f"--lengths={text!r}: {item!r} is not a length in tokens (e.g. "
                             f"1024 or 4K)") from None
        if not 1 <= n <= max_seq_len:
            raise ValueError(f"--lengths={text!r}: {n} is beyond the model's limit "
                             f"ModelConfig.max_seq_len={max_seq_len}")
        out.append(n)
    return sorted(set(out))


def _round_up(n: int, multiple: int = 16) -> int:
    return -(-int(n) // multiple) * multiple


def answer_budget(tokenizer: Any, example_answer: str) -> int:
    """Tokens a generated answer may take: the canonical answer's tokens + 4, rounded up to a
    multiple of 16 (so that a run compiles one decode loop per task, whatever the
    tokenizer)."""
    n = len(tokenizer.encode(example_answer))
    return _round_up(n + 4)


def make_examples(tokenizer: Any, tasks: Sequence[str], lengths: Sequence[int],
                  num_samples: int, seed: int) -> list[retrieval_tasks.Example]:
    """The evaluation examples for a model with `tokenizer` (prompts counted as it encodes
    them, `encode_text`)."""
    return retrieval_tasks.generate_examples(
        tasks, lengths, num_samples, lambda text: len(tokenizer.encode_text(text)), seed=seed,
        answer_tokens=lambda answer: answer_budget(tokenizer, answer), settings=("--tasks", "--lengths"))


def evaluate(model: BatchedModel, tokenizer: Any, examples: Sequence[retrieval_tasks.Example],
             ) -> tuple[dict, list[dict]]:
    """Greedy answers and scores: ({task: {length: {mean, stderr, n}}}, one record per
    example)."""
    groups: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        groups[(e.task, e.max_new_tokens)].append(i)
    texts: list[str] = [""] * len(examples)
    for (_, n_new), idx in groups.items():
        prompts = [list(tokenizer.encode_text(examples[i].prompt)) for i in idx]
        rows = model.greedy(prompts, n_new, pad_id=tokenizer.pad_id, eos_id=tokenizer.eos_id)
        for i, row in zip(idx, rows):
            texts[i] = tokenizer.decode([t for t in row if t < tokenizer.vocab_size])
    scores: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    records = []
    for e, text in zip(examples, texts):
        s = retrieval_tasks.score(text, e.answers)
        scores[e.task][e.length].append(s)
        records.append({"task": e.task, "length": e.length, "index": e.index,
                        "answers": list(e.answers), "output": text, "score": s})
    return {t: {n: summarize(v) for n, v in by_len.items()} for t, by_len in scores.items()}, \
        records


def summarize(scores: Sequence[float]) -> dict[str, float]:
    """Mean, standard error of the mean (over examples) and count."""
    a = np.asarray(scores, np.float64)
    err = float(a.std(ddof=1) / np.sqrt(a.size)) if a.size > 1 else 0.0
    return {"mean": float(a.mean()), "stderr": err, "n": int(a.size)}


def longeval_workdir(workdir: str, *, tasks: Sequence[str] = retrieval_tasks.TASKS,
                     lengths: str | None = None, num_samples: int = 20, seed: int = 0,
                     batch_size: int = 4, out_dir: str | None = None) -> dict[str, Any]:
    """Runs the tasks on the workdir's model (gin must already be parsed) and writes the JSON,
    predictions and plot into `out_dir` (default WORKDIR/longeval). Bad settings are refused
    before the model is built."""
    tasks = retrieval_tasks.check_tasks(tasks, "--tasks")
    for name, v in (("num_samples", num_samples), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"--{name}={v!r} must be an int >= 1")
    max_len = int(ModelConfig().max_seq_len)
    lengths_ = parse_lengths(lengths, max_len)
    tok = make_tokenizer()
    examples = make_examples(tok, tasks, lengths_, num_samples, seed)  # too short: ValueError
    loaded = load_workdir(workdir)
    model = BatchedModel(loaded.model, loaded.params, loaded.moe_state, loaded.run.mesh,
                         batch_size)
    with jax.set_mesh(loaded.run.mesh), nn.logical_axis_rules(LOGICAL_RULES):
        acc, records = evaluate(model, tok, examples)
    out_dir = out_dir or os.path.join(workdir, "longeval")
    os.makedirs(out_dir, exist_ok=True)
    per_length = {n: float(np.mean([acc[t][n]["mean"] for t in tasks])) for n in lengths_}
    result = {"step": loaded.step, "seed": seed, "num_samples": num_samples,
              "tasks": list(tasks), "lengths": lengths_,
              "accuracy": {t: {str(n): acc[t][n] for n in lengths_} for t in tasks},
              "mean_accuracy": {str(n): v for n, v in per_length.items()}}
    with open(os.path.join(out_dir, "predictions.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    result["plot"] = plot_longeval(result, os.path.join(out_dir, "longeval.png"),
                                   title=os.path.basename(os.path.abspath(workdir)))
    result["json"] = os.path.join(out_dir, "longeval.json")
    with open(result["json"], "w") as f:
        json.dump(result, f, indent=1)
    return result
