"""Calibration and evaluation of a model under activation thresholds.

    sample = calibration_batches(cfg, tokens=16384, seed=1)     # training rows
    hists = histograms(run, params, moe_state, layout, sample)    # one pass, dense model
    sites = make_sites(layout, target, hists)                     # thresholding.py
    ev = ThresholdEval(run)                                       # compiles once per layout
    stats = ev(params, moe_state, sites, eval_set.batches)        # loss, sparsity per site

Histograms are taken on the dense model (TEAL's calibration: every site sees unthresholded
inputs), so thresholds for any target come from one pass. Callers run these inside
`jax.set_mesh(run.mesh)` and the logical axis rules.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax.data import pipeline
from sparsejax.models.act_record import STATS
from sparsejax.models.thresholds import HISTOGRAMS, MASKED, THRESHOLDS
from sparsejax.parallel.rules import batch_sharding
from sparsejax.sparsity.activation import metrics as act_metrics
from sparsejax.sparsity.activation.thresholding import make_sites
from sparsejax.train.evaluation import loss_stats


class WithVariables:
    """A model whose `apply` adds fixed variable collections (e.g. the 'act_sparsity'
    thresholds) to the ones it is given; `config` and every other attribute pass through."""

    def __init__(self, model: Any, extra: Mapping[str, Any]):
        self._model, self._extra = model, dict(extra)

    def apply(self, variables, *args, **kwargs):
        return self._model.apply({**variables, **self._extra}, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


def calibration_batches(cfg: Any, tokens: int, seed: int) -> list[dict[str, np.ndarray]]:
    """ceil(tokens / (batch * seq_len)) batches of training rows (this process's share), read
    in the order of `seed` (not the training order unless it is the training seed)."""
    per = cfg.global_batch_size * cfg.seq_len
    n = -(-int(tokens) // per)
    it = iter(pipeline.make_dataset("train", global_batch_size=cfg.global_batch_size,
                                    seq_len=cfg.seq_len, seed=seed, dataset=cfg.dataset,
                                    data_dir=cfg.data_dir, num_epochs=1))
    out = []
    for _ in range(n):
        try:
            out.append(next(it))
        except StopIteration:
            break
    if not out:
        raise ValueError(f"the training split of {cfg.dataset!r} has no full batch of "
                         f"{cfg.global_batch_size} x {cfg.seq_len} tokens to calibrate on")
    return out


def _global(batch: Mapping[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def _variables(params, moe_state, sites):
    v = {"params": params, THRESHOLDS: sites}
    if moe_state:
        v["moe_state"] = moe_state
    return v


def _flat(tree: Any, prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    """{'layer_0/mlp/wo_in': value} of a nested dict whose leaves are sown tuples or arrays."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, prefix + (str(k),)))
        else:
            vals = v if isinstance(v, tuple) else (v,)
            out["/".join(prefix + (str(k),))] = vals
    return out


def histograms(run: Any, params: Any, moe_state: Any, layout: Mapping,
               batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """{site path: counts [NUM_BINS]} of every layout site's scores over `batches`."""
    sites = make_sites(layout, 0.0, None)  # threshold -1: keep everything

    @jax.jit
    def one(params, moe_state, sites, batch):
        _, mut = run.model.apply(_variables(params, moe_state, sites), batch["inputs"],
                                 batch["positions"], batch["segment_ids"], mutable=[HISTOGRAMS])
        return {k: sum(v) for k, v in _flat(mut.get(HISTOGRAMS, {})).items()}

    sharding = batch_sharding(run.mesh)
    total: dict[str, np.ndarray] = {}
    for b in batches:
        for k, v in jax.device_get(one(params, moe_state, sites, _global(b, sharding))).items():
            total[k] = total.get(k, 0) + np.asarray(v, np.float64)
    missing = sorted(set(_site_list(layout)) - set(total))
    if missing:
        raise ValueError(f"the model has no thresholding sites {missing} (its layers do not "
                         f"have those projections)")
    return total


def _site_list(layout: Mapping) -> list[str]:
    return [f"{l}/{m}/{n}" for l, mods in layout.items() for m, s in mods.items() for n in s]


class ThresholdEval:
    """Eval loss and achieved sparsity under given sites; the thresholds are arguments, so
    one compiled program serves every target."""

    def __init__(self, run: Any, act_settings: act_metrics.ActivationMetrics | None = None,
                 rows_out: bool = False):
        self.run, self.rows_out = run, rows_out
        self.act = act_settings or act_metrics.ActivationMetrics(enabled=False)
        mutable = [MASKED] + ([STATS] if self.act.enabled else [])

        def step(params, moe_state, sites, batch):
            logits, mut = run.model.apply(_variables(params, moe_state, sites), batch["inputs"],
                                          batch["positions"], batch["segment_ids"],
                                          mutable=mutable)
            losses = optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), batch["targets"])
            mask = batch["loss_mask"].astype(jnp.float32)
            real = (batch["segment_ids"] != 0).reshape(-1).astype(jnp.float32)
            masked = {k: jnp.stack([jnp.sum(v[0] * real), jnp.sum(real)])
                      for k, v in _flat(mut.get(MASKED, {})).items()}
            out = {"loss_sum": jnp.sum(losses * mask, -1), "count": jnp.sum(mask, -1),
                   "masked": masked}
            if self.act.enabled:
                out["act"] = act_metrics.batch_sums(mut.get(STATS), batch["segment_ids"], self.act)
            return out

        self._step = jax.jit(step)

    def __call__(self, params: Any, moe_state: Any, sites: Any,
                 batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, Any]:
        """loss statistics (train/evaluation.py) plus 'threshold/sparsity' (mean over sites of
        the fraction of entries zeroed, real tokens only) and 'threshold/sparsity/<site>';
        with `rows_out`, 'rows': (per-row loss sums, token counts) for paired comparisons."""
        sharding = batch_sharding(self.run.mesh)
        outs = [jax.device_get(self._step(params, moe_state, sites, _global(b, sharding)))
                for b in batches]
        sums = np.concatenate([o["loss_sum"] for o in outs]).astype(np.float64)
        counts = np.concatenate([o["count"] for o in outs]).astype(np.float64)
        result = loss_stats(sums, counts)
        if self.rows_out:
            result["rows"] = (sums, counts)
        per_site = {}
        for k in outs[0]["masked"]:
            num = sum(float(o["masked"][k][0]) for o in outs)
            den = sum(float(o["masked"][k][1]) for o in outs)
            per_site[k] = num / max(den, 1.0)
        if per_site:
            result["threshold/sparsity"] = float(np.mean(list(per_site.values())))
            result.update({f"threshold/sparsity/{k}": v for k, v in sorted(per_site.items())})
        if self.act.enabled:
            sums = None
            for o in outs:
                sums = act_metrics.add_sums(sums, o["act"])
            result.update(act_metrics.summarize(sums, self.act))
        return result
