"""`sparsejax prefill-search`: MInference's offline per-head pattern search
(`models/prefill_search.py`) on a workdir's model, over calibration rows of its validation
split (the first rows of the order seeded `CALIBRATION_SEED_OFFSET + seed`, so not the eval
sample's rows). Writes ``W/prefill_search.json`` (every layer's and head's recall and density
per pattern, the choice) and ``W/prefill_search.gin`` (the `attention_kernel.prefill_method`
binding that runs the choice, for `eval`, `sample` and the lm-eval model)."""
from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from pallas_kernels.block_sparse_attention.minference import PATTERNS, MInferenceMask
from sparsejax import config as config_lib
from sparsejax.data import pipeline
from sparsejax.infer.workdir import load_workdir
from sparsejax.models import prefill_search as ps
from sparsejax.models.qkv_capture import capture_qkv
from sparsejax.models.sparse_attention import DEFAULT_BLOCK, prefill_spec
from sparsejax.models.transformer import ModelConfig
from sparsejax.parallel.mesh import data_parallel_size
from sparsejax.parallel.rules import LOGICAL_RULES
from sparsejax.train.step import model_variables
from sparsejax.train.trainer import TrainConfig

CALIBRATION_SEED_OFFSET = 1000
JSON_NAME, GIN_NAME = "prefill_search.json", "prefill_search.gin"


def method_layers(cfg: Any) -> list[int]:
    """The layers that `attention_kernel.prefill_method` runs (dense, full causal attention);
    models it cannot run on are a ValueError naming the setting."""
    if cfg.kv_lora_rank:
        raise ValueError(f"ModelConfig.kv_lora_rank={cfg.kv_lora_rank}: the prefill search "
                         f"needs standard attention; multi-head latent attention does not run "
                         f"attention_kernel.prefill_method (valid: kv_lora_rank=0)")
    kinds = tuple(cfg.attention_kinds)
    if "nsa" in kinds:
        raise ValueError(f"ModelConfig.attention_kinds={kinds!r} has 'nsa' layers: the prefill "
                         f"search runs on models whose layers are 'dense' or 'block_sparse'")
    if cfg.attention_sinks:
        raise ValueError("ModelConfig.attention_sinks=True: prefill methods need the dense "
                         "softmax without sinks (valid: attention_sinks=False)")
    if cfg.scan_layers:
        raise ValueError("ModelConfig.scan_layers=True: layer_patterns give each layer its "
                         "own patterns, which scanned layers cannot (valid: scan_layers=False)")
    layers = [i for i in range(cfg.num_layers)
              if cfg.attention_kind(i) == "dense" and cfg.window(i) == 0]
    if not layers:
        raise ValueError(f"no layer runs a prefill method: each is block-sparse or windowed "
                         f"(ModelConfig.attention_kinds={kinds!r}, "
                         f"layer_types={tuple(cfg.layer_types)!r})")
    return layers


