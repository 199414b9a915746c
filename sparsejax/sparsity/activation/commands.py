"""Activation sparsity in the CLI.

* `sparsejax eval` with `Thresholding.method` set scores the checkpoint under calibrated
  thresholds (its `eval_loss` is then the thresholded one, `dense_eval_loss` the model's
  own); with `PplSparsity.percents` it adds PPL-p% sparsity (ppl_sparsity.py).
* `sparsejax sample` with `Thresholding.method` set generates under the thresholds, its
  decode steps through the activation-sparse path (`SparseDecode`, infer/sparse_decode.py).
* `sparsejax act-curves` writes eval loss against sparsity for each method and target
  (`ThresholdCurves`) to W/<ThresholdCurves.name>.json and .png (default
  activation_curves), with each point's paired difference to the model's own loss on the
  same eval rows.
"""
from __future__ import annotations

import argparse
from typing import Sequence

from sparsejax.train.commands import add_run_flags, guarded, start_run


def add_parsers(sub) -> None:
    s = sub.add_parser("act-curves", help="eval loss vs training-free activation sparsity "
                                          "(TEAL, CATS, WINA) of a checkpoint")
    add_run_flags(s)
    s.set_defaults(handler=run_act_curves)


def run_act_curves(args: argparse.Namespace, bindings: Sequence[str]) -> int:
    def go():
        # deferred: keeps the CLI's start fast (the model stack loads with the command)
        from sparsejax.sparsity.activation.curves import act_curves
        start_run(args, bindings)
        out = act_curves(args.workdir)
        return {"file": out["file"], "points": [
            {k: p[k] for k in ("method", "target", "sparsity", "eval_loss", "delta_vs_dense",
                               "delta_stderr")} for p in out["points"]]}
    return guarded(go)
