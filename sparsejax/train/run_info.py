"""The record a run's metrics.jsonl starts with (step 0): which corpus it trains on (its
fingerprint), how diverse its training batches are, how many documents the tokenizer left
with nothing to predict (skipped), and which eval sample it uses; logged as INFO lines too. A
resumed run whose corpus changed (another Python, edited files) says so."""
from __future__ import annotations

import logging
import os
from typing import Any

from sparsejax.data.sources import corpus_summary
from sparsejax.train.metrics import FINGERPRINT, read_metrics, recorded_fingerprints

log = logging.getLogger(__name__)


def start_record(cfg: Any, data_it: Any, eval_set: Any) -> dict[str, Any]:
    """Corpus fingerprint and size, distinct documents per batch, skipped training documents
    (this process's shards) and validation documents, eval sample size (step 0)."""
    corpus = corpus_summary(cfg.dataset, cfg.data_dir)
    distinct = data_it.distinct_docs_per_batch()
    rows = len(data_it.shard_ids) * data_it.rows_per_shard
    log.info("data: %r, %s documents, corpus fingerprint %s; training rows of %d tokens drawn in a "
             "random order: %.2f distinct documents per batch of %d rows (mean over the first 100 "
             "batches)", cfg.dataset, corpus["corpus_documents"], corpus[FINGERPRINT],
             cfg.seq_len + 1, distinct, rows)
    skipped = data_it.skipped_documents()
    if skipped:
        log.warning("data: %d training documents encode to fewer than 2 tokens (nothing to "
                    "predict) and are skipped, e.g. %s", len(skipped), ", ".join(skipped[:3]))
    record = {**corpus, "data_distinct_docs_per_batch": distinct, "data_rows_per_batch": rows,
              "data_skipped_documents": len(skipped)}
    if eval_set is not None:
        log.info("eval: %s", eval_set.describe())
        record.update(eval_sample_rows=eval_set.rows, eval_sample_seed=eval_set.seed,
                      eval_skipped_documents=eval_set.skipped_documents)
    return record


def resume_record(cfg: Any, workdir: str) -> dict[str, Any] | None:
    """On resume: None if the corpus is the one the run started on, else a warning and a record
    of the new fingerprint (tables then treat the run as trained on a mixed corpus)."""
    path = os.path.join(workdir, "metrics.jsonl")
    seen = recorded_fingerprints(read_metrics(path)) if os.path.exists(path) else []
    now = corpus_summary(cfg.dataset, cfg.data_dir)[FINGERPRINT]
    if seen and seen[-1] == now:
        return None
    log.warning("the corpus changed since this run started (fingerprint %s, now %s): the run "
                "continues on the new corpus and its metrics record both", seen or "not recorded", now)
    return {FINGERPRINT: now}