def check_args(rows: Any, seq_len: Any, block_size: Any, limit: int) -> None:
    """One-line ValueErrors for the command's flags."""
    for name, value in (("rows", rows), ("seq_len", seq_len), ("block_size", block_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name}={value!r} must be an int >= 1")
    if seq_len > limit:
        raise ValueError(f"--seq_len={seq_len} is beyond the model's limit "
                         f"ModelConfig.max_seq_len={limit}")
    if seq_len % block_size:
        raise ValueError(f"--seq_len={seq_len} is not a multiple of --block_size={block_size}; "
                         f"the layouts are whole blocks")


def calibration_rows(cfg: TrainConfig, rows: int, seq_len: int, seed: int) -> dict:
    """The first `rows` validation rows of `seq_len` tokens in the order seeded
    `CALIBRATION_SEED_OFFSET + seed`: {'inputs', 'positions', 'segment_ids', ...}."""
    seed = CALIBRATION_SEED_OFFSET + seed
    plan = pipeline.row_plan("validation", seq_len=seq_len, seed=seed, dataset=cfg.dataset,
                             data_dir=cfg.data_dir)
    if rows > len(plan.index):
        raise ValueError(f"--rows={rows}: the validation split of {cfg.dataset!r} has "
                         f"{len(plan.index)} rows of {seq_len} tokens; use at most that")
    data = pipeline.make_dataset("validation", global_batch_size=rows, seq_len=seq_len,
                                 seed=seed, dataset=cfg.dataset, data_dir=cfg.data_dir,
                                 num_rows=rows, process_index=0, process_count=1)
    return next(iter(data))


def search_workdir(workdir: str, *, rows: int = 4, seq_len: int | None = None,
                   block_size: int = DEFAULT_BLOCK, seed: int = 0) -> dict[str, Any]:
    """Runs the search on the workdir's model (gin must already be parsed: the budgets are
    `MInferenceMask`'s bindings), writes W/prefill_search.json and W/prefill_search.gin, and
    returns a summary. `rows` is rounded up to the mesh's data-parallel size."""
    cfg, model_cfg = TrainConfig(), ModelConfig()
    seq_len = cfg.seq_len if seq_len is None else seq_len
    check_args(rows, seq_len, block_size, int(model_cfg.max_seq_len))
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed={seed!r} must be an int >= 0")
    layers = method_layers(model_cfg)
    if prefill_spec() is not None:
        raise ValueError(f"attention_kernel.prefill_method={prefill_spec()!r} is set: the search "
                         f"calibrates on the dense model's attention; leave it unset here")
    for field in ps.SEARCHED:
        config_lib.refuse_given(f"MInferenceMask.{field}", "the pattern search sets it")
    template = MInferenceMask()  # the budgets, from gin
    ps.check_template(template)
    loaded = load_workdir(workdir)
    config_lib.check_unused_bindings()  # every given binding took effect, before the work
    dp = data_parallel_size(loaded.run.mesh)
    n = -(-rows // dp) * dp  # the batch splits over the mesh's data axes
    batch = calibration_rows(cfg, n, seq_len, seed)
    with jax.set_mesh(loaded.run.mesh), nn.logical_axis_rules(LOGICAL_RULES):
        qkv = capture_qkv(loaded.model, model_variables(loaded.params, loaded.moe_state),
                          batch["inputs"], batch["positions"], batch["segment_ids"])
        qk = [(q, k) if i in layers else None for i, (q, k, _) in enumerate(qkv)]
        result = ps.search_patterns(qk, template, block_size, batch["segment_ids"])
    spec = ps.prefill_method_spec(result, template, block_size)
    summary = summarize(result, layers)
    report = {"step": loaded.step, "rows": n, "seq_len": seq_len, "block_size": block_size,
              "seed": seed, "patterns": list(PATTERNS), "budgets": ps.budgets(template),
              **summary, "layers": layer_tables(result), "prefill_method": spec}
    json_path, gin_path = os.path.join(workdir, JSON_NAME), os.path.join(workdir, GIN_NAME)
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)
    header = (f"MInference per-head patterns (sparsejax prefill-search, step {loaded.step}): "
              f"{n} validation rows of {seq_len} tokens,\nmean recall {summary['mean_recall']} "
              f"at mean density {summary['mean_density']} (kept tiles / causal tiles).\n"
              f"Use: sparsejax eval --workdir={workdir} --gin_file={gin_path}")
    with open(gin_path, "w") as f:
        f.write(ps.gin_text(spec, header))
    return {"step": loaded.step, "rows": n, "seq_len": seq_len, "block_size": block_size,
            **summary, "json": json_path, "gin_file": gin_path}


def summarize(result: ps.SearchResult, layers: list[int]) -> dict[str, Any]:
    """Heads per chosen pattern and the chosen patterns' mean recall and density."""
    chosen = [n for names in result.patterns if names is not None for n in names]
    return {"searched_layers": layers,
            "heads": {p: chosen.count(p) for p in PATTERNS},
            "mean_recall": round(float(np.nanmean(result.chosen(result.recall))), 6),
            "mean_density": round(float(np.nanmean(result.chosen(result.density))), 6)}


def layer_tables(result: ps.SearchResult) -> list[dict[str, Any]]:
    """Per layer: the chosen pattern of each head, and each pattern's recall and density per
    head (a layer that does not run the method: patterns None, no tables)."""
    out = []
    for layer, names in enumerate(result.patterns):
        entry: dict[str, Any] = {"layer": layer, "patterns": None if names is None else
                                 list(names)}
        if names is not None:
            for key, table in (("recall", result.recall), ("density", result.density)):
                entry[key] = {p: np.round(table[layer, i], 6).tolist()
                              for i, p in enumerate(PATTERNS)}
                entry[f"chosen_{key}"] = np.round(result.chosen(table)[layer], 6).tolist()
        out.append(entry)
    return out
