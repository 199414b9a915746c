"""`prune_model`: post-training pruning of a model's params, block by block.

    result = prune_model(model_config, params, moe_state, calibration, PruneConfig(),
                         mesh=mesh, valid=padded_params(model_config), loss_fn=loss)

1. checks everything (methods, structures against every kernel's shape, gradients, expert
   counts) before any work;
2. for gradient-informed scores, sums the squared per-sequence gradients of the training loss
   on the dense model; for OWL, scores every block on the dense model for its outlier ratio;
3. embeds the calibration sequences and runs the blocks in order. For block l it accumulates
   the input statistics of every prunable kernel over the calibration batches (a jitted
   program whose batch axis is sharded over the data-parallel devices: the statistics are
   all-reduced), reduces its MoE experts if asked, prunes each kernel (each expert on its
   own routed tokens) with the configured pruner, solving a kernel's rows split over all
   devices, refines masks with DSnoT if asked, and passes on the pruned block's outputs
   ('sequential') or the dense block's ('parallel') as block l + 1's inputs;
4. prunes the LM head on the final hidden states if it is included.

Peak memory: the calibration hidden states (samples x seq x embed), one block's
activations for one calibration batch, and one block's input statistics.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from sparsejax.models.transformer import ModelConfig
from sparsejax.parallel.rules import LOGICAL_RULES, replicated
from sparsejax.sparsity.posttrain import capture, experts as experts_lib
from sparsejax.sparsity.posttrain import stats as stats_lib
from sparsejax.sparsity.posttrain.allocation import ALLOCATIONS, outlier_ratio
from sparsejax.sparsity.posttrain.config import PruneConfig
from sparsejax.sparsity.posttrain.kernel import expert_calibration, layer_record, prune_kernel
from sparsejax.sparsity.posttrain.plan import Plan, build_plan, get_path, set_path
from sparsejax.sparsity.posttrain.solvers import PRUNERS
from sparsejax.sparsity.posttrain.super_experts import SuperExperts

log = logging.getLogger(__name__)
PyTree = Any


@dataclasses.dataclass
class CalibrationSet:
    """Calibration sequences, [N, seq] numpy arrays as the data pipeline makes them."""

    inputs: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    seed: int = 0
    split: str = "train"

    @property
    def num_samples(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def token_weights(self) -> np.ndarray:
        """1 for real tokens, 0 for padding."""
        return (self.segment_ids != 0).astype(np.float32)

    def rows(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in ("inputs", "targets", "loss_mask", "positions",
                                              "segment_ids")}


@dataclasses.dataclass
class PruneResult:
    params: PyTree       # pruned params (exact zeros), experts reduced
    masks: PyTree        # keep masks mirroring params (None where never pruned)
    include: tuple       # the regexes that chose the masked params (paths.prunable_tree)
    exclude: tuple
    moe_state: PyTree | None
    num_experts: int | None  # experts per MoE layer after reduction (None: unchanged)
    report: dict[str, Any]


class CalibrationBatches:
    """The calibration set in batches, sharded over the data-parallel axes of `mesh`;
    the last batch padded with weight-0 copies of the first rows."""

    def __init__(self, calib: CalibrationSet, batch: int, mesh: jax.sharding.Mesh):
        n = calib.num_samples
        idx = np.concatenate([np.arange(n), np.arange((-n) % batch) % n])
        w = calib.token_weights.copy()
        w = np.concatenate([w, np.zeros(((-n) % batch,) + w.shape[1:], w.dtype)])
        self.mesh = mesh
        axes = ("data", "fsdp", "expert")
        self.spec2 = NamedSharding(mesh, P(axes, None))
        self.spec3 = NamedSharding(mesh, P(axes, None, None))
        put = lambda a: jax.device_put(a, self.spec2)
        self.items = [dict(positions=put(calib.positions[idx[i:i + batch]]),
                           segment_ids=put(calib.segment_ids[idx[i:i + batch]]),
                           weights=put(w[i:i + batch]),
                           tokens=put(calib.inputs[idx[i:i + batch]]))
                      for i in range(0, len(idx), batch)]


class _BlockProgram:
    """Jitted (block params, moe state, x, positions, segment ids, weights) ->
    (output, {input group: InputStats}, {MoE path: MoE stats}) for one kind of block; records
    which group each prunable kernel reads (`groups`) when it is traced. Blocks of the same
    kinds share one program (`program`), so each compiles once."""

    def __init__(self, cfg: ModelConfig, layer: int, keep: frozenset, num_experts: int | None,
                 batches: CalibrationBatches, with_stats: bool, expert_outputs: bool = False):
        self.cfg, self.layer, self.keep, self.num_experts = cfg, layer, keep, num_experts
        self.expert_outputs = expert_outputs
        self.groups: dict[str, str] = {}
        self.moe_modules: dict[str, nn.Module] = {}
        rep = replicated(batches.mesh)
        self.fn = jax.jit(self._run if with_stats else self._apply,
                          out_shardings=(batches.spec3, rep, rep) if with_stats else
                          batches.spec3)

    def _apply(self, bp, ms, x, pos, seg, w):
        return capture.apply_block(self.cfg, self.layer, bp, x, pos, seg, ms, self.num_experts)

    def _run(self, bp, ms, x, pos, seg, w):
        y, rec = capture.capture_block(self.cfg, self.layer, bp, x, pos, seg, ms,
                                       self.num_experts)
        wf = w.reshape(-1)
        groups, of = stats_lib.group_inputs(rec.inputs, self.keep)
        self.groups.update(of)
        dense = {g: stats_lib.input_stats(x_, wf) for g, x_ in groups.items()}
        moe = {}
        for path, (mod, xm) in rec.moe.items():
            if self.num_experts is not None:
                mod = mod.clone(num_experts=self.num_experts)
            self.moe_modules[path] = mod
            st = None if not ms else get_path(ms, path)
            moe[path] = stats_lib.moe_stats(mod, get_path(bp, path), st, xm, wf, path,
                                            self.keep, outputs=self.expert_outputs)
        return y, dense, moe


def program(cache: dict, cfg: ModelConfig, layer: int, keep, num_experts: int | None,
            batches: CalibrationBatches, with_stats: bool = True, expert_outputs: bool = False
            ) -> _BlockProgram:
    """The program of block `layer`'s kind, from `cache` (one per prune_model call, since
    programs read gin-configured MoE settings when they are traced); `expert_outputs`: MoE
    statistics include the experts' outputs (stats.expert_outputs)."""
    key = (cfg.block_kind(layer), frozenset(keep), num_experts, with_stats, expert_outputs)
    if key not in cache:
        cache[key] = _BlockProgram(cfg, layer, frozenset(keep), num_experts, batches,
                                   with_stats, expert_outputs)
    return cache[key]


