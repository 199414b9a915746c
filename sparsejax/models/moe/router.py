"""Routers: turn router logits into (token, expert, weight) assignments.

All router math is float32. A router returns a `Routing`, a flat list of assignments that
every dispatch strategy consumes:

* token-choice routers (softmax / sigmoid / ReLU top-k) give `k` assignments per token in
  token-major order (`A = tokens * k`, `k = Routing.k > 0`);
* expert choice gives `capacity` assignments per expert in expert-major order
  (`A = experts * capacity`, `Routing.k == 0`).

Routers are classes registered by name in `ROUTERS` (`MoeMlp.router = 'softmax_topk'`).
Each owns its scores and selection (`route`), the auxiliary losses it adds (`aux_losses`)
and its own metrics; its settings are gin bindings of its class
(`SoftmaxTopKRouter.renormalize = False`), so a setting another router would ignore cannot
be given by mistake. A new router is one file: subclass `Router`, register it.
"""
from __future__ import annotations

from typing import Any, Callable

import gin
import jax
import jax.numpy as jnp
from flax import struct

from sparsejax.models.moe import losses
from sparsejax.registry import Registry


class Routing(struct.PyTreeNode):
    """Assignments of tokens to experts. All arrays have a leading dim `A`."""

    token_index: jax.Array   # [A] int32, token of each assignment
    expert_index: jax.Array  # [A] int32, expert of each assignment
    weight: jax.Array        # [A] float32, combine weight
    mask: jax.Array          # [A] bool, False = inactive assignment (e.g. zero ReLU gate)
    probs: jax.Array         # [T, E] float32, router distribution used by the balance losses
    num_tokens: int = struct.field(pytree_node=False)
    num_experts: int = struct.field(pytree_node=False)
    k: int = struct.field(pytree_node=False)  # >0: token-major, k per token; 0: expert-major

    @property
    def token_major(self) -> bool:
        return self.k > 0

    def expert_load(self) -> jax.Array:
        """Fraction of active assignments per expert: [E], sums to 1 (float32)."""
        counts = jax.ops.segment_sum(self.mask.astype(jnp.float32), self.expert_index,
                                     self.num_experts)
        return counts / jnp.maximum(counts.sum(), 1.0)


def _token_major(idx: jax.Array, weight: jax.Array, mask: jax.Array, probs: jax.Array) -> Routing:
    t, k = idx.shape
    return Routing(
        token_index=jnp.repeat(jnp.arange(t, dtype=jnp.int32), k),
        expert_index=idx.reshape(-1).astype(jnp.int32),
        weight=weight.reshape(-1).astype(jnp.float32),
        mask=mask.reshape(-1),
        probs=probs, num_tokens=t, num_experts=probs.shape[-1], k=k)


GROUP_SCORES = ("top2", "max")


