"""`sparsejax act-curves`: eval loss against training-free activation sparsity (TEAL, CATS,
WINA) for each method and target (`ThresholdCurves`), written to W/<ThresholdCurves.name>.json
and .png (default activation_curves), with each point's paired difference to the model's own
loss on the same eval rows."""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import flax.linen as nn
import gin
import jax
import numpy as np

from sparsejax import config as config_lib
from sparsejax.models.transformer import ModelConfig
from sparsejax.parallel.rules import LOGICAL_RULES
from sparsejax.sparsity.activation.calibrate import (ThresholdEval, calibration_batches,
                                                     histograms)
from sparsejax.sparsity.activation.evaluate import effective_params
from sparsejax.sparsity.activation.thresholding import (THRESHOLDERS, Thresholding, check_model,
                                                        check_target, make_sites, site_layout)
from sparsejax.train import evaluation


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ThresholdCurves:
    """What `sparsejax act-curves` measures: each method at each target sparsity."""

    methods: tuple = ("teal", "cats", "wina")
    targets: tuple = (0.25, 0.4, 0.5, 0.65)
    projections: tuple | None = None  # for the methods that take projections (teal, wina)
    calibration_tokens: int = 16384
    calibration_seed: int = 1
    name: str = "activation_curves"  # output files W/<name>.json and W/<name>.png

    def __post_init__(self):
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ValueError(f"ThresholdCurves.name={self.name!r} must be a file name stem "
                             f"(letters, digits, _ . -)")
        if isinstance(self.methods, str) or not self.methods:
            raise ValueError(f"ThresholdCurves.methods={self.methods!r} must be a non-empty tuple "
                             f"of {THRESHOLDERS.names()}")
        for m in self.methods:
            THRESHOLDERS.get(m, "ThresholdCurves.methods")
        if isinstance(self.targets, (int, float)) or not self.targets:
            raise ValueError(f"ThresholdCurves.targets={self.targets!r} must be a non-empty tuple")
        for t in self.targets:
            check_target(t, "ThresholdCurves.targets")
        if self.projections is not None and not any(m != "cats" for m in self.methods):
            raise ValueError(f"ThresholdCurves.projections={self.projections!r} has no effect: "
                             f"no method of {self.methods} takes projections")

    def thresholding(self, method: str, target: float) -> Thresholding:
        proj = self.projections if method != "cats" else None
        return Thresholding(method=method, target=float(target), projections=proj,
                            calibration_tokens=self.calibration_tokens,
                            calibration_seed=self.calibration_seed)


def paired_difference(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]
                      ) -> tuple[float, float | None]:
    """Loss difference a - b on the same rows (per-row loss sums, counts) and its standard
    error over rows (train/evaluation.py's ratio estimator applied to the differences)."""
    (sa, n), (sb, _) = a, b
    keep = n > 0
    d = evaluation.loss_stats(sa[keep] - sb[keep], n[keep])
    return d["eval_loss"], d["eval_loss_stderr"]


def act_curves(workdir: str) -> dict[str, Any]:
    """Runs the ThresholdCurves of the parsed gin config on the workdir's checkpoint."""
    from sparsejax.train import trainer  # deferred: keeps the CLI's start fast
    curves = ThresholdCurves()
    cfg = trainer.TrainConfig()
    model_config = ModelConfig()  # the run's (gin-configured): checked before anything is built
    for m in curves.methods:
        th = curves.thresholding(m, curves.targets[0])
        check_model(model_config, m, th.chosen_projections())
    run, step, state = trainer.load_state_for_eval(workdir, cfg)
    eval_set = evaluation.eval_set_for(cfg)
    if eval_set is None:
        raise ValueError("TrainConfig.eval_tokens=0: act-curves needs an eval sample")
    config_lib.check_unused_bindings()
    rows = []
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(LOGICAL_RULES):
        params = effective_params(run, state)
        host = jax.device_get(params)
        calib = calibration_batches(cfg, curves.calibration_tokens, curves.calibration_seed)
        ev = ThresholdEval(run, rows_out=True)
        dense = ev(params, state.moe_state, {}, eval_set.batches)
        rows.append({"method": "dense", "target": 0.0, "sparsity": 0.0,
                     **_point(dense, dense)})
        for m in curves.methods:
            th = curves.thresholding(m, curves.targets[0])
            layout = site_layout(host, run.model_config, m, th.chosen_projections())
            hists = histograms(run, params, state.moe_state, layout, calib)
            for t in curves.targets:
                res = ev(params, state.moe_state, make_sites(layout, float(t), hists),
                         eval_set.batches)
                rows.append({"method": m, "target": float(t), "projections":
                             list(th.chosen_projections()), "sparsity": res["threshold/sparsity"],
                             **_point(res, dense),
                             "per_site": {k[len("threshold/sparsity/"):]: v for k, v in res.items()
                                          if k.startswith("threshold/sparsity/")}})
    result = {"step": step, "eval_rows": eval_set.rows, "points": rows}
    path = os.path.join(workdir, curves.name + ".json")
    if jax.process_index() == 0:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        # deferred: keeps the CLI's start fast (matplotlib)
        from sparsejax.analysis.activation_plots import plot_curves
        result["plot"] = plot_curves(result, os.path.join(workdir, curves.name + ".png"))
    result["file"] = path
    return result


def _point(res: dict, dense: dict) -> dict[str, Any]:
    delta, se = paired_difference(res["rows"], dense["rows"])
    return {"eval_loss": res["eval_loss"], "eval_loss_stderr": res["eval_loss_stderr"],
            "delta_vs_dense": delta, "delta_stderr": se}
