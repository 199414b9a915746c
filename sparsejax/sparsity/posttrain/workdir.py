"""`sparsejax prune`: a workdir (trained here, or imported with import-hf) -> a pruned workdir.

    sparsejax prune --workdir=SRC --out=DST --method=sparsegpt --sparsity=0.5

DST is a normal workdir:

* `checkpoints/0`: a TrainState whose params hold the pruned model (exact zeros), whose
  sparsity state holds the masks, with a fresh optimizer and the data position at the start;
* `config.gin`: the operative config of the sparse recovery fine-tune that
  `sparsejax train --workdir=DST` runs (`make_method.name = 'fixed_masks'`: masks fixed,
  pruned weights held at zero; `TrainConfig.num_steps` from `PruneConfig.finetune_steps`;
  `MoeMlp.num_experts` after expert pruning or merging), followed by the pruning settings as
  comments;
* `prune_report.json`: settings, calibration sample, per-layer density, reconstruction
  error and time, per-block output error, expert plans, eval loss and perplexity before and
  after; `metrics.jsonl` starts with the pruned model's step-0 records (eval, densities);
* the tokenizer files and hf_import.json of an imported SRC (so export-hf picks its family).

With `--compact` (PruneConfig.compact, structure 'block') DST stores the pruned projections
in the compact block-sparse format instead (ModelConfig.weight_format='block_sparse', block
sizes from BlockStructure.block, density the kept fraction; `from_dense_params` of the
masked kernels), its layout fixed in the sparsity state and no masks: the fine-tune is
`make_method.name = 'dense'` on the compact weights (configs/sparsity/block_static.gin's
behaviour).

Two gin parses: the source's config (+ the given files and bindings) to load, calibrate and
prune; then the same with the fine-tune's bindings on top to build and save DST's run.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import time
from typing import Any, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import config as config_lib
from sparsejax.data import pipeline
from sparsejax.data.sharded import ShardedIteratorSave, ShardedTrainIterator
from sparsejax.data.tokenizer import make_tokenizer
from sparsejax.interop.import_hf import RECORD, TOKENIZER_FILES
from sparsejax.models import layer_stack
from sparsejax.models.formats.convert import compact_projections, from_dense_params
from sparsejax.models.transformer import padded_params
from sparsejax.sparsity import paths as paths_lib
from sparsejax.parallel.rules import LOGICAL_RULES, batch_sharding
from sparsejax.sparsity.method import DenseMethod, new_stats_state, with_masks
from sparsejax.sparsity.posttrain.config import PruneConfig
from sparsejax.sparsity.posttrain.driver import CalibrationSet, PruneResult, prune_model
from sparsejax.sparsity.posttrain.plan import build_plan
from sparsejax.train import evaluation, run_info, trainer
from sparsejax.train import workdir as workdir_lib
from sparsejax.train.build import build_run
from sparsejax.train.checkpoint import Checkpointer
from sparsejax.train.commands import parse_workdir_config
from sparsejax.train.metrics import MetricsWriter
from sparsejax.train.state import TrainState
from sparsejax.train.step import make_loss_fn
from sparsejax.train.text_eval import read_texts
from sparsejax.train.warm_start import init_from_pretrained

log = logging.getLogger(__name__)
REPORT = "prune_report.json"
# bindings `prune` sets itself in the output workdir's config
OWN = ("make_method.name", "TrainConfig.num_steps", "MoeMlp.num_experts",
       "FixedMasksMethod.include", "FixedMasksMethod.exclude", "ModelConfig.weight_format",
       "ModelConfig.weight_format_overrides")


def check_workdirs(src: str, dst: str) -> None:
    """A source with a checkpoint or imported params; a new (or empty) output directory."""
    if not (workdir_lib.has_checkpoint(src) or workdir_lib.has_pretrained(src)):
        raise ValueError(f"--workdir={src!r} holds no checkpoint and no imported params "
                         f"(`sparsejax train` or `sparsejax import-hf` makes one)")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError(f"--out={dst!r} is the source workdir; prune into a new directory")
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise ValueError(f"--out={dst!r} exists and is not an empty directory; give a new "
                         f"directory for the pruned workdir")


def check_bindings(bindings: Sequence[str], pc_experts: bool = True) -> None:
    for b in bindings:
        key = b.partition("=")[0].strip()
        if key in OWN or key.startswith("make_method.") or key.startswith("FixedMasksMethod."):
            raise ValueError(f"--gin.{key} is set by `sparsejax prune` in the output workdir "
                             f"(its method is 'fixed_masks'; --finetune_steps sets the steps, "
                             f"--num_experts the experts, --compact the weight format); remove "
                             f"it")


def calibration_set(cfg: Any, pc: PruneConfig) -> CalibrationSet:
    """`pc.calibration_samples` rows of `pc.calibration_split` in the order a single-process
    reader with seed `pc.calibration_seed` reads them (the run's dataset and tokenizer), or
    with `pc.calibration_data`, windows of that text (`text_calibration_set`)."""
    if pc.calibration_data is not None:
        return text_calibration_set(cfg, pc)
    plan = pipeline.row_plan(pc.calibration_split, seq_len=cfg.seq_len,
                             seed=pc.calibration_seed, dataset=cfg.dataset, data_dir=cfg.data_dir)
    n, rows = pc.calibration_samples, len(plan.index)
    if n > rows:
        raise ValueError(f"PruneConfig.calibration_samples={n} exceeds the {rows} rows of "
                         f"{cfg.seq_len + 1} tokens in the {pc.calibration_split!r} split of "
                         f"dataset {cfg.dataset!r}; use at most {rows}")
    got = [plan.reader[plan.order[i]] for i in range(n)]
    batch = {k: np.stack([r[k] for r in got]) for k in got[0]}
    b = pipeline._to_training_batch(batch, slice(None), plan.reader.tokenizer.pad_id)
    return CalibrationSet(b["inputs"], b["targets"], b["loss_mask"], b["positions"],
                          b["segment_ids"], seed=pc.calibration_seed, split=pc.calibration_split)


def text_calibration_set(cfg: Any, pc: PruneConfig) -> CalibrationSet:
    """The papers' calibration set: `pc.calibration_samples` windows of seq_len + 1 tokens at
    random starts (seed `pc.calibration_seed`) in the text of `pc.calibration_data`, tokenized
    once (inputs: a window but its last token; targets: but its first)."""
    ids = make_tokenizer().encode_text(read_texts(dataset=pc.calibration_data))
    span = cfg.seq_len + 1
    if len(ids) < span:
        raise ValueError(f"--calibration_data={pc.calibration_data!r} has {len(ids)} tokens, "
                         f"fewer than one window of TrainConfig.seq_len + 1 = {span}")
    starts = np.random.default_rng(pc.calibration_seed).integers(
        0, len(ids) - span + 1, size=pc.calibration_samples)
    win = np.stack([ids[s:s + span] for s in starts]).astype(np.int32)
    n, seq = win.shape[0], cfg.seq_len
    return CalibrationSet(win[:, :-1], win[:, 1:], np.ones((n, seq), np.int32),
                          np.broadcast_to(np.arange(seq, dtype=np.int32), (n, seq)).copy(),
                          np.ones((n, seq), np.int32), seed=pc.calibration_seed,
                          split=pc.calibration_data)


def restore(run, workdir: str) -> tuple[int, Any]:
    """(step, TrainState) of the latest checkpoint of `workdir`, or of its imported params."""
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    ckpt.check_compatible(run.abstract_state, run.sparsity_method.resizes)
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(LOGICAL_RULES):
        restored = ckpt.restore_latest(run.abstract_state, lambda: None,
                                       run.sparsity_method.resizes)
        if restored is None:
            restored = (0, init_from_pretrained(run, workdir), None)
    ckpt.close()
    return restored[0], restored[1]


def eval_params(run, params, moe_state, eval_set) -> dict[str, Any] | None:
    """Eval loss / perplexity of model params on the run's fixed eval sample."""
    if eval_set is None:
        return None
    t0 = time.perf_counter()
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=None, rng=None,
                       sparsity={}, moe_state=moe_state)
    fn = jax.jit(evaluation.make_row_loss_step(run.model, DenseMethod()))
    out = evaluation.evaluate(fn, state, eval_set, batch_sharding(run.mesh))
    out["eval_seconds"] = time.perf_counter() - t0
    return out


