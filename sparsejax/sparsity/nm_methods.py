"""N:M methods with dense weights: SR-STE and learnable N:M masks (MaskLLM-style).

SR-STE recomputes the magnitude N:M mask from the dense weights every step,
trains through it with a straight-through gradient and adds the sparse-refined
term ``lam * (1 - mask) * w`` to the gradient.

Learned N:M keeps one logit per candidate pattern of every group in the params
under ``params[LOGITS_KEY]`` (a tree mirroring the model params, ``None`` where not
pruned). ``forward_params`` strips that key and returns weights times a
Gumbel-softmax mask, so the trainer's ordinary ``grad`` w.r.t. ``params`` trains
the logits end to end (with the weights unless ``train_weights=False``).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import gin
import jax
import jax.numpy as jnp

from sparsejax.config import check_step_spec, run_step
from sparsejax.sparsity import masks as masks_lib
from sparsejax.sparsity import nm as nm_lib
from sparsejax.sparsity import paths as paths_lib
from sparsejax.sparsity.method import METHODS, SparsityMethod, new_stats_state, track_density

PyTree = Any
LOGITS_KEY = "nm_mask_logits"


def _nm_prunable(params: PyTree, n: int, m: int, axis: int, include, exclude) -> PyTree:
    nm_lib.check_nm(n, m)
    prunable = paths_lib.prunable_tree(params, include, exclude)
    for (path, p), ok in zip(paths_lib.named_leaves(params), jax.tree.leaves(prunable)):
        if ok:
            nm_lib.check_groupable(p.shape, m, axis, f"params[{path!r}]")
    return prunable


def _nm_masks(params: PyTree, masks: PyTree, n: int, m: int, axis: int, valid=None) -> PyTree:
    """Magnitude N:M masks of the masked params (padded entries never kept)."""
    out = masks_lib.map_on_masks(lambda w, _: nm_lib.nm_mask(jax.lax.stop_gradient(w), n, m, axis),
                                 masks, params)
    v = masks_lib.valid_tree(masks, valid)
    return out if v is None else jax.tree.map(lambda a, b: a & b, out, v)


class _FlipRateMetrics(SparsityMethod):
    """N:M methods recompute their masks every step; they also log how many entries flipped."""

    def metrics(self, params, sparsity):
        out = super().metrics(params, sparsity)
        out["sparsity/flip_rate"] = sparsity["flip_rate"]
        return out


@gin.configurable
@METHODS.register("srste")
class SRSTEMethod(_FlipRateMetrics):
    """SR-STE (Zhou et al. 2021): N:M by magnitude, recomputed every step, dense weights."""

    def __init__(self, n: int = 2, m: int = 4, lam: float = 2e-4, axis: int = -2,
                 include: Sequence[str] = (), exclude: Sequence[str] = ()):
        nm_lib.check_nm(n, m)
        if lam < 0:
            raise ValueError(f"lam: {lam!r} must be >= 0")
        self.n, self.m, self.lam, self.axis = n, m, float(lam), axis
        self.include, self.exclude = tuple(include), tuple(exclude)

    def init(self, params, rng):
        prunable = _nm_prunable(params, self.n, self.m, self.axis, self.include, self.exclude)
        self.require_bound()
        masks = _nm_masks(params, masks_lib.ones_masks(params, prunable, self.valid), self.n,
                          self.m, self.axis, self.valid)
        return params, new_stats_state(masks, self.valid, flip_rate=jnp.zeros((), jnp.float32))

    def forward_params(self, params, sparsity, *, step=0, rng=None):
        masks = _nm_masks(params, sparsity["masks"], self.n, self.m, self.axis, self.valid)
        return masks_lib.ste_masks(params, masks)

    def on_grads(self, params, sparsity, grads, *, step=0):
        masks = _nm_masks(params, sparsity["masks"], self.n, self.m, self.axis, self.valid)
        grads = masks_lib.map_masked(lambda g, mk, w: nm_lib.srste_refine(g, w, mk, self.lam),
                                     masks, grads, params)
        flip = masks_lib.mask_churn(sparsity["masks"], masks, self.valid)
        return grads, track_density({**sparsity, "masks": masks, "flip_rate": flip}, valid=self.valid)

    def finalize(self, params, sparsity):
        return masks_lib.apply_masks(params, _nm_masks(params, sparsity["masks"], self.n, self.m,
                                                       self.axis, self.valid))


@gin.configurable
@METHODS.register("learned_nm")
class LearnedNMMethod(_FlipRateMetrics):
    """Learnable N:M masks: Gumbel-softmax over the C(M, N) patterns of each group.

    Temperature anneals linearly ``tau[0] -> tau[1]`` and the logit scale
    ``kappa[0] -> kappa[1]`` over ``anneal_steps`` (an int, or a float fraction of the run;
    default the whole run); ``finalize`` extracts the hard (argmax) mask. ``rng=None`` in
    ``forward_params`` uses the hard mask (eval).
    """

    def __init__(self, n: int = 2, m: int = 4, axis: int = -2, tau: tuple[float, float] = (4.0, 0.05),
                 kappa: tuple[float, float] = (1.0, 5.0), anneal_steps: int | float = 1.0,
                 prior_strength: float = 3.0, train_weights: bool = True,
                 include: Sequence[str] = (), exclude: Sequence[str] = ()):
        nm_lib.check_nm(n, m)
        if min(tau) <= 0 or min(kappa) <= 0:
            raise ValueError(f"tau {tau!r} and kappa {kappa!r} must be > 0")
        self._anneal = check_step_spec(anneal_steps, "LearnedNMMethod.anneal_steps", 1)
        self.n, self.m, self.axis = n, m, axis
        self.tau, self.kappa = tuple(map(float, tau)), tuple(map(float, kappa))
        self.anneal_steps, self.prior_strength = None, float(prior_strength)
        self.train_weights = bool(train_weights)
        self.include, self.exclude = tuple(include), tuple(exclude)

    def bind(self, run):
        super().bind(run)
        self.anneal_steps = run_step(self._anneal, run.num_steps, "LearnedNMMethod.anneal_steps", 1)
        return self

    def temperature_and_scale(self, step) -> tuple[jax.Array, jax.Array]:
        p = jnp.clip(jnp.asarray(step, jnp.float32) / self.anneal_steps, 0.0, 1.0)
        return self.tau[0] + p * (self.tau[1] - self.tau[0]), self.kappa[0] + p * (self.kappa[1] - self.kappa[0])

    def init(self, params, rng):
        if not isinstance(params, Mapping):
            raise ValueError(f"params: learned N:M needs a dict of params, got {type(params).__name__}")
        if LOGITS_KEY in params:
            raise ValueError(f"params: key {LOGITS_KEY!r} already present")
        self.require_bound()
        prunable = _nm_prunable(params, self.n, self.m, self.axis, self.include, self.exclude)
        masks = masks_lib.ones_masks(params, prunable, self.valid)
        logits = masks_lib.map_on_masks(
            lambda w, _: nm_lib.init_logits(w, self.n, self.m, self.axis, self.prior_strength), masks, params)
        hard = self._hard(logits, params, masks)
        return {**params, LOGITS_KEY: logits}, new_stats_state(hard, self.valid,
                                                               flip_rate=jnp.zeros((), jnp.float32))

    def _hard(self, logits, model_params, masks):
        hard = masks_lib.map_on_masks(
            lambda w, _, lg: nm_lib.hard_mask(lg, w.shape, self.n, self.m, self.axis),
            masks, model_params, logits)
        v = masks_lib.valid_tree(masks, self.valid)
        return hard if v is None else jax.tree.map(lambda a, b: a & b, hard, v)

    def finalize_structure(self, params):
        return {k: v for k, v in params.items() if k != LOGITS_KEY}

    def forward_params(self, params, sparsity, *, step=0, rng=None):
        model, logits, masks = self.finalize_structure(params), params[LOGITS_KEY], sparsity["masks"]
        if not self.train_weights:
            model = masks_lib.map_masked(lambda w, _: jax.lax.stop_gradient(w), masks, model)
        if rng is None:
            return masks_lib.apply_masks(model, self._hard(logits, model, masks))
        tau, kappa = self.temperature_and_scale(step)
        keys = iter(jax.random.split(rng, max(len(jax.tree.leaves(masks)), 1)))

        def soft(w, _, lg):
            mk = nm_lib.soft_mask(lg, w.shape, self.n, self.m, self.axis, tau=tau, kappa=kappa, rng=next(keys))
            return w * mk.astype(w.dtype)

        return masks_lib.map_masked(soft, masks, model, logits)

    def on_grads(self, params, sparsity, grads, *, step=0):
        hard = self._hard(params[LOGITS_KEY], self.finalize_structure(params), sparsity["masks"])
        flip = masks_lib.mask_churn(sparsity["masks"], hard, self.valid)
        return grads, track_density({**sparsity, "masks": hard, "flip_rate": flip}, valid=self.valid)

    def finalize(self, params, sparsity):
        model = self.finalize_structure(params)
        return masks_lib.apply_masks(model, self._hard(params[LOGITS_KEY], model, sparsity["masks"]))

    def hard_masks(self, params, sparsity) -> PyTree:
        """The hard N:M masks the logits currently select."""
        return self._hard(params[LOGITS_KEY], self.finalize_structure(params), sparsity["masks"])

