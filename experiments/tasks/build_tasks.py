"""Builds the local zero-shot tasks of experiments/posttrain.py from the held-out split of the
embedded corpus (the standard library's validation files), seeded, so that any model trained
here can be scored through the lm-evaluation-harness model (`sparsejax lm-eval`):

* `sj_next_line`: which of 4 lines is the real next line of this file? The context is the 8
  lines before it; the 3 other choices are lines of other validation files of similar length.
* `sj_next_token`: which of 4 identifiers ends this line? The line up to its last identifier;
  the others are identifiers of other validation files.

    python experiments/tasks/build_tasks.py            # rewrites the jsonl files beside it
"""
from __future__ import annotations

import argparse
import json
import os
import re

import numpy as np

from sparsejax.data.sources import text_source

HERE = os.path.dirname(os.path.abspath(__file__))
CONTEXT_LINES, CHOICES = 8, 4
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{2,}$")


def _lines(doc: bytes) -> list[str]:
    return doc.decode("utf-8", errors="replace").splitlines()


def _good(line: str) -> bool:
    """A line worth asking about: code of some length, not a comment or a docstring line."""
    s = line.strip()
    return 12 <= len(s) <= 100 and not s.startswith(("#", '"', "'")) and s.isascii()


def next_line(docs: list[list[str]], n: int, rng: np.random.Generator) -> list[dict]:
    pool = [(d, line) for d, lines in enumerate(docs) for line in lines if _good(line)]
    out = []
    while len(out) < n:
        d = int(rng.integers(len(docs)))
        lines = docs[d]
        if len(lines) <= CONTEXT_LINES:
            continue
        i = int(rng.integers(CONTEXT_LINES, len(lines)))
        if not _good(lines[i]):
            continue
        others = set()
        while len(others) < CHOICES - 1:
            od, line = pool[int(rng.integers(len(pool)))]
            if od != d and abs(len(line) - len(lines[i])) <= 20 and line != lines[i]:
                others.add(line)
        choices = [lines[i]] + sorted(others)
        order = rng.permutation(CHOICES)
        out.append({"context": "\n".join(lines[i - CONTEXT_LINES:i]) + "\n",
                    "choices": [choices[j] for j in order],
                    "answer": int(np.argmax(order == 0))})
    return out


def next_token(docs: list[list[str]], n: int, rng: np.random.Generator) -> list[dict]:
    idents = sorted({m.group(0) for lines in docs for line in lines
                     for m in [IDENT.search(line.rstrip())] if m})
    out = []
    while len(out) < n:
        lines = docs[int(rng.integers(len(docs)))]
        if not lines:
            continue
        line = lines[int(rng.integers(len(lines)))].rstrip()
        m = IDENT.search(line)
        if not m or not _good(line) or m.start() < 4:
            continue
        truth = m.group(0)
        others = set()
        while len(others) < CHOICES - 1:
            o = idents[int(rng.integers(len(idents)))]
            if o != truth:
                others.add(o)
        choices = [truth] + sorted(others)
        order = rng.permutation(CHOICES)
        out.append({"context": line[:m.start()], "choices": [choices[j] for j in order],
                    "answer": int(np.argmax(order == 0))})
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=500, help="examples per task")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    source = text_source("stdlib", "validation")
    docs = [_lines(source[i]) for i in range(len(source))]
    for name, build in (("sj_next_line", next_line), ("sj_next_token", next_token)):
        rows = build(docs, args.n, np.random.default_rng(args.seed))
        with open(os.path.join(HERE, f"{name}.jsonl"), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(f"{name}: {len(rows)} examples")


if __name__ == "__main__":
    main()