def _loss_fn(run):
    """The trainer's loss (cross-entropy + aux losses) of dense params on a batch of rows."""
    loss = make_loss_fn(run.model, DenseMethod())

    def fn(params, rows):  # params in the unscanned layout
        params = layer_stack.to_layout(params, run.model_config)
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=None,
                           rng=None, sparsity=new_stats_state(None), moe_state=None)
        return loss(params, state, rows, jax.random.key(0))[0]

    return fn


def _tokenizer_rebinding(src: str, dst: str) -> list[str]:
    """Copies an imported model's tokenizer files and record into DST; returns the binding
    that points make_tokenizer at DST's copy (when it pointed into SRC)."""
    for name in (*TOKENIZER_FILES, RECORD):
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    try:
        path = gin.query_parameter("make_tokenizer.path")
    except ValueError:
        return []
    if isinstance(path, str) and os.path.dirname(os.path.abspath(path)) == os.path.abspath(src):
        return [f"make_tokenizer.path={os.path.join(os.path.abspath(dst), os.path.basename(path))!r}"]
    return []


def prune_workdir(src: str, dst: str, gin_files: Sequence[str] = (),
                  bindings: Sequence[str] = (), imports: Sequence[str] = ()) -> dict[str, Any]:
    """Prunes SRC into DST (module docstring); returns the report's summary."""
    t_start = time.perf_counter()
    check_workdirs(src, dst)
    check_bindings(bindings)
    # --- phase A: the source run, calibration and pruning --------------------------------
    parse_workdir_config(src, gin_files, bindings, imports)
    src_config = workdir_lib.saved_config(src)
    pc = PruneConfig()
    cfg = trainer.TrainConfig()
    run = build_run(cfg)
    if not run.model_config.formats().all_dense:
        raise ValueError(f"--workdir={src!r} stores its projections in a compact weight format "
                         f"(ModelConfig.weight_format={run.model_config.weight_format!r}); "
                         f"post-training pruning reads dense kernels: prune a dense run")
    calib = calibration_set(cfg, pc)
    eval_set = evaluation.eval_set_for(cfg, pc.eval_tokens)
    mesh = run.mesh
    # calibration runs block by block: a scanned model is pruned in the unscanned layout
    # (one subtree per block) and written back in its own
    flat_cfg = dataclasses.replace(run.model_config, scan_layers=False)
    plan = build_plan(flat_cfg, layer_stack.unstack_abstract(run.abstract_model_params),
                      layer_stack.unstack_abstract(run.abstract_state.moe_state),
                      pc, valid=padded_params(flat_cfg), loss_fn=_loss_fn(run),
                      num_samples=calib.num_samples, batch_size=cfg.global_batch_size, mesh=mesh)
    config_lib.check_unused_bindings()  # every given binding took effect, before any work
    prune_settings = _prune_bindings_text()
    step, state = restore(run, src)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        method = run.sparsity_method
        params = jax.jit(lambda s: method.finalize(s.params, s.sparsity))(state)
        moe_state = state.moe_state
        before = eval_params(run, params, moe_state, eval_set)
        params = layer_stack.unstack_layers(params)
        moe_state = layer_stack.unstack_layers(moe_state)
    result = prune_model(flat_cfg, params, moe_state, calib, pc, mesh=mesh, plan=plan)
    finetune_steps = config_lib.run_step(pc.finetune_steps, cfg.num_steps,
                                         "PruneConfig.finetune_steps", minimum=1)
    # --- phase B: the output workdir's run --------------------------------------------------
    os.makedirs(dst, exist_ok=True)
    own = [f"TrainConfig.num_steps={finetune_steps}"]
    if pc.compact:  # the layout is the structure: fixed, nothing to mask
        bh, bw = plan.structure.block
        own += ["make_method.name='dense'", "ModelConfig.weight_format='block_sparse'",
                f"BlockSparse.block_in={bh}", f"BlockSparse.block_out={bw}",
                f"BlockSparse.density={pc.density!r}"]
    elif result.masks is not None:
        own += ["make_method.name='fixed_masks'", f"FixedMasksMethod.include={result.include!r}",
                f"FixedMasksMethod.exclude={result.exclude!r}"]
    else:
        own += ["make_method.name='dense'"]
    if result.num_experts is not None:
        own.append(f"MoeMlp.num_experts={result.num_experts}")
    own += _tokenizer_rebinding(src, dst)
    config_lib.parse_gin(list(gin_files), list(bindings) + own, imports=imports,
                         workdir_config=src_config)
    cfg_b = trainer.TrainConfig()
    run_b = build_run(cfg_b)
    if pc.compact:
        result = compact_result(result, run_b.model_config)
    after, summary = _write_output(dst, run_b, cfg_b, result, eval_set_of(cfg_b, pc))
    report = {"source": os.path.abspath(src), "source_step": int(step), "out": os.path.abspath(dst),
              **result.report, "eval_before": before, "eval_after": after,
              "finetune": {"num_steps": finetune_steps, "method": cfg_method_name(result)},
              "total_seconds": time.perf_counter() - t_start}
    with open(os.path.join(dst, REPORT), "w") as f:
        json.dump(report, f, indent=1, default=_jsonable)
    with open(os.path.join(dst, workdir_lib.CONFIG_FILE), "a") as f:
        f.write("\n# ---- pruned by `sparsejax prune` from " + os.path.abspath(src) +
                f" (step {step}); these settings are a record, not bindings:\n" + prune_settings)
    return {"out": dst, "density": report["density"], "eval_loss_before": _loss(before),
            "eval_loss_after": _loss(after), "seconds": round(report["total_seconds"], 1),
            **summary}


