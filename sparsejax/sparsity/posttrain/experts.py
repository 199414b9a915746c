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
  its neuron-permutation alignment);
* ``reap`` (router-weighted expert activation pruning, as in llm-compressor's
  REAPPruningModifier): an expert's saliency is the mean, over the calibration tokens routed
  to it, of its gate weight times the L2 norm of its output; keep the K most salient.

Constraints every reducer honours (`constrained_plan`): *protected* experts (super experts,
super_experts.py, unless PruneConfig.protect_super_experts=False) are kept as they are, alone
in their group; experts named in PruneConfig.drop_experts are dropped; the reducer chooses
the remaining K - |protected| experts among the others. Shared experts (MoeMlp.
num_shared_experts) are not among the routed experts a reducer sees: they are never dropped.
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


@dataclasses.dataclass(frozen=True)
class ExpertStats:
    """Calibration statistics of one MoE layer's E routed experts (stats.moe_stats)."""

    counts: np.ndarray                     # [E] routed calibration tokens
    logit_gram: np.ndarray                 # [E, E] Lᵀ L of the router logits
    gate_norm_sum: np.ndarray | None = None  # [E] Σ over routed tokens of gate · ‖output‖₂
    output_max: np.ndarray | None = None     # [E] max |down-projection output|

    @classmethod
    def from_stats(cls, st: dict) -> "ExpertStats":
        get = lambda k: None if k not in st else np.asarray(st[k], np.float64)
        return cls(get("counts"), get("logit_gram"), get("gate_norm_sum"), get("output_max"))

    def subset(self, idx: Sequence[int]) -> "ExpertStats":
        """The statistics of experts `idx` (renumbered 0..len(idx)-1)."""
        i = np.asarray(idx, int)
        pick = lambda v: None if v is None else v[i]
        return ExpertStats(self.counts[i], self.logit_gram[np.ix_(i, i)],
                           pick(self.gate_norm_sum), pick(self.output_max))


class ExpertReducer:
    """Base: chooses a ReductionPlan for one MoE layer."""

    needs_outputs: bool = False  # `plan` gets an `error(kept)` callback over calibration tokens
    needs_expert_outputs: bool = False  # reads ExpertStats.gate_norm_sum / output_max

    def plan(self, stats: ExpertStats, k: int,
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

    def plan(self, stats, k, error=None):
        return keep_plan(most_used(stats.counts, k))


@EXPERT_REDUCERS.register("reconstruction")
class ReconstructionPruning(ExpertReducer):
    """Greedily drop the expert whose removal changes the layer output least."""

    needs_outputs = True

    def plan(self, stats, k, error=None):
        if error is None:
            raise ValueError("expert reduction 'reconstruction' needs the layer's outputs")
        kept = list(range(len(stats.counts)))
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

    def plan(self, stats, k, error=None):
        counts = np.asarray(stats.counts, np.float64)
        if k == 0:
            return ReductionPlan((), ())
        dominant = most_used(counts, k)
        sim = logit_similarity(stats.logit_gram)
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


def reap_saliency(stats: ExpertStats) -> np.ndarray:
    """REAP's saliency [E]: Σ over routed tokens of gate · ‖output‖₂, divided by the routed
    tokens (0 for an expert no calibration token reaches)."""
    if stats.gate_norm_sum is None:
        raise ValueError("expert reduction 'reap' needs the experts' outputs "
                         "(stats.moe_stats(outputs=True))")
    return np.where(stats.counts > 0, stats.gate_norm_sum / np.maximum(stats.counts, 1e-30),
                    0.0)


@EXPERT_REDUCERS.register("reap")
class REAP(ExpertReducer):
    """Keep the K experts of largest router-weighted activation: mean over routed tokens of
    gate weight times output norm (REAP)."""

    needs_expert_outputs = True

    def plan(self, stats, k, error=None):
        sal = reap_saliency(stats)
        order = sorted(range(len(sal)), key=lambda e: (-float(sal[e]), e))
        return keep_plan(order[:k])


def constrained_plan(reducer: ExpertReducer, stats: ExpertStats, k: int,
                     protected: Sequence[int] = (), dropped: Sequence[int] = (),
                     error: Callable[[Sequence[int]], float] | None = None) -> ReductionPlan:
    """`reducer`'s plan for K experts with `protected` experts kept alone in their groups and
    `dropped` experts left out: the reducer plans K - |protected| experts among the others
    (its `error(kept)` sees the protected experts as kept). `dropped` wins over `protected`."""
    n = len(stats.counts)
    dropped = sorted(set(int(e) for e in dropped))
    protected = sorted(set(int(e) for e in protected) - set(dropped))
    if len(protected) > k:
        raise ValueError(f"PruneConfig.num_experts={k}: the layer has {len(protected)} protected "
                         f"super experts {protected}, more than it keeps; keep more experts or "
                         f"set PruneConfig.protect_super_experts=False")
    free = [e for e in range(n) if e not in protected and e not in dropped]
    if len(free) < k - len(protected):
        raise ValueError(f"PruneConfig.num_experts={k}: after PruneConfig.drop_experts drops "
                         f"{dropped}, the layer has {len(free) + len(protected)} experts left")
    if not protected and not dropped:
        return reducer.plan(stats, k, error)
    sub_error = None if error is None else (
        lambda kept: error(sorted([free[i] for i in kept] + protected)))
    sub = reducer.plan(stats.subset(free), k - len(protected), sub_error) if free else \
        ReductionPlan((), ())
    groups = [tuple(free[i] for i in g) for g in sub.groups] + [(e,) for e in protected]
    weights = list(sub.weights) + [(1.0,) for _ in protected]
    order = sorted(range(len(groups)), key=lambda g: groups[g][0])
    return ReductionPlan(tuple(groups[g] for g in order), tuple(weights[g] for g in order))


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
