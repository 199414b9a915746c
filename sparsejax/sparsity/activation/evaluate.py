"""Activation sparsity at eval and sampling time: the settings of one `sparsejax eval`
(`ActivationEval`: thresholded eval loss, PPL-p% sparsity) and the thresholded model that
`sparsejax sample` decodes with (`thresholded_model`)."""
from __future__ import annotations

from typing import Any

import jax

from sparsejax.infer.sparse_decode import SparseDecode, neuron_major_weights, with_capacities
from sparsejax.models.sparse_mlp import DECODE_WEIGHTS
from sparsejax.models.thresholds import THRESHOLDS
from sparsejax.sparsity.activation.calibrate import (ThresholdEval, WithVariables,
                                                     calibration_batches, histograms)
from sparsejax.sparsity.activation.metrics import ActivationMetrics
from sparsejax.sparsity.activation.ppl_sparsity import PplSparsity, ppl_sparsity
from sparsejax.sparsity.activation.thresholding import (Thresholding, check_model, make_sites,
                                                        site_layout)


def effective_params(run: Any, state: Any) -> Any:
    """The params the model computes with (the sparsity method's forward params)."""
    m = run.sparsity_method
    return jax.jit(lambda s: m.forward_params(s.params, s.sparsity, step=s.step, rng=None))(state)


def calibrated_sites(run: Any, state: Any, cfg: Any, th: Thresholding, params: Any
                     ) -> tuple[dict, dict]:
    """(the 'act_sparsity' tree of `th` calibrated on training rows, the histograms)."""
    host = jax.device_get(params)
    layout = site_layout(host, run.model_config, th.method, th.chosen_projections())
    hists = histograms(run, params, state.moe_state, layout,
                       calibration_batches(cfg, th.tokens, th.seed))
    return make_sites(layout, float(th.target), hists), hists


class ActivationEval:
    """The activation-sparsity settings of one `sparsejax eval`, read from gin and checked
    against the model before anything runs."""

    def __init__(self, model_config: Any):
        self.thresholding = Thresholding()
        self.ppl = PplSparsity()
        if self.thresholding.active:
            check_model(model_config, self.thresholding.method,
                        self.thresholding.chosen_projections())
        if self.ppl.percents:
            check_model(model_config, "PPL-p% (thresholds on the MLP intermediate)", ("down",))

    @property
    def active(self) -> bool:
        return self.thresholding.active or bool(self.ppl.percents)

    def evaluate(self, run: Any, state: Any, cfg: Any, eval_set: Any,
                 dense: dict[str, Any]) -> dict[str, Any]:
        """The eval record: `dense` (the plain eval), replaced by the thresholded eval when
        thresholding is on, plus PPL-p% entries."""
        params = effective_params(run, state)
        out = dict(dense)
        th = self.thresholding
        if th.active:
            sites, _ = calibrated_sites(run, state, cfg, th, params)
            act = ActivationMetrics()
            res = ThresholdEval(run, act)(params, state.moe_state, sites, eval_set.batches)
            out = {k: v for k, v in dense.items() if not k.startswith("act/")}
            out.update(res)
            out.update({"dense_eval_loss": dense["eval_loss"], "threshold/method": th.method,
                        "threshold/target": float(th.target)})
        if self.ppl.percents:
            calib = calibration_batches(cfg, self.ppl.tokens, self.ppl.seed)
            out.update(ppl_sparsity(self.ppl, run, params, state.moe_state,
                                    jax.device_get(params), calib, list(eval_set.batches)))
        return out


def check_thresholding(model_config: Any) -> None:
    """Refuses `Thresholding` settings the model cannot take (thresholding.check_model), from
    the configs alone: commands call it before they build or restore anything."""
    th = Thresholding()
    if th.active:
        check_model(model_config, th.method, th.chosen_projections())


def thresholded_model(run: Any, state: Any, cfg: Any) -> tuple[Any, dict | None]:
    """(`run.model` wrapped with calibrated thresholds and their sparse decode path
    (`SparseDecode`), the sites) when `Thresholding.method` is set, else (run.model, None):
    for `sparsejax sample`."""
    th = Thresholding()
    if not th.active:
        return run.model, None
    decode = SparseDecode()
    check_model(run.model_config, th.method, th.chosen_projections())
    params = effective_params(run, state)
    sites, hists = calibrated_sites(run, state, cfg, th, params)
    sites = with_capacities(sites, hists, decode)
    extra = {THRESHOLDS: sites}
    major = neuron_major_weights(params, sites)
    if major:
        extra[DECODE_WEIGHTS] = major
    return WithVariables(run.model, extra), sites