def compact_result(result: PruneResult, model_config: Any) -> PruneResult:
    """The pruned model in `model_config`'s compact format (unscanned; the masks dropped:
    the layout holds the structure). Every projection the format stores must have been
    pruned, and nothing else."""
    flat_cfg = dataclasses.replace(model_config, scan_layers=False)
    targets = {p.target for p in compact_projections(flat_cfg).values()}
    pruned = {path for path, _ in paths_lib.named_leaves(result.masks)}
    if pruned != targets:
        raise ValueError(f"PruneConfig.compact=True (--compact): the pruned kernels are not the "
                         f"projections ModelConfig.weight_format='block_sparse' stores "
                         f"(pruned only: {sorted(pruned - targets)}; not pruned: "
                         f"{sorted(targets - pruned)})")
    params = from_dense_params(result.params, flat_cfg, masks=result.masks)
    return dataclasses.replace(result, params=params, masks=None)


def eval_set_of(cfg, pc: PruneConfig):
    return evaluation.eval_set_for(cfg, pc.eval_tokens)


def cfg_method_name(result) -> str:
    return "fixed_masks" if result.masks is not None else "dense"


def _loss(ev):
    return None if ev is None else round(ev["eval_loss"], 4)


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def _prune_bindings_text() -> str:
    """The operative pruning settings (PruneConfig and its solvers) as commented gin lines."""
    ours = ("PruneConfig.", "SparseGPTSettings.", "DSnoT.", "OWL.", "GBLM.", "SuperExperts.")
    lines = [f"# {k} = {v}" for k, v in sorted(config_lib.operative_bindings().items())
             if k.startswith(ours)]
    return "\n".join(lines) + "\n"


