"""`sparsejax streaming-heads`: labels a workdir's KV heads retrieval or streaming
(DuoAttention; models/streaming_heads.py) on retrieval prompts of `sparsejax longeval`'s tasks
(their 'eval' stream, seed 1000 + seed, so longeval's own examples are not the calibration
set), and reports the binding that applies the labels to `sample` / `longeval` and the KV
cache memory it saves at the model's limit."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np

from sparsejax.data import retrieval_tasks
from sparsejax.data.tokenizer import make_tokenizer
from sparsejax.infer.cache import init_cache
from sparsejax.infer.generate import pad_prompts
from sparsejax.infer.longeval import make_examples
from sparsejax.infer.workdir import load_workdir
from sparsejax.models import streaming_heads as sh
from sparsejax.models.transformer import ModelConfig
from sparsejax.parallel.mesh import data_parallel_size
from sparsejax.parallel.rules import LOGICAL_RULES
from sparsejax.train.step import model_variables

CALIBRATION_SEED_OFFSET = 1000


def calibrate_workdir(workdir: str, *, fraction: float, length: int | None = None,
                      num_rows: int = 4, sink_tokens: int = 4, recent_tokens: int = 64,
                      seed: int = 0) -> dict[str, Any]:
    """Head errors, labels and the cache memory of the labelled model (gin must already be
    parsed), from `num_rows` calibration prompts (rounded up to the mesh's data-parallel
    size)."""
    sh.StreamingHeads(sink_tokens=sink_tokens, recent_tokens=recent_tokens)  # checks them
    sh.label_heads(np.zeros((1, 1)), fraction)  # a bad fraction fails before anything is built
    if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 1:
        raise ValueError(f"--num_rows={num_rows!r} must be an int >= 1")
    cfg = ModelConfig()
    limit = int(cfg.max_seq_len)
    length = limit if length is None else int(length)
    if not 1 <= length <= limit:
        raise ValueError(f"--length={length} is beyond the model's limit "
                         f"ModelConfig.max_seq_len={limit}")
    tok = make_tokenizer()
    loaded = load_workdir(workdir)
    dp = data_parallel_size(loaded.run.mesh)
    rows = -(-num_rows // dp) * dp  # the batch splits over the mesh's data axes
    tasks = retrieval_tasks.TASKS
    examples = make_examples(tok, tasks, [length], -(-rows // len(tasks)),
                             CALIBRATION_SEED_OFFSET + seed)[:rows]
    tokens, positions, segs = pad_prompts([list(tok.encode_text(e.prompt)) for e in examples],
                                          tok.pad_id)
    with jax.set_mesh(loaded.run.mesh), nn.logical_axis_rules(LOGICAL_RULES):
        errors = sh.calibrate(loaded.model, model_variables(loaded.params, loaded.moe_state),
                              tokens, positions, segs, sink_tokens, recent_tokens)
    heads = sh.label_heads(errors, fraction)
    labelled = sh.StreamingHeads(heads, sink_tokens, recent_tokens)
    bytes_of = lambda streaming: sh.cache_bytes(jax.eval_shape(
        lambda: init_cache(cfg, 1, limit, streaming=streaming)))
    dense, streaming = bytes_of(sh.StreamingHeads()), bytes_of(labelled)
    n_stream = sum(len(h) for h in heads)
    binding = (f"--gin.StreamingHeads.heads={heads!r} "
               f"--gin.StreamingHeads.sink_tokens={sink_tokens} "
               f"--gin.StreamingHeads.recent_tokens={recent_tokens}")
    return {"step": loaded.step, "errors": np.round(errors, 6).tolist(), "heads": heads,
            "streaming_kv_heads": n_stream, "kv_heads": int(errors.size),
            "binding": binding, "calibration_rows": len(examples), "length": length,
            "cache_bytes": {"dense": dense, "streaming": int(streaming),
                            "ratio": round(streaming / dense, 4), "tokens": limit}}
