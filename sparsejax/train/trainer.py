"""The training loop: owns data, eval, checkpoints, metrics, the progress bar and preemption.
The step itself is the pure function from step.py, jitted here with explicit shardings."""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from typing import Any

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from sparsejax import config as config_lib
from sparsejax.analysis.plots import write_run_plots
from sparsejax.config import check_field_types
from sparsejax.data.sharded import (ShardedIteratorRestore, ShardedIteratorSave,
                                    ShardedTrainIterator)
from sparsejax.models.transformer import ModelConfig
from sparsejax.parallel.rules import LOGICAL_RULES, batch_sharding, replicated
from sparsejax.sparsity.activation.evaluate import ActivationEval
from sparsejax.train import evaluation, run_info
from sparsejax.train import workdir as workdir_lib
from sparsejax.train.build import build_run
from sparsejax.train.checkpoint import Checkpointer
from sparsejax.train.flops import FlopsMeter
from sparsejax.train.metrics import IntervalLoss, MetricsWriter, truncate_metrics
from sparsejax.train.profiling import StepProfiler, resolve_profile_steps
from sparsejax.train.step import make_train_step
from sparsejax.train.text_eval import TextEval
from sparsejax.train.warm_start import init_from_pretrained, warm_start
from sparsejax.train.workdir import has_pretrained

log = logging.getLogger(__name__)

NAN_POLICIES = ("skip", "stop")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Run-level settings (model shape lives in ModelConfig, the optimizer in make_optimizer)."""

    num_steps: int = 200
    global_batch_size: int = 16
    microbatches: int = 1  # gradient accumulation: the global batch in this many micro-batches
    seq_len: int = 128
    seed: int = 0
    dataset: str = "stdlib"
    data_dir: str | None = None
    data_shards: int | None = None  # document shards (None: one per process); see data/sharded.py
    log_every: int = 10
    eval_every: int = 100
    eval_tokens: int = 131072  # size of the fixed validation sample (train/evaluation.py); 0: no eval
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    nan_policy: str = "skip"  # "skip": drop the update; "stop": save the last good state and stop
    max_skipped_steps: int = 20  # nan_policy='skip': this many bad steps in a row stop the run
    progress_bar: bool = True
    profile_steps: tuple | None = None  # (start, stop): a profiler trace of those steps (profiling.py)

    def __post_init__(self):
        check_field_types(self)
        for name in ("num_steps", "global_batch_size", "seq_len", "log_every", "eval_every",
                     "checkpoint_every", "keep_checkpoints", "max_skipped_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be >= 1")
        if self.eval_tokens < 0:
            raise ValueError(f"TrainConfig.eval_tokens={self.eval_tokens!r} must be an int >= 0 "
                             "(0 turns eval off)")
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(f"TrainConfig.nan_policy={self.nan_policy!r}; valid: {NAN_POLICIES}")
        resolve_profile_steps(self.profile_steps, self.num_steps)


class NonFiniteLossError(RuntimeError):
    """Raised after the last good state has been saved, under nan_policy='stop' at the first
    non-finite step, under 'skip' after `max_skipped_steps` of them in a row."""


class _Preemption:
    """Turns SIGTERM into a flag the loop checks between steps."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not in the main thread (e.g. a notebook worker thread)
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def preemption_agreed(local_request: bool, ckpt: Checkpointer, step: int) -> bool:
    """True on every process at the same step once any process got SIGTERM (or the TPU
    runtime announced a preemption), so that all of them save the same step."""
    if jax.process_count() == 1:
        return local_request
    flags = multihost_utils.process_allgather(np.array(int(local_request), np.int32))
    return bool(np.any(flags)) or ckpt.manager.reached_preemption(step)