def _write_output(dst: str, run_b, cfg_b, result, eval_set) -> tuple[dict | None, dict]:
    """DST's checkpoint (step 0), config.gin and first metrics; returns (eval after, summary)."""
    shardings = jax.tree.map(lambda a: a.sharding, run_b.abstract_model_params)
    with jax.set_mesh(run_b.mesh), nn.logical_axis_rules(LOGICAL_RULES):
        layout = functools.partial(layer_stack.to_layout, cfg=run_b.model_config)
        params = jax.device_put(layout(result.params), shardings)
        state = run_b.init_state(params)
        method = run_b.sparsity_method
        if result.masks is not None:
            have = jax.tree.structure(state.sparsity["masks"])
            if have != jax.tree.structure(layout(result.masks)):
                raise RuntimeError(f"the pruned masks ({jax.tree.structure(result.masks)}) do "
                                   f"not match the fine-tune method's ({have})")
            masks = jax.device_put(layout(result.masks), jax.tree.map(
                lambda a: a.sharding, state.sparsity["masks"]))
            state = state.replace(sparsity=with_masks(state.sparsity, masks, method.valid))
        if result.moe_state is not None:
            state = state.replace(moe_state=jax.device_put(
                layout(result.moe_state), jax.tree.map(lambda a: a.sharding, state.moe_state)))
        # the params the model computes with (a compact format's layout merged in)
        model_params = jax.jit(lambda s: method.finalize(s.params, s.sparsity))(state)
        after = eval_params(run_b, model_params, state.moe_state, eval_set)
        densities = jax.device_get(run_b.layer_density_fn()(state))
    data_it = ShardedTrainIterator(global_batch_size=cfg_b.global_batch_size,
                                   seq_len=cfg_b.seq_len, seed=cfg_b.seed, dataset=cfg_b.dataset,
                                   data_dir=cfg_b.data_dir, num_shards=cfg_b.data_shards)
    bindings = config_lib.operative_bindings()
    ckpt = Checkpointer(os.path.join(dst, "checkpoints"), max_to_keep=cfg_b.keep_checkpoints,
                        async_save=False)
    ckpt.save(0, state, ShardedIteratorSave(data_it), {"step": 0, "bindings": bindings},
              force=True)
    ckpt.close()
    workdir_lib.write_config(dst, config_lib.operative_config_text())
    writer = MetricsWriter(dst, tensorboard=False)
    writer.write(0, run_info.start_record(cfg_b, data_it, eval_set))
    writer.write(0, densities)
    if after is not None:
        writer.write(0, after)
    writer.close()
    return after, {"sparsity/density": float(densities["sparsity/density"])}
