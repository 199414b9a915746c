"""Perplexity of a model on a text under the protocols papers report
(`sparsejax eval --text_file=PATH` or `--dataset=files:GLOB`).

The text (several files: joined with "\\n\\n" in path order) is tokenized once, as
`tokenizer(text)` in transformers does (`encode_text`: the tokenizer's own special tokens; the
byte tokenizer starts documents with its BOS as training does). Windows are `window` tokens.

* `concat` (SparseGPT / Wanda): floor(n / window) non-overlapping windows, the tail dropped;
  in each window every token after the first is scored with the window before it as context.
  Every window scores window - 1 tokens, so exp(mean NLL over scored tokens) is the papers'
  exp(mean over windows of the window's mean loss).
* `sliding` (the strided evaluation of Hugging Face's perplexity guide): windows of up to
  `window` tokens starting every `stride` tokens until one reaches the end; each scores the
  tokens the previous window did not reach, with the rest of the window as context; a window
  never scores its own first token (it has no context there). With stride < window every
  token after the text's first is scored exactly once; with stride = window the windows are
  concat's, the tail included. (The
  guide weights each window's mean loss by its target count minus one, an approximation off
  by one token per window after the first; here each token counts once.)

The loss's standard error is taken over windows (evaluation.loss_stats).
"""
from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any, Sequence

import jax
import numpy as np

from sparsejax.data.tokenizer import ByteTokenizer, make_tokenizer
from sparsejax.models.transformer import ModelConfig
from sparsejax.train.evaluation import EvalSet
from sparsejax.train.workdir import has_pretrained

FILES_PREFIX = "files:"

PROTOCOLS = ("concat", "sliding")


def read_texts(text_files: Sequence[str] = (), dataset: str | None = None) -> str:
    """The text to score: the files given and those `dataset` ('files:GLOB') matches, joined
    with "\\n\\n" in path order."""
    paths = list(text_files)
    if dataset is not None:
        if not dataset.startswith(FILES_PREFIX):
            raise ValueError(f"--dataset={dataset!r}: text evaluation reads local files; give "
                             f"'{FILES_PREFIX}GLOB'")
        matched = sorted(glob.glob(dataset[len(FILES_PREFIX):], recursive=True))
        if not matched:
            raise ValueError(f"--dataset={dataset!r} matches no files")
        paths += matched
    for p in paths:
        if not os.path.isfile(p):
            raise ValueError(f"--text_file={p!r} is not a file")
    texts = []
    for p in paths:
        with open(p, encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
    return "\n\n".join(texts)


def windows(n_tokens: int, window: int, protocol: str, stride: int | None = None
            ) -> list[tuple[int, int, int]]:
    """[(begin, end, first scored token)] of the protocol over a text of `n_tokens` tokens."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"--protocol={protocol!r} is not valid; valid: {PROTOCOLS}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"--seq_len={window!r} must be an int >= 2 (the window in tokens)")
    if n_tokens < window:
        raise ValueError(f"the text has {n_tokens} tokens, fewer than one window of "
                         f"--seq_len={window}; give a longer text or a shorter window")
    if protocol == "concat":
        if stride is not None:
            raise ValueError("--stride applies to --protocol=sliding only")
        return [(i * window, (i + 1) * window, i * window + 1) for i in range(n_tokens // window)]
    if stride is None or isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"--protocol=sliding needs --stride (an int >= 1), got {stride!r}")
    if stride > window:
        raise ValueError(f"--stride={stride} is larger than the window (--seq_len={window}); "
                         f"tokens between windows would never be scored")
    out, prev_end = [], 1
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return out


def text_eval_set(ids: np.ndarray, window: int, protocol: str, stride: int | None,
                  global_batch_size: int) -> EvalSet:
    """The windows as eval batches: each row is a window's inputs (its tokens but the last)
    and targets (but the first), the scored targets in `loss_mask`; rows are right-padded to
    window - 1 (causal attention: padding after a token never changes its logits) and batches
    to `global_batch_size` rows with empty rows (dropped from the statistics)."""
    spans = windows(len(ids), window, protocol, stride)
    seq = window - 1
    rows = []
    for begin, end, first in spans:
        tokens = np.asarray(ids[begin:end], np.int32)
        n = len(tokens) - 1
        row = {k: np.zeros(seq, np.int32) for k in ("inputs", "targets", "segment_ids",
                                                    "loss_mask")}
        row["inputs"][:n], row["targets"][:n] = tokens[:-1], tokens[1:]
        row["segment_ids"][:n] = 1
        row["loss_mask"][:n] = np.arange(begin + 1, end) >= first
        row["positions"] = np.arange(seq, dtype=np.int32)
        rows.append(row)
    empty = {k: np.zeros_like(v) for k, v in rows[0].items()}
    empty["positions"] = rows[0]["positions"]
    rows += [empty] * (-len(rows) % global_batch_size)
    per = global_batch_size // jax.process_count()  # this process's rows of each batch
    mine = slice(jax.process_index() * per, (jax.process_index() + 1) * per)
    batches = tuple({k: np.stack([r[k] for r in rows[i:i + global_batch_size]])[mine]
                     for k in rows[0]} for i in range(0, len(rows), global_batch_size))
    return EvalSet(batches, len(spans), global_batch_size, seq, 0, len(spans))


@dataclasses.dataclass(frozen=True)
class TextEval:
    """What `sparsejax eval` scores instead of the eval sample: the text of `text_files` and
    `dataset` under `protocol`, windows of `window` tokens (None: the model's max_seq_len)."""

    text_files: tuple[str, ...] = ()
    dataset: str | None = None
    protocol: str = "concat"
    stride: int | None = None
    window: int | None = None

    def eval_set(self, workdir: str, global_batch_size: int) -> tuple[EvalSet, dict[str, Any]]:
        """(the windows as an EvalSet, what to report with the result); gin parsed."""
        tok = make_tokenizer()
        if isinstance(tok, ByteTokenizer) and has_pretrained(workdir):
            raise ValueError(f"--workdir={workdir!r} holds an imported model without a "
                             f"tokenizer (its checkpoint had no tokenizer.json), so text cannot "
                             f"be tokenized for it; import it with its tokenizer.json")
        max_len = ModelConfig().max_seq_len
        window = max_len if self.window is None else self.window
        if isinstance(window, int) and window - 1 > max_len:
            raise ValueError(f"--seq_len={window}: a window feeds the model {window - 1} tokens, "
                             f"more than ModelConfig.max_seq_len={max_len}; use --seq_len <= "
                             f"{max_len + 1}")
        ids = tok.encode_text(read_texts(self.text_files, self.dataset))
        eval_set = text_eval_set(ids, window, self.protocol, self.stride, global_batch_size)
        return eval_set, {"protocol": self.protocol, "window": window, "stride": self.stride,
                          "text_tokens": int(len(ids)), "windows": eval_set.rows}
