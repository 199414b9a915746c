"""MoE expert pruning and merging: an MoE layer with E experts becomes one with K < E, and the
model a smaller MoE checkpoint (`MoeMlp.num_experts = K`). Registered by name in
`EXPERT_REDUCERS` (`PruneConfig.experts = 'merge'`).

A reduction is a plan: K groups of original experts, each with a representative (its first
member) and merge weights. Applying it (`apply_plan`) makes expert g the weighted average of
its group's experts and gives it the representative's router column (and balancing bias);
the router's softmax then runs over the K kept columns, so its probabilities are
renormalized over the experts that remain.

* ``frequency``: keep the K experts the router sends the most calibration tokens;
* ``reconstruction``: drop experts one at a time, each time the one whose removal changes
  the layer's output on the calibration tokens least (‖y - y'‖², greedy; NAEE-style);
* ``merge`` (Li et al. 2024, "Merge, Then Compress"): the K most used experts are dominant;
  every other expert joins the dominant expert whose router logits over the calibration
  tokens are most similar (cosine), and each group is merged by averaging its experts'
  weights weighted by their routed-token counts (MC-SMoE's frequency-weighted merge, without
  its neuron-permutation alignment).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np

from sparsejax.registry import Registry

PyTree = Any


@dataclasses.dataclass(frozen=True)
class ReductionPlan:
    """groups[g]: original experts merged into new expert g (groups[g][0] its representative);
    weights[g]: their merge weights (summing to 1)."""

    groups: tuple[tuple[int, ...], ...]
    weights: tuple[tuple[float, ...], ...]

    @property
    def kept(self) -> list[int]:
        return [g[0] for g in self.groups]

    def describe(self) -> dict:
        return {"groups": [list(g) for g in self.groups],
                "weights": [[round(w, 6) for w in ws] for ws in self.weights]}


class ExpertReducer:
    """Base: chooses a ReductionPlan for one MoE layer."""

    needs_outputs: bool = False  # `plan` gets an `error(kept)` callback over calibration tokens

    def plan(self, counts: np.ndarray, logit_gram: np.ndarray, k: int,
             error: Callable[[Sequence[int]], float] | None = None) -> ReductionPlan:
        raise NotImplementedError


EXPERT_REDUCERS: Registry[type[ExpertReducer]] = Registry("expert reduction")


def keep_plan(kept: Sequence[int]) -> ReductionPlan:
    kept = sorted(int(e) for e in kept)
    return ReductionPlan(tuple((e,) for e in kept), tuple((1.0,) for _ in kept))


def most_used(counts: np.ndarray, k: int) -> list[int]:
    """The k experts with the most routed tokens (ties: lower index), in index order."""
    order = sorted(range(len(counts)), key=lambda e: (-float(counts[e]), e))
    return sorted(order[:k])


@EXPERT_REDUCERS.register("frequency")
class FrequencyPruning(ExpertReducer):
    """Keep the K experts that receive the most calibration tokens."""

    def plan(self, counts, logit_gram, k, error=None):
        return keep_plan(most_used(counts, k))


@EXPERT_REDUCERS.register("reconstruction")
class ReconstructionPruning(ExpertReducer):
    """Greedily drop the expert whose removal changes the layer output least."""

    needs_outputs = True

    def plan(self, counts, logit_gram, k, error=None):
        if error is None:
            raise ValueError("expert reduction 'reconstruction' needs the layer's outputs")
        kept = list(range(len(counts)))
        while len(kept) > k:
            errs = [error([x for x in kept if x != e]) for e in kept]
            kept.pop(int(np.argmin(errs)))
        return keep_plan(kept)


def logit_similarity(logit_gram: np.ndarray) -> np.ndarray:
    """Cosine similarity [E, E] of the experts' router-logit vectors over calibration tokens,
    from their Gram matrix LᵀL."""
    g = np.asarray(logit_gram, np.float64)
    norm = np.sqrt(np.maximum(np.diag(g), 1e-30))
    return g / norm[:, None] / norm[None, :]


@EXPERT_REDUCERS.register("merge")
class FrequencyWeightedMerge(ExpertReducer):
    """Group experts around the K most used by router-logit similarity; frequency-weighted
    average of each group (Merge, Then Compress)."""

    def plan(self, counts, logit_gram, k, error=None):
        counts = np.asarray(counts, np.float64)
        dominant = most_used(counts, k)
        sim = logit_similarity(logit_gram)
        members = {d: [d] for d in dominant}
        for e in range(len(counts)):
            if e not in members:
                best = max(dominant, key=lambda d: (sim[e, d], -d))
                members[best].append(e)
        groups, weights = [], []
        for d in dominant:
            f = counts[members[d]]
            w = f / f.sum() if f.sum() > 0 else np.full(len(f), 1.0 / len(f))
            groups.append(tuple(members[d]))
            weights.append(tuple(float(x) for x in w))
        return ReductionPlan(tuple(groups), tuple(weights))


def apply_plan(moe_params: PyTree, moe_state: PyTree | None, plan: ReductionPlan
               ) -> tuple[PyTree, PyTree | None]:
    """The MoE layer's params (and moe_state) with the plan's K experts: stacked expert
    weights (and expert biases) merged per group, router columns, router biases and balancing
    biases of the representatives."""
    reps = jnp.asarray(plan.kept)
    out = dict(moe_params)
    out["router_kernel"] = moe_params["router_kernel"][:, reps]
    if "router_bias" in moe_params:  # MoeMlp.router_bias (gpt-oss)
        out["router_bias"] = moe_params["router_bias"][reps]
    experts = {}
    for name, w in moe_params["experts"].items():
        merged = [sum(float(c) * w[e].astype(jnp.float32) for e, c in zip(g, ws))
                  for g, ws in zip(plan.groups, plan.weights)]
        experts[name] = jnp.stack(merged).astype(w.dtype)
    out["experts"] = experts
    state = None
    if moe_state is not None:
        state = {k: (v[reps] if getattr(v, "ndim", 0) == 1 and k == "bias" else v)
                 for k, v in moe_state.items()}
    return out, state