def _accumulate(program: _BlockProgram, bp, ms, xs, batches: CalibrationBatches):
    """Runs the program over every calibration batch: (outputs per batch, summed stats)."""
    ys, total = [], None
    for x, b in zip(xs, batches.items):
        y, dense, moe = program.fn(bp, ms, x, b["positions"], b["segment_ids"], b["weights"])
        ys.append(y)
        total = (dense, moe) if total is None else stats_lib.add_stats(total, (dense, moe))
    return ys, total


@jax.jit
def _sq_sums(y, r, w):
    w = w[..., None]
    return jnp.sum(w * (y - r) ** 2), jnp.sum(w * r ** 2)


def _output_error(ys, refs, batches: CalibrationBatches) -> float:
    """Σ‖y - r‖² / Σ‖r‖² over the calibration tokens (block outputs, pruned vs dense)."""
    num = den = 0.0
    for y, r, b in zip(ys, refs, batches.items):
        a, c = _sq_sums(y, r, b["weights"])
        num, den = num + float(a), den + float(c)
    return num / max(den, 1e-30)


def _calibration_of(kernel_path: str, program: _BlockProgram, dense, moe, grads, n: int,
                    block_prefix: str) -> stats_lib.LayerCalibration:
    rel = kernel_path[len(block_prefix):]
    grad = None if grads is None else grads.get(kernel_path)
    if "/experts/" in f"/{rel}" or "/shared_experts/" in f"/{rel}":
        moe_path = next(p for p in moe if rel.startswith(p + "/"))
        s = moe[moe_path][stats_lib.moe_group(rel)]
    else:
        s = dense[program.groups[rel]]
    return stats_lib.LayerCalibration(s, grad, n)


def _outlier_pass(plan: Plan, params, moe_state, xs, batches) -> dict[int, float]:
    """OWL: each block's outlier ratio on the dense model (dense activations)."""
    scorer = PRUNERS.get(ALLOCATIONS.get(plan.config.allocation)().score)()
    ratios = {}
    for layer in plan.blocks:
        name = capture.layer_name(layer)
        bp, ms = params[name], (moe_state or {}).get(name)
        prog = program(plan.programs, plan.cfg, layer, plan.block_keep(layer), None, batches)
        xs, (dense, moe) = _accumulate(prog, bp, ms, xs, batches)
        scores = []
        for path in plan.block_paths(layer):
            calib = _calibration_of(path, prog, dense, moe, plan.grads, plan.n, name + "/")
            k = plan.kernel(params, path)
            scores += [scorer.scores(k[e], expert_calibration(calib, e)) for e in range(k.shape[0])] \
                if k.ndim == 3 else [scorer.scores(k, calib)]
        ratios[layer] = outlier_ratio(scores, ALLOCATIONS.get(plan.config.allocation)()
                                      .outlier_multiple)
    return ratios


