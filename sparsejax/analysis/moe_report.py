"""`sparsejax moe-report --workdir=W`: how a MoE model routes calibration text, per MoE layer.

Runs the workdir's model (trained here or imported with import-hf) block by block over
calibration sequences (the sequences `sparsejax prune` calibrates on: `MoeReport.
calibration_*`, the same options as PruneConfig's) and writes W/<MoeReport.name>.json and its
plots (moe_plots.py) with, per MoE layer:

* expert load (share of the assignments, and the routed-token counts) and co-activation
  (tokens routed to both experts, [E, E]);
* routing consistency for expert offloading (routing.py): segment coverage of one set of C
  experts per segment of S consecutive tokens, for S in `segment_lengths` and C in
  `cache_sizes`, and the best (Belady) and LRU cache hit rates for each cache size C;
* super-expert candidates (sparsity/posttrain/super_experts.py: the experts whose
  down-projection output peak is an outlier of the layer) and REAP saliencies.

Shared experts process every token and are not part of the routing.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Any, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np

from sparsejax import config as config_lib
from sparsejax.analysis import routing
from sparsejax.analysis.moe_plots import plot_report
from sparsejax.models import layer_stack
from sparsejax.models.moe.layer import MoeMlp
from sparsejax.parallel.mesh import data_parallel_size
from sparsejax.parallel.rules import LOGICAL_RULES
from sparsejax.sparsity.posttrain import capture, stats as stats_lib
from sparsejax.sparsity.posttrain.config import check_calibration
from sparsejax.sparsity.posttrain.driver import CalibrationBatches, CalibrationSet
from sparsejax.sparsity.posttrain.experts import ExpertStats, reap_saliency
from sparsejax.sparsity.posttrain.plan import get_path
from sparsejax.sparsity.posttrain.super_experts import SuperExperts
from sparsejax.sparsity.posttrain.workdir import calibration_set, restore
from sparsejax.train import trainer, workdir as workdir_lib
from sparsejax.train.build import build_run
from sparsejax.train.commands import parse_workdir_config

PyTree = Any


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MoeReport:
    """What `sparsejax moe-report` measures.

    calibration_*: the calibration sequences, as PruneConfig's settings of the same names
      (calibration_data 'files:GLOB': windows of that text; None: the run's dataset).
    segment_lengths: S, tokens per segment for the segment coverage.
    cache_sizes: C, experts per segment set and per cache (None: top_k, 2 top_k, 4 top_k and
      num_experts / 2, those below num_experts).
    name: the output files W/<name>.json and W/<name>*.png.
    """

    calibration_samples: int = 32
    calibration_seed: int = 0
    calibration_split: str = "validation"
    calibration_data: str | None = None
    calibration_batch_size: int | None = None
    segment_lengths: tuple = (8, 32, 128)
    cache_sizes: tuple | None = None
    name: str = "moe_report"

    def __post_init__(self):
        check_calibration(self, "MoeReport")
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ValueError(f"MoeReport.name={self.name!r} must be a file name stem (letters, "
                             f"digits, _ . -)")
        for field in ("segment_lengths", "cache_sizes"):
            v = getattr(self, field)
            if v is None and field == "cache_sizes":
                continue
            if isinstance(v, (int, str)) or not v or not all(
                    isinstance(x, int) and x >= 1 for x in v):
                raise ValueError(f"MoeReport.{field}={v!r} must be a non-empty tuple of "
                                 f"integers >= 1")

    def sizes_for(self, num_experts: int, top_k: int) -> list[int]:
        """The cache sizes of a layer with `num_experts` experts and `top_k` per token."""
        if self.cache_sizes is not None:
            big = [c for c in self.cache_sizes if c > num_experts]
            if big:
                raise ValueError(f"MoeReport.cache_sizes={self.cache_sizes!r} holds {big[0]}, "
                                 f"more than the layer's {num_experts} experts")
            return sorted(set(self.cache_sizes))
        return sorted({c for c in (top_k, 2 * top_k, 4 * top_k, num_experts // 2)
                       if 1 <= c < num_experts} or {num_experts})


def collect(cfg, params: PyTree, moe_state: PyTree | None, calib: CalibrationSet,
            mesh: jax.sharding.Mesh, batch_size: int) -> dict[tuple[int, str], dict]:
    """Runs the model (params in the unscanned layout) block by block over the calibration
    sequences; {(layer, MoE module path): {'routing': [per-sequence routings [T, E] bool],
    'counts', 'gate_norm_sum', 'output_max': [E], 'num_experts', 'top_k'}}."""
    batches = CalibrationBatches(calib, batch_size, mesh)
    out: dict[tuple[int, str], dict] = {}
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        embed = jax.jit(lambda p, t: capture.embed(cfg, p, t), out_shardings=batches.spec3)
        xs = [embed(params, b["tokens"]) for b in batches.items]
        programs: dict = {}
        for layer in range(cfg.num_layers):
            name = capture.layer_name(layer)
            bp, ms = params[name], (moe_state or {}).get(name)
            key = cfg.block_kind(layer)
            if key not in programs:
                programs[key] = _program(cfg, layer, batches)
            fn, modules = programs[key]
            ys = []
            for x, b in zip(xs, batches.items):
                y, moe = fn(bp, ms, x, b["positions"], b["segment_ids"], b["weights"])
                ys.append(y)
                w = np.asarray(b["weights"]) > 0
                for path, st in moe.items():
                    rec = out.setdefault((layer, path), {
                        "routing": [], "num_experts": modules[path].num_experts,
                        "top_k": modules[path].top_k})
                    a = np.asarray(st.pop("assign")).reshape(w.shape + (-1,))
                    rec["routing"] += [a[i][w[i]] for i in range(w.shape[0]) if w[i].any()]
                    for k, v in st.items():
                        v = np.asarray(v, np.float64)
                        rec[k] = v if k not in rec else (
                            np.maximum(rec[k], v) if k == "output_max" else rec[k] + v)
            xs = ys
    return out


def _program(cfg, layer: int, batches: CalibrationBatches):
    """(jitted block function, {MoE path: module}) for blocks of `layer`'s kind: the block's
    output and, per MoE module, its routed assignments and expert-output statistics."""
    modules: dict[str, Any] = {}

    def fn(bp, ms, x, pos, seg, w):
        y, rec = capture.capture_block(cfg, layer, bp, x, pos, seg, ms)
        wf = w.reshape(-1)
        moe = {}
        for path, (mod, xm) in rec.moe.items():
            modules[path] = mod
            mp = get_path(bp, path)
            _, a, g = stats_lib.routing_weights(mod, mp, None if not ms else get_path(ms, path),
                                                xm)
            a = a * wf[:, None]
            moe[path] = {"assign": a > 0, "counts": a.sum(0),
                         **stats_lib.expert_outputs(mod, mp, xm.reshape(-1, xm.shape[-1]), a, g)}
        return y, moe

    return jax.jit(fn), modules


def layer_report(layer: int, path: str, rec: dict, settings: MoeReport) -> dict[str, Any]:
    """One MoE layer's measures (see the module docstring) as JSON-able data."""
    seqs: Sequence[np.ndarray] = rec["routing"]
    e, k = rec["num_experts"], rec["top_k"]
    sizes = settings.sizes_for(e, k)
    flat = np.concatenate(seqs) if seqs else np.zeros((0, e), bool)
    stats = ExpertStats(rec["counts"], np.eye(e), rec["gate_norm_sum"], rec["output_max"])
    return {"layer": layer, "module": path, "num_experts": e, "top_k": k,
            "tokens": int(flat.shape[0]), "assignments": int(flat.sum()),
            "load": routing.expert_load(flat).tolist(), "counts": flat.sum(0).tolist(),
            "coactivation": routing.coactivation(flat).tolist(),
            "cache_sizes": sizes, "segment_lengths": list(settings.segment_lengths),
            **routing.consistency(seqs, settings.segment_lengths, sizes),
            "super_experts": SuperExperts().describe(rec["output_max"], rec["counts"]),
            "reap_saliency": reap_saliency(stats).tolist()}


def moe_report_workdir(workdir: str, gin_files: Sequence[str] = (),
                       bindings: Sequence[str] = (), imports: Sequence[str] = ()) -> dict:
    """Writes W/<name>.json and its plots for the workdir's model; returns a summary."""
    t0 = time.perf_counter()
    if not (workdir_lib.has_checkpoint(workdir) or workdir_lib.has_pretrained(workdir)):
        raise ValueError(f"--workdir={workdir!r} holds no checkpoint and no imported params "
                         f"(`sparsejax train` or `sparsejax import-hf` makes one)")
    parse_workdir_config(workdir, gin_files, bindings, imports)
    settings = MoeReport()
    SuperExperts()
    cfg = trainer.TrainConfig()
    run = build_run(cfg)
    flat_cfg = dataclasses.replace(run.model_config, scan_layers=False)
    moe_layers = [i for i in range(flat_cfg.num_layers) if flat_cfg.mlp_kind(i) == "moe"]
    if not moe_layers:
        raise ValueError(f"--workdir={workdir!r}: the model has no MoE layer "
                         f"(ModelConfig.mlp_kinds={tuple(flat_cfg.mlp_kinds)})")
    if not run.model_config.formats().all_dense:
        raise ValueError(f"--workdir={workdir!r} stores its projections in a compact weight "
                         f"format; moe-report runs the dense-kernel model block by block")
    mod = MoeMlp(embed_dim=flat_cfg.embed_dim)  # the gin-configured MoE layer
    settings.sizes_for(mod.num_experts, mod.top_k)
    dp = data_parallel_size(run.mesh)
    batch = settings.calibration_batch_size or cfg.global_batch_size
    if batch % dp:
        raise ValueError(f"MoeReport.calibration_batch_size={batch} must be a multiple of the "
                         f"data-parallel size {dp} (mesh {dict(run.mesh.shape)})")
    calib = calibration_set(cfg, settings)
    config_lib.check_unused_bindings()
    step, state = restore(run, workdir)
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(LOGICAL_RULES):
        method = run.sparsity_method
        params = jax.jit(lambda s: method.finalize(s.params, s.sparsity))(state)
    params = layer_stack.unstack_layers(params)
    moe_state = layer_stack.unstack_layers(state.moe_state)
    recs = collect(flat_cfg, params, moe_state, calib, run.mesh, batch)
    layers = [layer_report(layer, path, rec, settings) for (layer, path), rec in
              sorted(recs.items())]
    result = {"workdir": os.path.abspath(workdir), "step": int(step),
              "settings": dataclasses.asdict(settings), "super_expert_settings":
              dataclasses.asdict(SuperExperts()),
              "calibration": {"samples": calib.num_samples, "seq_len": int(calib.inputs.shape[1]),
                              "tokens": int(calib.token_weights.sum()), "seed": calib.seed,
                              "split": calib.split},
              "layers": layers,
              "super_experts": [{"layer": r["layer"], "module": r["module"], "expert": e,
                                 "ratio_to_median": r["super_experts"]["ratio_to_median"][e]}
                                for r in layers for e in r["super_experts"]["candidates"]]}
    path = os.path.join(workdir, settings.name + ".json")
    if jax.process_index() == 0:
        result["plots"] = plot_report(result, os.path.join(workdir, settings.name))
        result["seconds"] = time.perf_counter() - t0
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    return {"file": path, "plots": result.get("plots", []), "layers": len(layers),
            "super_experts": result["super_experts"],
            "optimal_hit_rate": {f"{r['layer']}/{r['module']}": r["cache_hit_rate"]
                                 for r in layers}}