def global_batch(local: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    """Assembles per-process numpy batches into global arrays sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def check_resume_config(saved: dict | None, step: int, allow_change: bool) -> list[str]:
    """Compares the bindings a checkpoint was trained with to this run's; refuses a change
    (with the diff) unless `allow_change`. Returns the changed lines."""
    if not saved or "bindings" not in saved:
        return []
    changes = config_lib.config_changes(saved["bindings"], config_lib.operative_bindings())
    if changes and not allow_change:
        raise ValueError(
            f"the workdir's checkpoint (step {step}) was trained with another config; changed "
            f"bindings: {'; '.join(changes)}. Use a new --workdir, rerun with the same config "
            f"(or with no --gin_file: the workdir's config.gin is used), or pass "
            f"--allow_config_change to continue with the new values")
    for line in changes:
        log.warning("config changed on resume at step %d: %s", step, line)
    return changes


@gin.configurable(denylist=["workdir", "config_str", "allow_config_change",
                            "allow_unused_bindings"])
def train(workdir: str, config: TrainConfig | None = None, config_str: str = "",
          allow_config_change: bool = False, allow_unused_bindings: bool = False
          ) -> dict[str, Any]:
    """Trains (or resumes) the run in `workdir`. Returns the last logged metrics plus
    `status` ('done', 'preempted').

    Before the first step it checks that every given binding took effect (unless
    `allow_unused_bindings`), that a resumed run has the config its checkpoint was trained
    with (unless `allow_config_change`), and writes the operative config to config.gin."""
    del config_str  # the operative config is written instead (kept for API compatibility)
    cfg = config or TrainConfig()
    workdir_lib.prepare(workdir)
    run = build_run(cfg)  # validates everything before compiling
    mesh, model, tx, method = run.mesh, run.model, run.tx, run.sparsity_method
    is_main = jax.process_index() == 0

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=cfg.keep_checkpoints,
                        async_save=cfg.async_checkpoints)
    ckpt.check_compatible(run.abstract_state, method.resizes)
    data_it = ShardedTrainIterator(global_batch_size=cfg.global_batch_size, seq_len=cfg.seq_len,
                                   seed=cfg.seed, dataset=cfg.dataset, data_dir=cfg.data_dir,
                                   num_shards=cfg.data_shards)
    eval_set = evaluation.eval_set_for(cfg)
    bsharding = batch_sharding(mesh)

    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        restored = ckpt.restore_latest(run.abstract_state,
                                       lambda: ShardedIteratorRestore(data_it), method.resizes)
        if restored is None:
            state = warm_start(init_from_pretrained(run, workdir), run.state_shardings.params,
                               resumed=False)
            start, changes = 0, []
        else:
            start, state, saved = restored
            state = warm_start(state, run.state_shardings.params, resumed=True)
            changes = check_resume_config(saved, start, allow_config_change)
            log.info("resumed from step %d", start)
        config_lib.check_unused_bindings(allow=allow_unused_bindings)
        bindings = config_lib.operative_bindings()
        if is_main:
            if restored is None:
                workdir_lib.move_aside_previous_run(workdir)
            else:
                truncate_metrics(os.path.join(workdir, workdir_lib.METRICS_FILE), start)
            workdir_lib.write_config(workdir, config_lib.operative_config_text())
        writer = MetricsWriter(workdir, enabled=is_main)
        flops = FlopsMeter(run, cfg.seq_len)
        profiler = StepProfiler(cfg.profile_steps, cfg.num_steps, workdir)
        if restored is None:
            if is_main:
                writer.write(0, {**run_info.start_record(cfg, data_it, eval_set),
                                 **flops.start_record()})
            writer.write(0, jax.device_get(run.layer_density_fn()(state)))  # plots start at 0
        else:
            corpus = run_info.resume_record(cfg, workdir) if is_main else None
            if corpus:
                writer.write(start, corpus)
        if changes:
            writer.write(start, {"config_changes": changes})
        step_fn = jax.jit(make_train_step(model, tx, method, run.lr_schedule,
                                          microbatches=cfg.microbatches,
                                          act_regularizer=run.act_regularizer),
                          in_shardings=(run.state_shardings, bsharding),
                          out_shardings=(run.state_shardings, replicated(mesh)),
                          donate_argnums=(0,))
        eval_fn = evaluation.make_eval_fn(model, method, run.state_shardings, mesh, bsharding)
        update_fn = run.sparsity_update_fn()
        # One compiled program (not a stream of eager ops) so every process runs the same
        # collectives in the same order.
        sparsity_metrics_fn = jax.jit(
            lambda s: method.metrics(s.params, s.sparsity),
            in_shardings=(run.state_shardings,), out_shardings=replicated(mesh))

        def save(step, force=False):
            ckpt.save(step, state, ShardedIteratorSave(data_it),
                      {"step": step, "bindings": bindings}, force=force)

        def stop_nonfinite(step, done, reason):
            profiler.close()
            save(done, force=True)  # the guard kept the last good state
            ckpt.close()
            raise NonFiniteLossError(
                f"non-finite loss or gradient at step {step} ({reason}); the last good state is "
                f"saved in {workdir}. Lower learning_rate_schedule.peak_lr or check the data")

        status, last = "done", {}
        tokens_per_step = cfg.global_batch_size * cfg.seq_len
        bar = tqdm(total=cfg.num_steps, initial=start, disable=not (is_main and cfg.progress_bar),
                   dynamic_ncols=True, desc="train")
        t0, steps_since, skipped = time.perf_counter(), 0, 0
        interval = IntervalLoss()
        with _Preemption() as preempt:
            for step in range(start, cfg.num_steps):
                batch = global_batch(next(data_it), bsharding)
                if method.is_update_step(step):
                    shapes = jax.tree.map(np.shape, state.params) if method.resizes else None
                    state, mask_metrics = update_fn(state, batch)
                    writer.write(step, mask_metrics)
                    if method.resizes and jax.tree.map(np.shape, state.params) != shapes:
                        log.info("step %d: the sparsity update changed the param shapes "
                                 "(stored fraction %.4f); the train step compiles again", step,
                                 float(mask_metrics.get("sparsity/density", float("nan"))))
                with profiler.step(step):
                    state, metrics = step_fn(state, batch)
                profiler.after(step, metrics)
                interval.add(metrics)
                steps_since += 1
                done = step + 1
                skipped = skipped + 1 if int(metrics["nonfinite"]) else 0
                if skipped and cfg.nan_policy == "stop":
                    stop_nonfinite(step, done, "nan_policy='stop'")
                if skipped >= cfg.max_skipped_steps:
                    stop_nonfinite(step, done, f"{skipped} steps in a row skipped, "
                                               f"TrainConfig.max_skipped_steps="
                                               f"{cfg.max_skipped_steps}")
                if done % cfg.log_every == 0 or done == cfg.num_steps:
                    metrics = {**jax.device_get(metrics), **interval.pop()}
                    elapsed = time.perf_counter() - t0
                    metrics["tokens_per_s"] = tokens_per_step * steps_since / max(elapsed, 1e-9)
                    metrics.update(jax.device_get(sparsity_metrics_fn(state)))
                    metrics.update(flops.metrics(state, metrics["tokens_per_s"]))
                    last = writer.write(done, metrics)
                    bar.set_postfix(loss="n/a" if last["loss"] is None else f"{last['loss']:.3f}",
                                    tok_s=f"{metrics['tokens_per_s']:.0f}")
                    t0, steps_since = time.perf_counter(), 0
                if eval_set and (done % cfg.eval_every == 0 or done == cfg.num_steps):
                    t_eval = time.perf_counter()
                    ev = evaluation.evaluate(eval_fn, state, eval_set, bsharding)
                    ev["eval_seconds"] = time.perf_counter() - t_eval
                    last.update(writer.write(done, ev))
                    t0, steps_since = time.perf_counter(), 0
                if done % cfg.checkpoint_every == 0 or done == cfg.num_steps:
                    save(done)
                bar.update(1)
                if preemption_agreed(preempt.requested, ckpt, done):
                    if done % cfg.checkpoint_every and done != cfg.num_steps:
                        save(done, force=True)
                    status = "preempted"
                    log.warning("SIGTERM: saved a checkpoint at step %d; exiting", done)
                    break
        profiler.close()
        bar.close()
        ckpt.close()
        writer.close()
    if is_main and status == "done":
        write_run_plots(workdir)
    last["status"] = status
    return last


def unused_bindings_of_config() -> dict[str, str]:
    """Builds what `train` builds before its first step from the parsed gin config (no
    restore, no compile) and returns {binding: source} of the given bindings that take no
    effect. For sweeps, whose shared bindings may concern only some trials."""
    cfg = TrainConfig()
    build_run(cfg)
    ShardedTrainIterator(global_batch_size=cfg.global_batch_size, seq_len=cfg.seq_len,
                         seed=cfg.seed, dataset=cfg.dataset, data_dir=cfg.data_dir,
                         num_shards=cfg.data_shards)
    warm_start(None, None, resumed=True)
    return config_lib.unused_bindings()


def load_state_for_eval(workdir: str, cfg: TrainConfig):
    """Restores the latest checkpoint of `workdir` (for `sparsejax eval`)."""
    run = build_run(cfg)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    resizes = run.sparsity_method.resizes
    ckpt.check_compatible(run.abstract_state, resizes)
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(LOGICAL_RULES):
        restored = ckpt.restore_latest(run.abstract_state, lambda: None, resizes)
        if restored is None and has_pretrained(workdir):  # an import-hf workdir, not trained
            restored = (0, init_from_pretrained(run, workdir), None)
    ckpt.close()
    if restored is None:
        raise ValueError(f"workdir={workdir!r} holds no checkpoint to evaluate")
    step, state, _ = restored
    return run, step, state


@gin.configurable(denylist=["workdir", "text"])
def evaluate_checkpoint(workdir: str, config: TrainConfig | None = None,
                        eval_tokens: int | None = None,
                        text: TextEval | None = None) -> dict[str, Any]:
    """Loss (with its standard error) and perplexity of the latest checkpoint on the eval sample
    that training uses (`eval_tokens=None`: TrainConfig.eval_tokens), or on one of
    `eval_tokens` tokens, or on a text under a papers' protocol (`text`, train/text_eval.py);
    logs the sample's size."""
    cfg = config or TrainConfig()
    n = cfg.eval_tokens if eval_tokens is None else eval_tokens
    if text is None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"evaluate_checkpoint.eval_tokens={n!r} (or TrainConfig.eval_tokens) must "
                         "be an int >= 1")
    # thresholding / PPL-p% settings, checked against the model before anything is built
    act_eval = ActivationEval(ModelConfig())
    if text is not None:  # read and tokenized before the run is built: bad input fails fast
        eval_set, info = text.eval_set(workdir, cfg.global_batch_size)
    run, step, state = load_state_for_eval(workdir, cfg)
    if text is None:
        eval_set, info = evaluation.eval_set_for(cfg, n), {}
    config_lib.check_unused_bindings()
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(LOGICAL_RULES):
        bsharding = batch_sharding(run.mesh)
        eval_fn = evaluation.make_eval_fn(run.model, run.sparsity_method, run.state_shardings,
                                          run.mesh, bsharding)
        out = evaluation.evaluate(eval_fn, state, eval_set, bsharding)
        if act_eval.active:
            out = act_eval.evaluate(run, state, cfg, eval_set, out)
    log.info("eval of step %d: loss %.4f ± %.4f (standard error over rows) on %s", step,
             out["eval_loss"], out["eval_loss_stderr"] or float("nan"), eval_set.describe())
    out["step"] = step
    out.update(info)
    return out