def prune_model(cfg: ModelConfig, params: PyTree, moe_state: PyTree | None,
                calib: CalibrationSet, pc: PruneConfig, *, mesh: jax.sharding.Mesh,
                valid: dict | None = None, loss_fn: Callable | None = None,
                batch_size: int | None = None, plan: Plan | None = None) -> PruneResult:
    """Prunes `params` (see the module docstring); `loss_fn(params, rows) -> loss` is the
    training loss (gradient-informed methods need it). `plan`: from `build_plan` with the
    same arguments, when the caller checked it before (e.g. with other settings)."""
    t_start = time.perf_counter()
    if plan is None:
        plan = build_plan(cfg, params, moe_state, pc, valid=valid, loss_fn=loss_fn,
                          num_samples=calib.num_samples, batch_size=batch_size, mesh=mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        return _run(plan, params, moe_state, calib, mesh, t_start)


def _run(plan: Plan, params, moe_state, calib, mesh, t_start) -> PruneResult:
    pc, cfg = plan.config, plan.cfg
    params = jax.tree.map(lambda x: x, params)  # a shallow copy we may update
    moe_state = None if moe_state is None else jax.tree.map(lambda x: x, moe_state)
    if plan.pruner is not None and plan.pruner.needs_grads:
        t0 = time.perf_counter()
        plan.set_grads(plan.loss_fn, params, calib.rows())
        log.info("calibration gradients of %d sequences: %.1f s", calib.num_samples,
                 time.perf_counter() - t0)
    batches = CalibrationBatches(calib, plan.batch_size, mesh)
    embed = jax.jit(lambda p, t: capture.embed(cfg, p, t), out_shardings=batches.spec3)
    xs0 = [embed(params, b["tokens"]) for b in batches.items]
    ratios = None
    if ALLOCATIONS.get(pc.allocation).needs_outliers:
        ratios = _outlier_pass(plan, params, moe_state, xs0, batches)
    plan.allocate(ratios)
    if plan.structure_is_global:
        plan.set_global_masks(params)
    report_layers, report_blocks, report_experts = [], [], []
    xs = xs0
    new_masks: dict[str, jax.Array] = {}
    for layer in range(cfg.num_layers):
        t0 = time.perf_counter()
        name = capture.layer_name(layer)
        bp, ms = params[name], (moe_state or {}).get(name)
        keep_paths = plan.block_keep(layer)
        prog = program(plan.programs, cfg, layer, keep_paths, None, batches,
                       expert_outputs=plan.expert_outputs)
        ys, (dense, moe) = _accumulate(prog, bp, ms, xs, batches)
        block_k = None
        if plan.reducer is not None and moe:
            bp, ms, info = _reduce_experts(plan, layer, bp, ms, moe, prog, xs, batches)
            report_experts.extend(info)
            block_k = pc.num_experts
            params[name] = bp
            if moe_state is not None and ms is not None:
                moe_state[name] = ms
            if plan.block_paths(layer):
                prog = program(plan.programs, cfg, layer, keep_paths, block_k, batches)
                _, (dense, moe) = _accumulate(prog, bp, ms, xs, batches)
        for path in plan.block_paths(layer):
            calib_l = _calibration_of(path, prog, dense, moe, plan.grads, plan.n, name + "/")
            kernel = plan.kernel(params, path)
            density = plan.densities[path]
            w, keep, info = prune_kernel(plan, path, kernel, calib_l, density,
                                         plan.valid_of(path))
            params = plan.set_kernel(params, path, w)
            new_masks[path] = keep
            report_layers.append(layer_record(plan, path, kernel, w, keep, calib_l, info))
        bp = params[name]
        out_prog = program(plan.programs, cfg, layer, (), block_k, batches, with_stats=False)
        pruned_out = [out_prog.fn(bp, ms, x, b["positions"], b["segment_ids"], b["weights"])
                      for x, b in zip(xs, batches.items)]
        report_blocks.append(dict(layer=layer, density=plan.block_density.get(layer),
                                  outlier_ratio=None if ratios is None else ratios[layer],
                                  output_error_rel=_output_error(pruned_out, ys, batches),
                                  seconds=time.perf_counter() - t0))
        log.info("block %d/%d pruned: output relative error %.4g, %.1f s", layer + 1,
                 cfg.num_layers, report_blocks[-1]["output_error_rel"],
                 report_blocks[-1]["seconds"])
        xs = pruned_out if pc.calibration == "sequential" else ys
    for path in plan.head_paths():
        head = jax.jit(lambda p, x, w: stats_lib.input_stats(
            capture.capture_head(cfg, p, x)[1][path], w.reshape(-1)))
        tot = None
        for x, b in zip(xs, batches.items):
            s = head(params, x, b["weights"])
            tot = s if tot is None else tot + s
        calib_h = stats_lib.LayerCalibration(
            tot, None if plan.grads is None else plan.grads.get(path), plan.n)
        kernel = plan.kernel(params, path)
        w, keep, info = prune_kernel(plan, path, kernel, calib_h, plan.densities[path],
                                     plan.valid_of(path))
        params = plan.set_kernel(params, path, w)
        new_masks[path] = keep
        report_layers.append(layer_record(plan, path, kernel, w, keep, calib_h, info))
    masks = plan.masks_tree(params, new_masks)
    kept = sum(int(np.asarray(m).sum()) for m in new_masks.values())
    total = sum(m.size if plan.valid_of(p) is None else int(np.asarray(plan.valid_of(p)).sum())
                for p, m in new_masks.items())
    report = {"settings": pc.settings(), "solver_settings": plan.solver_settings(),
              "calibration": {"samples": calib.num_samples, "seq_len": int(calib.inputs.shape[1]),
                              "tokens": int(calib.token_weights.sum()), "seed": calib.seed,
                              "split": calib.split, "mode": pc.calibration,
                              "batch_size": plan.batch_size},
              "density": kept / max(total, 1), "pruned_params": total - kept,
              "prunable_params": total, "layers": report_layers, "blocks": report_blocks,
              "experts": report_experts, "seconds": time.perf_counter() - t_start}
    return PruneResult(params, masks if new_masks else None, plan.include, plan.exclude,
                       moe_state, pc.num_experts if plan.reducer is not None else None, report)


def _reduce_experts(plan: Plan, layer: int, bp, ms, moe, prog: _BlockProgram, xs, batches):
    """Expert pruning / merging of block `layer`'s MoE layers (see experts.py)."""
    pc = plan.config
    infos = []
    for path, st in moe.items():
        mod = prog.moe_modules[path]
        moe_params = get_path(bp, path)
        moe_st = None if ms is None else get_path(ms, path)
        error = None
        if plan.reducer.needs_outputs:
            error = _reconstruction_error_fn(mod, moe_params, moe_st, prog, bp, ms, path, xs,
                                             batches)
        stats = experts_lib.ExpertStats.from_stats(st)
        protected, supers = [], None
        if pc.protect_super_experts:
            supers = SuperExperts().describe(stats.output_max, stats.counts)
            protected = supers["candidates"]
        dropped = pc.dropped_experts().get(layer, [])
        rplan = experts_lib.constrained_plan(plan.reducer, stats, pc.num_experts, protected,
                                             dropped, error)
        new_params, new_state = experts_lib.apply_plan(moe_params, moe_st, rplan)
        bp = set_path(bp, path, new_params)
        if ms is not None and new_state is not None:
            ms = set_path(ms, path, new_state)
        info = {"layer": layer, "module": path, "routed_tokens": stats.counts.tolist(),
                **rplan.describe(), "protected": protected, "dropped": dropped}
        if supers is not None:
            info["super_experts"] = supers
        if plan.reducer.needs_expert_outputs:
            info["reap_saliency"] = experts_lib.reap_saliency(stats).tolist()
        infos.append(info)
    return bp, ms, infos


def _reconstruction_error_fn(mod, moe_params, moe_st, prog, bp, ms, path, xs, batches):
    """error(kept experts) = Σ over calibration tokens of ‖y_all - y_kept‖² of the MoE
    layer (its inputs recomputed from the block's inputs)."""
    cfg, layer = prog.cfg, prog.layer

    def moe_inputs(bp_, ms_, x, pos, seg):
        _, rec = capture.capture_block(cfg, layer, bp_, x, pos, seg, ms_)
        return rec.moe[path][1]

    get_inputs = jax.jit(moe_inputs)
    inputs = [get_inputs(bp, ms, x, b["positions"], b["segment_ids"])
              for x, b in zip(xs, batches.items)]
    variables = lambda p, s: {"params": p, **({"moe_state": s} if s else {})}
    runners: dict[int, Callable] = {}

    def runner(k: int) -> Callable:
        if k not in runners:
            m = mod.clone(num_experts=k)
            runners[k] = jax.jit(lambda p, s, x: m.apply(variables(p, s), x, deterministic=True))
        return runners[k]

    n_all = moe_params["router_kernel"].shape[-1]
    full = [runner(n_all)(moe_params, moe_st, x) for x in inputs]

    def error(kept) -> float:
        p, s = experts_lib.apply_plan(moe_params, moe_st, experts_lib.keep_plan(kept))
        tot = 0.0
        for x, y, b in zip(inputs, full, batches.items):
            d = runner(len(kept))(p, s, x) - y
            tot += float(jnp.sum(b["weights"].reshape(-1, 1) * d.reshape(-1, d.shape[-1]) ** 2))
        return tot

    return error