def group_limited(sel: jax.Array, num_groups: int, top_groups: int,
                  group_score: str = "top2") -> jax.Array:
    """Group-limited (node-limited) routing: experts form `num_groups` equal groups; a group's
    score is the sum of its two best selection scores (`group_score='top2'`, DeepSeek-V3; one
    if groups have a single expert) or its best one ('max', DeepSeek-V2's
    group_limited_greedy); only the `top_groups` best groups stay selectable, the others are
    set to -inf. sel: [T, E] -> [T, E]."""
    t, e = sel.shape
    if num_groups <= 1:
        return sel
    if e % num_groups or not 1 <= top_groups <= num_groups:
        raise ValueError(f"MoeMlp.num_groups={num_groups} must divide num_experts={e} and "
                         f"MoeMlp.top_groups={top_groups} be in [1, {num_groups}]")
    if group_score not in GROUP_SCORES:
        raise ValueError(f"group_score={group_score!r} is unknown; valid: {GROUP_SCORES}")
    grouped = sel.reshape(t, num_groups, e // num_groups)
    best = 2 if group_score == "top2" else 1
    scores = jnp.sum(jax.lax.top_k(grouped, min(best, e // num_groups))[0], axis=-1)  # [T, G]
    keep_groups = jax.lax.top_k(scores, top_groups)[1]  # [T, top_groups]
    keep = jnp.any(keep_groups[:, :, None] == jnp.arange(num_groups)[None, None], axis=1)
    return jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(t, e)


def _select(scores: jax.Array, k: int, bias: jax.Array | None, num_groups: int = 1,
            top_groups: int = 1, group_score: str = "top2") -> jax.Array:
    """Top-k expert indices by `scores + bias` (within the best groups when num_groups > 1);
    the bias steers selection only."""
    sel = scores if bias is None else scores + jax.lax.stop_gradient(bias).astype(jnp.float32)
    return jax.lax.top_k(group_limited(sel, num_groups, top_groups, group_score), k)[1]


def softmax_topk(logits: jax.Array, k: int, *, renormalize: bool = True,
                 bias: jax.Array | None = None, num_groups: int = 1,
                 top_groups: int = 1, routed_scaling: float = 1.0,
                 group_score: str = "top2") -> Routing:
    """Softmax over experts, keep the top k (k=1: Switch; k=2 renormalized: Mixtral;
    DeepSeek-V2: not renormalized, times `routed_scaling`, groups scored by their best
    expert).

    logits: [T, E]. Weights are the softmax probs of the chosen experts, renormalized to sum
    to 1 per token when `renormalize`, times `routed_scaling`.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    idx = _select(probs, k, bias, num_groups, top_groups, group_score)
    w = jnp.take_along_axis(probs, idx, axis=-1)
    if renormalize:
        w = w / jnp.sum(w, axis=-1, keepdims=True)
    if routed_scaling != 1.0:
        w = w * routed_scaling
    return _token_major(idx, w, jnp.ones(idx.shape, bool), probs)


def sigmoid_topk(logits: jax.Array, k: int, *, renormalize: bool = True,
                 bias: jax.Array | None = None, routed_scaling: float = 1.0,
                 num_groups: int = 1, top_groups: int = 1) -> Routing:
    """DeepSeek-V3 routing: sigmoid affinities, top-k by affinity + correction bias (within
    the `top_groups` best of `num_groups` expert groups), weights = the chosen affinities
    (without the bias), normalized over the chosen experts when `renormalize`, times
    `routed_scaling`. logits: [T, E]."""
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))
    idx = _select(scores, k, bias, num_groups, top_groups)
    w = jnp.take_along_axis(scores, idx, axis=-1)
    if renormalize:
        w = w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-20)
    probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    return _token_major(idx, w * routed_scaling, jnp.ones(idx.shape, bool), probs)


def relu_topk(logits: jax.Array, k: int, *, bias: jax.Array | None = None) -> Routing:
    """ReLU routing (ReMoE / BlockFFN): gate = relu(logit); a token uses every expert with a
    positive gate, at most `k` of them (k = num_experts gives exact ReLU routing). Inactive
    slots are masked out and cost nothing in the dropless strategies. logits: [T, E]."""
    gates = jax.nn.relu(logits.astype(jnp.float32))
    idx = _select(gates, k, bias)
    w = jnp.take_along_axis(gates, idx, axis=-1)
    probs = gates / (jnp.sum(gates, axis=-1, keepdims=True) + 1e-9)
    return _token_major(idx, w, w > 0, probs)


def expert_choice(logits: jax.Array, capacity: int) -> Routing:
    """Expert-choice routing (Zhou et al. 2022): each expert takes its `capacity` tokens with
    the highest softmax probability. logits: [T, E]."""
    t, e = logits.shape
    if not 1 <= capacity <= t:
        raise ValueError(f"capacity={capacity} must be in [1, num_tokens={t}]")
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    w, tok = jax.lax.top_k(probs.T, capacity)  # [E, C]
    return Routing(
        token_index=tok.reshape(-1).astype(jnp.int32),
        expert_index=jnp.repeat(jnp.arange(e, dtype=jnp.int32), capacity),
        weight=w.reshape(-1), mask=jnp.ones((e * capacity,), bool),
        probs=probs, num_tokens=t, num_experts=e, k=0)


AuxLosses = dict[str, tuple[float, Callable[[], jax.Array]]]  # name -> (weight, loss thunk)


class Router:
    """Base: router logits [T, E] -> `Routing`, plus the aux losses and metrics it owns.

    `layer` in `aux_losses` / `metrics` is the calling `MoeMlp`, for the loss weights shared
    by every router (`z_loss_weight`, `concentration_weight`, `load_balance_weight`, ...)."""

    token_choice: bool = True  # k assignments per token (balancing bias and losses apply)
    needs_rng: bool = False  # True: `route` also takes rng= (the 'router' stream, or None)

    def route(self, logits: jax.Array, *, top_k: int, capacity: int,
              bias: jax.Array | None = None) -> Routing:
        raise NotImplementedError

    def aux_losses(self, layer: Any, logits: jax.Array, routing: Routing, batch: int,
                   global_counts: tuple[jax.Array, jax.Array] | None = None) -> AuxLosses:
        """`global_counts`: (assignments per expert [E], tokens) of the whole global batch
        when the layer sees one micro-batch of it (None: this batch is the global batch)."""
        out = {"router_z_loss": (layer.z_loss_weight, lambda: losses.router_z_loss(logits)),
               "concentration_loss": (layer.concentration_weight,
                                      lambda: losses.concentration_loss(routing.probs))}
        if self.token_choice:
            t, k = routing.num_tokens, routing.k
            idx, m = routing.expert_index.reshape(t, k), routing.mask.reshape(t, k)
            norm = layer.load_balance_normalization
            out["load_balance_loss"] = (
                layer.load_balance_weight,
                lambda: losses.load_balance_loss(routing.probs, idx, m, norm))
            out["seq_load_balance_loss"] = (
                layer.seq_load_balance_weight,
                lambda: losses.sequence_load_balance_loss(routing.probs, idx, m, batch, norm))
            counts = global_counts or (losses.expert_counts(idx, m, routing.num_experts), t)
            out["global_load_balance_loss"] = (
                layer.global_load_balance_weight,
                lambda: losses.load_balance_from_counts(routing.probs, *counts, norm))
        return out

    def metrics(self, logits: jax.Array, routing: Routing) -> dict[str, jax.Array]:
        return {}


ROUTERS: Registry[type[Router]] = Registry("router")


class _TopKRouter(Router):
    """Shared settings of the top-k routers: weight renormalization over the chosen experts
    and DeepSeek-V3's group-limited selection (`num_groups` equal expert groups, top-k only
    within the `top_groups` best)."""

    def __init__(self, renormalize: bool = True, num_groups: int = 1, top_groups: int = 1):
        name = type(self).__name__
        if int(num_groups) != num_groups or num_groups < 1 or \
                not 1 <= top_groups <= num_groups:
            raise ValueError(f"{name}.num_groups={num_groups!r} must be an int >= 1 and "
                             f"{name}.top_groups={top_groups!r} in [1, num_groups]")
        self.renormalize = bool(renormalize)
        self.num_groups, self.top_groups = int(num_groups), int(top_groups)

    def check(self, num_experts: int, top_k: int) -> None:
        name, g = type(self).__name__, self.num_groups
        if num_experts % g:
            raise ValueError(f"{name}.num_groups={g} must divide MoeMlp.num_experts="
                             f"{num_experts}")
        if g > 1 and top_k > self.top_groups * (num_experts // g):
            raise ValueError(f"MoeMlp.top_k={top_k} exceeds the experts of {name}.top_groups="
                             f"{self.top_groups} groups ({num_experts // g} each)")


@gin.configurable
@ROUTERS.register("softmax_topk")
class SoftmaxTopKRouter(_TopKRouter):
    """Softmax over experts, top-k (k=1: Switch; k=2 renormalized: Mixtral). DeepSeek-V2:
    `routed_scaling` multiplies the weights; `group_score='max'` scores an expert group by its
    best expert (group_limited_greedy), 'top2' (default) by its two best."""

    def __init__(self, renormalize: bool = True, num_groups: int = 1, top_groups: int = 1,
                 routed_scaling: float = 1.0, group_score: str = "top2"):
        super().__init__(renormalize, num_groups, top_groups)
        if group_score not in GROUP_SCORES:
            raise ValueError(f"SoftmaxTopKRouter.group_score={group_score!r} is unknown; "
                             f"valid: {GROUP_SCORES}")
        if not float(routed_scaling) > 0:
            raise ValueError(f"SoftmaxTopKRouter.routed_scaling={routed_scaling!r} must be > 0")
        self.routed_scaling, self.group_score = float(routed_scaling), group_score

    def route(self, logits, *, top_k, capacity, bias=None):
        self.check(logits.shape[-1], top_k)
        return softmax_topk(logits, top_k, renormalize=self.renormalize, bias=bias,
                            num_groups=self.num_groups, top_groups=self.top_groups,
                            routed_scaling=self.routed_scaling, group_score=self.group_score)


@gin.configurable
@ROUTERS.register("sigmoid_topk")
class SigmoidTopKRouter(_TopKRouter):
    """Sigmoid affinities, top-k, weights normalized over the chosen experts (DeepSeek-V3)."""

    def __init__(self, renormalize: bool = True, routed_scaling: float = 1.0,
                 num_groups: int = 1, top_groups: int = 1):
        super().__init__(renormalize, num_groups, top_groups)
        self.routed_scaling = float(routed_scaling)

    def route(self, logits, *, top_k, capacity, bias=None):
        self.check(logits.shape[-1], top_k)
        return sigmoid_topk(logits, top_k, renormalize=self.renormalize, bias=bias,
                            routed_scaling=self.routed_scaling, num_groups=self.num_groups,
                            top_groups=self.top_groups)


@gin.configurable
@ROUTERS.register("relu")
class ReluRouter(Router):
    """ReLU gates: every expert with a positive gate, at most top_k (ReMoE / BlockFFN)."""

    def __init__(self, l1_weight: float = 0.0):
        if l1_weight < 0:
            raise ValueError(f"ReluRouter.l1_weight={l1_weight!r} must be >= 0")
        self.l1_weight = float(l1_weight)

    def route(self, logits, *, top_k, capacity, bias=None):
        return relu_topk(logits, top_k, bias=bias)

    def aux_losses(self, layer, logits, routing, batch, global_counts=None):
        out = super().aux_losses(layer, logits, routing, batch, global_counts)
        out["relu_l1_loss"] = (self.l1_weight,
                               lambda: losses.relu_sparsity_loss(jax.nn.relu(logits)))
        return out

    def metrics(self, logits, routing):
        return {"active_experts_per_token":
                jnp.sum(routing.mask).astype(jnp.float32) / routing.num_tokens}


@gin.configurable
@ROUTERS.register("expert_choice")
class ExpertChoiceRouter(Router):
    """Each expert takes its `capacity` tokens of highest softmax probability (Zhou et al.)."""

    token_choice = False

    def route(self, logits, *, top_k, capacity, bias=None):
        return expert_choice(logits, capacity)


def route(name: str, logits: jax.Array, *, top_k: int, capacity: int,
          bias: jax.Array | None = None) -> Routing:
    """Runs the registered router `name` (with its gin settings) on logits [T, E]."""
    return ROUTERS.get(name, "router")().route(logits, top_k=top_k, capacity=capacity, bias=bias)
