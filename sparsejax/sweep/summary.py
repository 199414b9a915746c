"""One trial's numbers, from its workdir (metrics.jsonl + latest checkpoint), as written to
the trial's done marker (result.json)."""
from __future__ import annotations

import logging
import math
import os
import re
from typing import Any

import jax
import numpy as np

from sparsejax.models.moe.layer import MoeMlp
from sparsejax.sparsity import LOGITS_KEY, flops_per_token
from sparsejax.sparsity.masks import DEFAULT_FLOP_MULTIPLIERS
from sparsejax.train.checkpoint import restore_state_numpy
from sparsejax.train.metrics import read_metrics, recorded_fingerprints

RESULT_FILE = "result.json"


def metric_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Final/best eval loss, the final eval's standard error over its rows, final train loss
    (the mean over the last logging interval), throughput, logged param counts and the corpus
    fingerprint ('a+b' if the run was resumed on another corpus; None if not recorded).

    tokens_per_s is the mean over logged train records except the first (which includes
    compilation), or the first one when it is the only one."""
    eval_recs = [r for r in records if _finite(r.get("eval_loss"))]
    evals = [r["eval_loss"] for r in eval_recs]
    train = [r for r in records if _finite(r.get("loss"))]
    tps = [r["tokens_per_s"] for r in train if _finite(r.get("tokens_per_s"))]
    tps = tps[1:] if len(tps) > 1 else tps
    out: dict[str, Any] = {
        "final_step": max((int(r["step"]) for r in records), default=0),
        "final_eval_loss": evals[-1] if evals else None,
        "final_eval_loss_stderr": (eval_recs[-1].get("eval_loss_stderr") if eval_recs else None),
        "best_eval_loss": min(evals) if evals else None,
        "final_loss": train[-1]["loss"] if train else None,
        "tokens_per_s": float(np.mean(tps)) if tps else None,
        "corpus_fingerprint": "+".join(recorded_fingerprints(records)) or None,
    }
    for key, name in (("sparsity/param_count", "logged_params"),
                      ("sparsity/avg_param_count", "logged_avg_params"),
                      ("sparsity/density", "density")):
        vals = [r[key] for r in records if _finite(r.get(key))]
        out[name] = vals[-1] if vals else None
    return out


def flop_multipliers(workdir: str) -> dict[str, float]:
    """Per-path FLOP multipliers of a trial: embeddings cost none, and each routed expert
    kernel runs for top_k / num_experts of the tokens (read from the trial's config.gin, or
    MoeMlp's defaults). For the ReLU and expert-choice routers top_k is the nominal count."""

    bound = {}
    path = os.path.join(workdir, "config.gin")
    if os.path.isfile(path):
        with open(path) as f:
            bound = dict(re.findall(r"^MoeMlp\.(top_k|num_experts)\s*=\s*(\d+)\s*$", f.read(),
                                    re.MULTILINE))
    fields = MoeMlp.__dataclass_fields__
    k, e = (int(bound.get(n, fields[n].default)) for n in ("top_k", "num_experts"))
    return {**DEFAULT_FLOP_MULTIPLIERS, r"moe/experts/": k / e}


def effective_masks(params, stored_masks=None):
    """Which weights the exported model keeps: the nonzero ones, and, for methods that keep
    dense weights and mask them in the forward pass (SR-STE, learned N:M), only those inside
    the stored masks (a tree mirroring params, None where a param is not masked)."""

    masks = jax.tree.map(lambda p: np.asarray(p) != 0, params)
    if stored_masks is None:
        return masks
    return jax.tree.map(lambda nz, m: nz if m is None else nz & np.asarray(m, bool),
                        masks, stored_masks, is_leaf=lambda x: x is None)


def checkpoint_counts(workdir: str) -> dict[str, Any]:
    """Nonzero parameter count and forward matmul FLOPs per token of the final checkpoint.
    FLOPs count nonzero kernel entries (pruned weights are exactly zero under the masked
    optimizer), embeddings excluded and routed experts scaled by the fraction of tokens each
    sees (flop_multipliers)."""



    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax metadata notices
    _, state = restore_state_numpy(workdir)
    params = {k: v for k, v in state["params"].items() if k != LOGITS_KEY}
    leaves = [np.asarray(x) for x in jax.tree.leaves(params)]
    masks = effective_masks(params, (state.get("sparsity") or {}).get("masks"))
    return {"nonzero_params": int(sum(np.count_nonzero(m) for m in jax.tree.leaves(masks))),
            "total_params": int(sum(x.size for x in leaves)),
            "flops_per_token": float(flops_per_token(params, masks,
                                                     flop_multipliers(workdir)))}


def summarize_trial(workdir: str) -> dict[str, Any]:
    """Everything the sweep table needs about one finished trial."""
    out = metric_summary(read_metrics(os.path.join(workdir, "metrics.jsonl")))
    out.update(checkpoint_counts(workdir))
    # Sparsity methods log their own (mask-aware) counts; dense runs keep every parameter.
    out["params"] = (out["logged_params"] if out["logged_params"] is not None
                     else out["nonzero_params"])
    out["avg_params"] = (out["logged_avg_params"] if out["logged_avg_params"] is not None
                         else out["params"])
    return out


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
