"""PPL-p% sparsity (Sparsing Law, Luo et al., 2024): the largest threshold-based activation
sparsity at which perplexity stays within p% of the model's own.

The intermediate h entering every dense MLP's down projection is thresholded per layer at a
common target sparsity s (thresholds from the calibration set's histograms of |h|, as TEAL's
'down' site), and s is found by bisection: perplexity on the calibration set at s must be at
most (1 + p/100) times the perplexity at s = 0 (only exact zeros, i.e. the model itself).
This works for any activation: a SiLU model has no exact zeros but many small entries.

Reported per p (`act/ppl_<p>%_...`): the achieved sparsity (fraction of h entries at or below
their thresholds on the calibration set, overall and per MLP), the target found, the
calibration perplexity ratio there, and the eval-sample perplexity ratio at those thresholds.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import gin
import numpy as np

from sparsejax.sparsity.activation.calibrate import ThresholdEval, histograms
from sparsejax.sparsity.activation.thresholding import make_sites, site_layout


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PplSparsity:
    """PPL-p% sparsity in `sparsejax eval`; `percents=()` turns it off (then nothing else may
    be set)."""

    percents: tuple = ()
    bisection_steps: int | None = None
    calibration_tokens: int | None = None
    calibration_seed: int | None = None

    def __post_init__(self):
        if not self.percents:
            given = [f for f in ("bisection_steps", "calibration_tokens", "calibration_seed")
                     if getattr(self, f) is not None]
            if given:
                raise ValueError(f"PplSparsity.{given[0]}={getattr(self, given[0])!r} has no "
                                 f"effect with PplSparsity.percents=(); give percents, e.g. (1.0,)")
            return
        if isinstance(self.percents, (int, float)) or any(
                isinstance(p, bool) or not isinstance(p, (int, float)) or not p > 0
                for p in self.percents):
            raise ValueError(f"PplSparsity.percents={self.percents!r} must be a tuple of "
                             f"numbers > 0 (percent perplexity increase, e.g. (1.0,))")
        if self.bisection_steps is not None and (not isinstance(self.bisection_steps, int)
                                                 or not 1 <= self.bisection_steps <= 30):
            raise ValueError(f"PplSparsity.bisection_steps={self.bisection_steps!r} must be an "
                             f"int in [1, 30]")

    @property
    def steps(self) -> int:
        return 8 if self.bisection_steps is None else self.bisection_steps

    @property
    def tokens(self) -> int:
        return 16384 if self.calibration_tokens is None else self.calibration_tokens

    @property
    def seed(self) -> int:
        return 1 if self.calibration_seed is None else self.calibration_seed


def _key(p: float) -> str:
    return f"act/ppl_{np.format_float_positional(float(p), trim='-')}%"


def ppl_sparsity(settings: PplSparsity, run: Any, params: Any, moe_state: Any, host_params: Any,
                 calib: list, eval_batches: list) -> dict[str, float]:
    """The PPL-p% records for every p of `settings` (module docstring)."""
    layout = site_layout(host_params, run.model_config, "teal", ("down",))
    hists = histograms(run, params, moe_state, layout, calib)
    ev = ThresholdEval(run)
    cache: dict[float, dict] = {}

    def at(s: float) -> dict:
        if s not in cache:
            cache[s] = ev(params, moe_state, make_sites(layout, s, hists), calib)
        return cache[s]

    base = at(0.0)["eval_perplexity"]
    dense_eval = ev(params, moe_state, make_sites(layout, 0.0, hists), eval_batches)
    out: dict[str, float] = {}
    for p in settings.percents:
        limit = base * (1 + float(p) / 100)
        lo, hi = 0.0, 1.0
        for _ in range(settings.steps):
            mid = (lo + hi) / 2
            if at(mid)["eval_perplexity"] <= limit:
                lo = mid
            else:
                hi = mid
        found = at(lo)
        key = _key(p)
        out[f"{key}_sparsity"] = found.get("threshold/sparsity", 0.0)
        for k, v in found.items():
            if k.startswith("threshold/sparsity/"):
                path = k[len("threshold/sparsity/"):].rsplit("/", 1)[0]  # layer_i/mlp
                out[f"{key}_sparsity/{path}"] = v
        out[f"{key}_target"] = lo
        out[f"{key}_calibration_ppl_ratio"] = found["eval_perplexity"] / base
        sparse_eval = ev(params, moe_state, make_sites(layout, lo, hists), eval_batches)
        out[f"{key}_eval_ppl_ratio"] = sparse_eval["eval_perplexity"] / dense_eval["eval_perplexity"]
    return out
