"""`MoeMlp`: the Mixture-of-Experts MLP block (router -> dispatch -> experts -> combine).

Contract with the trainer:
* aux losses are sown, already weighted, into collection 'aux_loss' (sum them into the loss);
* metrics (expert load [E], dropped fraction, router entropy, unweighted aux losses) are sown
  into 'metrics';
* the auxiliary-loss-free bias lives in collection 'moe_state' ('bias', [E]) and is updated
  when that collection is mutable and `deterministic=False`; its updated value is sown into
  'metrics' as `aux_free_bias` ([E]) with `aux_free_bias_max_abs`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from sparsejax.config import refuse_given
from sparsejax.models.act_record import record, recording
from sparsejax.models.activations import SWIGLU_ALPHA, SWIGLU_LIMIT, check_activation, gated
from sparsejax.models.moe import losses
from sparsejax.models.moe.dispatch import DISPATCHES, get_dispatch, pallas_gmm
from sparsejax.models.moe.expert_parallel import (EXCHANGES, EXPERT_AXIS, buffer_capacity,
                                                  expert_axis_size, expert_parallel_ffn)
from sparsejax.models.moe.experts import Experts, SharedExperts, cast, ragged_dot
from sparsejax.models.moe import forced_router  # noqa: F401  (registers 'forced_balance')
from sparsejax.models.moe.router import ROUTERS

Dtype = Any


@gin.configurable
class MoeMlp(nn.Module):
    """Mixture-of-Experts gated MLP. x: [batch, seq, embed] -> [batch, seq, embed].

    router: a registered router (`ROUTERS`; its own settings are bindings of its class, e.g.
    `SoftmaxTopKRouter.renormalize`); top_k: experts per token (expert choice: average
    experts per token, i.e. capacity = capacity_factor * top_k * tokens / experts; ReLU: the
    maximum).
    dispatch: a registered strategy (`DISPATCHES`). expert_parallel: exchange mode used when the current mesh has
    an 'expert' axis of size > 1 ("all_to_all" with capacity, or dropless "ragged").
    bias_update_rate > 0 turns on auxiliary-loss-free balancing for token-choice routers.
    load_balance_normalization: "assignments" (uniform routing gives a load-balance loss of 1)
    or "tokens" (HF Mixtral's convention: top_k); see losses.load_balance_loss.
    Load-balance losses: `load_balance_weight` over the batch the layer sees (one micro-batch
    under gradient accumulation), `seq_load_balance_weight` per sequence,
    `global_load_balance_weight` with expert frequencies over the whole global batch (all
    micro-batches; all data-parallel and expert-parallel shards, since routing runs on global
    arrays before the expert-parallel `shard_map`), Qwen's global-batch balancing.
    The router param is named `router_kernel` (sparsity code must never prune it).

    Options of released checkpoints: `shared_expert_gate` multiplies the shared experts'
    output by sigmoid(x @ router_shared_gate) (Qwen2-MoE; named
    like the router so sparsity never prunes it); `correction_bias` keeps a selection bias
    in 'moe_state' even without updates (DeepSeek-V3's e_score_correction_bias);
    group-limited top-k (DeepSeek-V3) is a setting of the top-k routers
    (`SigmoidTopKRouter.num_groups` / `top_groups`); `router_bias` adds a learned bias to the
    router logits (param `router_bias` [E], gpt-oss) and `expert_bias` gives each routed
    expert biases on its three projections (`experts/wi_gate_bias`, `wi_up_bias`, `wo_bias`,
    gpt-oss); both are never pruned.
    """

    embed_dim: int
    mlp_dim: int = 256
    num_experts: int = 8
    top_k: int = 2
    router: str = "softmax_topk"
    dispatch: str = "pallas_gmm"  # on CPU the op runs its XLA formulation (backend 'xla')
    capacity_factor: float = 1.25
    num_shared_experts: int = 0
    load_balance_weight: float = 0.01
    load_balance_normalization: str = "assignments"
    seq_load_balance_weight: float = 0.0
    global_load_balance_weight: float = 0.0
    z_loss_weight: float = 0.001
    concentration_weight: float = 0.0
    router_jitter: float = 0.0
    jitter_rng: str = "dropout"
    bias_update_rate: float = 0.0
    expert_parallel: str = "all_to_all"
    shared_expert_gate: bool = False
    correction_bias: bool = False
    router_bias: bool = False
    expert_bias: bool = False
    activation: str = "silu"  # set from ModelConfig.mlp_activation by the transformer
    activation_threshold: float = 0.0  # ModelConfig.activation_threshold
    swiglu: tuple = (SWIGLU_ALPHA, SWIGLU_LIMIT)  # ModelConfig.swiglu_alpha / swiglu_limit
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _validate(self):
        for name in ("embed_dim", "mlp_dim", "num_experts", "top_k"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"MoeMlp.{name}={getattr(self, name)} must be >= 1")
        if self.top_k > self.num_experts:
            raise ValueError(f"MoeMlp.top_k={self.top_k} must be <= num_experts="
                             f"{self.num_experts}")
        if not self.capacity_factor > 0:
            raise ValueError(f"MoeMlp.capacity_factor={self.capacity_factor} must be > 0")
        ROUTERS.get(self.router, "MoeMlp.router")
        DISPATCHES.get(self.dispatch, "MoeMlp.dispatch")
        if self.expert_parallel not in EXCHANGES:
            raise ValueError(f"MoeMlp.expert_parallel={self.expert_parallel!r} is unknown; "
                             f"valid: {EXCHANGES}")
        if self.load_balance_normalization not in losses.LOAD_BALANCE_NORMALIZATIONS:
            raise ValueError(f"MoeMlp.load_balance_normalization={self.load_balance_normalization!r}"
                             f" is unknown; valid: {losses.LOAD_BALANCE_NORMALIZATIONS}")
        check_activation(self.activation, self.activation_threshold, "MoeMlp.activation")
        if self.num_shared_experts < 0:
            raise ValueError(f"MoeMlp.num_shared_experts={self.num_shared_experts} must be >= 0")
        if self.shared_expert_gate and not self.num_shared_experts:
            raise ValueError("MoeMlp.shared_expert_gate=True needs num_shared_experts >= 1")
        if self.global_load_balance_weight < 0:
            raise ValueError(f"MoeMlp.global_load_balance_weight="
                             f"{self.global_load_balance_weight} must be >= 0")
        if self.global_load_balance_weight > 0 and \
                not ROUTERS.get(self.router, "MoeMlp.router").token_choice:
            raise ValueError(f"MoeMlp.global_load_balance_weight="
                             f"{self.global_load_balance_weight} needs a token-choice router; "
                             f"MoeMlp.router={self.router!r} balances by construction")

    def _refuse_ineffective(self, router, n_ep: int) -> None:
        """Settings the user gave that this configuration never reads are refused by name."""
        dropless = self.dispatch != "onehot" and router.token_choice and n_ep == 1
        if dropless:
            refuse_given("MoeMlp.capacity_factor",
                         f"dispatch {self.dispatch!r} is dropless (no capacity) without an "
                         f"expert mesh axis")
        if not router.token_choice:
            for name in ("load_balance_weight", "seq_load_balance_weight",
                         "load_balance_normalization"):
                refuse_given(f"MoeMlp.{name}", f"router {self.router!r} balances by "
                                               f"construction (no load-balance loss)")
        if self.router_jitter <= 0:
            refuse_given("MoeMlp.jitter_rng", "MoeMlp.router_jitter is 0")
        if n_ep == 1:
            refuse_given("MoeMlp.expert_parallel", "the mesh has no 'expert' axis > 1")

    def _sow(self, collection: str, name: str, value: jax.Array):
        if not self.is_initializing():  # keep `init` output free of losses and metrics
            self.sow(collection, name, value)

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        self._validate()
        if x.ndim != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x has shape {x.shape}; expected [batch, seq, {self.embed_dim}]")
        b, s, d = x.shape
        e, k = self.num_experts, self.top_k
        t = b * s
        mesh = jax.sharding.get_abstract_mesh()
        n_ep = expert_axis_size(mesh)
        if e % n_ep:
            raise ValueError(f"MoeMlp.num_experts={e} must be divisible by the '{EXPERT_AXIS}' "
                             f"mesh axis size {n_ep}")

        # --- router (float32) ---
        kernel = self.param("router_kernel", nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
            ("embed", "expert")), (d, e), self.param_dtype)
        xr = x.reshape(t, d).astype(jnp.float32)
        if self.router_jitter > 0 and not deterministic:
            noise = jax.random.uniform(self.make_rng(self.jitter_rng), xr.shape, jnp.float32,
                                       1.0 - self.router_jitter, 1.0 + self.router_jitter)
            xr = xr * noise
        logits = xr @ kernel.astype(jnp.float32)  # [T, E]
        if self.router_bias:
            logits = logits + self.param("router_bias", nn.with_logical_partitioning(
                nn.initializers.zeros, ("expert",)), (e,), self.param_dtype).astype(jnp.float32)
        router = ROUTERS.get(self.router, "MoeMlp.router")()
        token_choice = router.token_choice
        self._refuse_ineffective(router, n_ep)
        bias = None
        if self.bias_update_rate > 0 or self.correction_bias:
            if not token_choice:
                raise ValueError(f"MoeMlp.bias_update_rate={self.bias_update_rate} / "
                                 f"correction_bias={self.correction_bias} need a token-choice "
                                 f"router; MoeMlp.router={self.router!r} is not one")
            bias_var = self.variable("moe_state", "bias", jnp.zeros, (e,), jnp.float32)
            bias = bias_var.value
        capacity = min(t, buffer_capacity(t, k, e, self.capacity_factor))
        if getattr(router, "needs_rng", False):  # e.g. forced random routing
            rng = self.make_rng("router") if self.has_rng("router") else None
            routing = router.route(logits, top_k=k, capacity=capacity, bias=bias, rng=rng)
        else:
            routing = router.route(logits, top_k=k, capacity=capacity, bias=bias)
        updates_bias = (bias is not None and self.bias_update_rate > 0 and not deterministic
                        and self.is_mutable_collection("moe_state")
                        and not self.is_initializing())
        global_counts = self._global_counts(routing, token_choice and (
            self.global_load_balance_weight > 0 or (self.bias_update_rate > 0
                                                    and not deterministic)))

        # --- losses and metrics (global, float32) ---
        for name, (weight, fn) in router.aux_losses(self, logits, routing, b,
                                                    global_counts).items():
            if weight > 0:
                value = fn()
                self._sow("aux_loss", name, weight * value)
                self._sow("metrics", name, value)
        load = routing.expert_load()
        self._sow("metrics", "expert_load", load)
        self._sow("metrics", "router_entropy", losses.router_entropy(routing.probs))
        for name, value in router.metrics(logits, routing).items():
            self._sow("metrics", name, value)

        # --- dispatch + experts ---
        w = cast(Experts(e, d, self.mlp_dim, self.param_dtype, self.expert_bias,
                         name="experts")(), self.dtype)
        xt = x.reshape(t, d).astype(self.dtype)
        act = gated(self.activation, self.activation_threshold, *self.swiglu)
        if n_ep > 1 and token_choice:
            if self.expert_bias:
                raise ValueError(f"MoeMlp.expert_bias=True is not supported with expert "
                                 f"parallelism (an '{EXPERT_AXIS}' mesh axis of size {n_ep}); "
                                 f"use a mesh without an expert axis")
            gmm = pallas_gmm() if self.dispatch == "pallas_gmm" else ragged_dot
            y, dropped = expert_parallel_ffn(
                xt, routing.expert_index.reshape(t, k), routing.weight.reshape(t, k),
                routing.mask.reshape(t, k), w, num_experts=e,
                capacity_factor=self.capacity_factor, exchange=self.expert_parallel, gmm=gmm,
                act=act)
        else:  # local path (expert choice on an expert mesh: GSPMD partitions the einsums)
            observe = (lambda a, h, rows: record(self, a, h, rows)) if recording(self) else None
            y, dropped = get_dispatch(self.dispatch)(xt, routing, w, capacity, act, observe)
        active = jnp.maximum(jnp.sum(routing.mask).astype(jnp.float32), 1.0)
        self._sow("metrics", "dropped_fraction", dropped / active)
        y = y.reshape(b, s, d).astype(self.dtype)
        if self.num_shared_experts:
            shared = SharedExperts(d, self.mlp_dim, self.num_shared_experts, self.dtype,
                                   self.param_dtype, self.activation, self.activation_threshold,
                                   self.swiglu, name="shared_experts")(x)
            if self.shared_expert_gate:
                gate = self.param("router_shared_gate", nn.with_logical_partitioning(
                    nn.initializers.zeros, ("embed", None)), (d, 1), self.param_dtype)
                shared = shared * jax.nn.sigmoid(x.astype(jnp.float32) @ gate.astype(
                    jnp.float32)).astype(shared.dtype)
            y = y + shared

        # --- auxiliary-loss-free bias update (outside the gradient) ---
        if updates_bias:
            counts = (losses.expert_counts(routing.expert_index, routing.mask, e)
                      if global_counts is None else global_counts[0])
            bias_var.value = losses.aux_free_bias_update(bias, counts, self.bias_update_rate)
            self._sow("metrics", "aux_free_bias", bias_var.value)
            self._sow("metrics", "aux_free_bias_max_abs", jnp.max(jnp.abs(bias_var.value)))
        return y

    def _global_counts(self, routing, needed: bool) -> tuple[jax.Array, jax.Array] | None:
        """Expert counts of the whole global batch for the global load-balance loss and the
        bias update. Gradient accumulation (train/accumulate.py) runs a counting pass in
        which this layer writes its batch's counts into the mutable 'moe_counts' collection,
        sums them over micro-batches and passes the sums in that collection to every
        micro-batch's pass, which reads them; None: no counts given, this batch is the whole
        global batch (its own counts are the global ones)."""
        if not needed or self.is_initializing():
            return None
        if self.has_variable("moe_counts", "counts"):
            return (self.get_variable("moe_counts", "counts"),
                    self.get_variable("moe_counts", "tokens"))
        if self.is_mutable_collection("moe_counts"):
            counts = losses.expert_counts(routing.expert_index, routing.mask, routing.num_experts)
            self.put_variable("moe_counts", "counts", counts)
            self.put_variable("moe_counts", "tokens", jnp.int32(routing.num_tokens))
        return None


def num_active_params(layer: MoeMlp) -> int:
    """Parameters touched per token (router + k routed experts + shared experts, with the
    router and expert biases when the layer has them)."""
    per_expert = 3 * layer.embed_dim * layer.mlp_dim
    biases = (layer.num_experts if layer.router_bias else 0) + (
        (2 * layer.mlp_dim + layer.embed_dim) * layer.top_k if layer.expert_bias else 0)
    return (layer.embed_dim * layer.num_experts + per_expert * layer.top_k
            + per_expert * layer.num_shared_experts + biases)

