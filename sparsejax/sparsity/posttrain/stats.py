"""Calibration statistics of a layer's inputs: H = sum_t x_t x_tᵀ, sum_t x_t and the token
count, accumulated over batches of calibration tokens (float32).

Everything the post-training methods need derives from these: Wanda's ‖X_j‖₂ = sqrt(H_jj),
SparseGPT's Hessian H + λI, DSnoT's input means and variances, the reconstruction error
‖(W - W')X‖² = tr(Δᵀ H Δ). Layers that read the same input share one entry (q/k/v; gate/up).

MoE experts get per-expert statistics from the tokens the router sends them
(`moe_stats`): H_e = sum over routed tokens, for the experts' input and for the input of
their down projection, plus the routed-token counts and the Gram matrix of the router
logits that expert pruning and merging use.

Inside a jitted function whose token axis is sharded over data-parallel devices, the
contractions over tokens here are sums over a sharded axis, so the compiled program
all-reduces (psums) the partial sums of every device: the statistics are those of the
whole calibration set on every device.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from sparsejax.models.activations import gated
from sparsejax.models.moe.dispatch import capacity_positions
from sparsejax.models.moe.expert_parallel import buffer_capacity
from sparsejax.models.moe.router import ROUTERS

PyTree = Any


@flax.struct.dataclass
class InputStats:
    """Sums over calibration tokens of one input (leading expert axis for experts)."""

    hessian: jax.Array  # [..., in, in]  sum_t w_t x_t x_tᵀ
    total: jax.Array    # [..., in]      sum_t w_t x_t
    count: jax.Array    # [...]          sum_t w_t

    def __add__(self, other: "InputStats") -> "InputStats":
        return jax.tree.map(jnp.add, self, other)

    @property
    def sq_norms(self) -> jax.Array:
        """‖X_j‖₂² per input feature j (Wanda's statistic squared)."""
        return jnp.diagonal(self.hessian, axis1=-2, axis2=-1)

    @property
    def mean(self) -> jax.Array:
        return self.total / jnp.maximum(self.count, 1.0)[..., None]

    @property
    def var(self) -> jax.Array:
        """Per-feature variance over tokens (population)."""
        n = jnp.maximum(self.count, 1.0)[..., None]
        return jnp.maximum(self.sq_norms / n - self.mean ** 2, 0.0)


@flax.struct.dataclass
class LayerCalibration:
    """What a calibrated criterion or solver knows about one layer: the statistics of its
    input, the squared per-sequence gradients of its kernel summed over the calibration
    sequences (None unless a criterion needs them) and the number of those sequences."""

    stats: InputStats
    grad_sq: jax.Array | None = None
    num_samples: int = flax.struct.field(pytree_node=False, default=1)


def input_stats(x: jax.Array, w: jax.Array) -> InputStats:
    """x: [tokens, in], w: [tokens] token weights (0 for padding) -> InputStats."""
    x = jnp.where(w[:, None] > 0, x.astype(jnp.float32), 0.0)  # padding may hold NaNs
    xw = x * w[:, None]
    return InputStats(xw.T @ x, jnp.sum(xw, 0), jnp.sum(w))


def expert_input_stats(x: jax.Array, a: jax.Array) -> InputStats:
    """Per-expert statistics. x: [tokens, in] (or [tokens, E, in]: a different input per
    expert), a: [tokens, E] routed-token weights -> InputStats with a leading E axis."""
    x = x.astype(jnp.float32)
    if x.ndim == 2:
        h = jnp.einsum("te,td,tf->edf", a, x, x)
        return InputStats(h, jnp.einsum("te,td->ed", a, x), jnp.sum(a, 0))
    h = jnp.einsum("te,ted,tef->edf", a, x, x)
    return InputStats(h, jnp.einsum("te,ted->ed", a, x), jnp.sum(a, 0))


def group_inputs(inputs: dict[str, jax.Array], keep: set[str]) -> tuple[dict[str, jax.Array],
                                                                         dict[str, str]]:
    """Recorded inputs of the kernels in `keep`, deduplicated: ({group: x}, {kernel: group}),
    a group named by its first kernel (q/k/v read one array, so they share one group)."""
    groups, of, seen = {}, {}, {}
    for path, x in inputs.items():
        if path not in keep:
            continue
        key = seen.setdefault(id(x), path)
        groups.setdefault(key, x)
        of[path] = key
    return groups, of


def routing_weights(mod: nn.Module, moe_params: PyTree, moe_state: PyTree | None,
                    x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(router logits [T, E] float32, routed assignments [T, E] in {0, 1}, gate weights
    [T, E]: the weight each routed expert's output is combined with, 0 where not routed) of
    an MoeMlp `mod` (its gin-configured settings) on x [b, s, embed], as the layer routes them
    (assignments past an expert's capacity are dropped when its dispatch is 'onehot')."""
    b, s, d = x.shape
    t, e, k = b * s, mod.num_experts, mod.top_k
    logits = x.reshape(t, d).astype(jnp.float32) @ moe_params["router_kernel"].astype(
        jnp.float32)
    if "router_bias" in moe_params:  # MoeMlp.router_bias (gpt-oss)
        logits = logits + moe_params["router_bias"].astype(jnp.float32)
    bias = None
    if (mod.bias_update_rate > 0 or mod.correction_bias) and moe_state is not None:
        bias = moe_state.get("bias")
    capacity = min(t, buffer_capacity(t, k, e, mod.capacity_factor))
    routing = ROUTERS.get(mod.router, "MoeMlp.router")().route(
        logits, top_k=k, capacity=capacity, bias=bias)
    mask = routing.mask
    if mod.dispatch == "onehot" and routing.token_major:
        idx = routing.expert_index.reshape(t, k)
        pos = capacity_positions(idx, mask.reshape(t, k), e)
        mask = (mask.reshape(t, k) & (pos < capacity)).reshape(-1)
    a = jnp.zeros((t, e), jnp.float32).at[routing.token_index, routing.expert_index].add(
        mask.astype(jnp.float32))
    g = jnp.zeros((t, e), jnp.float32).at[routing.token_index, routing.expert_index].add(
        jnp.where(mask, routing.weight, 0.0))
    return logits, jnp.minimum(a, 1.0), g


def expert_outputs(mod: nn.Module, moe_params: PyTree, xt: jax.Array, a: jax.Array,
                   g: jax.Array) -> dict[str, jax.Array]:
    """What REAP and super-expert detection read from the experts' outputs y_e = f_e(x) (the
    down projection's output, before the gate weight) on the tokens routed to them:
    {'gate_norm_sum': Σ_t a_te g_te ‖y_e(x_t)‖₂ [E], 'output_max': max over routed tokens
    and features of |y_e(x_t)| [E]}. xt [T, embed]; a, g [T, E] from `routing_weights`
    (a holds token weights: 0 for padding). One expert at a time (memory T x embed)."""
    act = gated(mod.activation, mod.activation_threshold, *mod.swiglu)  # the layer's own
    ex = moe_params["experts"]
    xt = jnp.where(jnp.any(a > 0, axis=1, keepdims=True), xt.astype(jnp.float32), 0.0)
    names = ("wi_gate", "wi_up", "wo")
    # MoeMlp.expert_bias (gpt-oss): each projection's per-expert bias, else zeros
    biases = tuple(ex.get(f"{n}_bias", jnp.zeros(ex[n].shape[::2], jnp.float32))
                   for n in names)

    def one(args):
        wg, wu, wo, bg, bu, bo, ae, ge = args
        f32 = jnp.float32
        _, h = act(xt @ wg.astype(f32) + bg.astype(f32), xt @ wu.astype(f32) + bu.astype(f32))
        y = h @ wo.astype(f32) + bo.astype(f32)  # [T, embed]
        norm = jnp.sqrt(jnp.sum(y * y, axis=-1))
        peak = jnp.max(jnp.where(ae[:, None] > 0, jnp.abs(y), 0.0))
        return jnp.sum(ae * ge * norm), peak

    s, peak = jax.lax.map(one, (*(ex[n] for n in names), *biases, a.T, g.T))
    return {"gate_norm_sum": s, "output_max": peak}


def moe_stats(mod: nn.Module, moe_params: PyTree, moe_state: PyTree | None, x: jax.Array,
              w: jax.Array, prefix: str, keep: set[str], outputs: bool = False
              ) -> dict[str, Any]:
    """Statistics of one MoE layer on x [b, s, embed] with token weights w [b*s]:
    {'<prefix>/experts/wi': per-expert input stats (gate and up), '.../wo': per-expert stats
    of the down projection's input, shared experts like dense layers, 'counts': routed tokens
    per expert [E], 'logit_gram': Lᵀ L of the router logits [E, E]}, and with `outputs` the
    values of `expert_outputs` ('gate_norm_sum', 'output_max'; batches combine with
    `add_stats`, which takes the max of 'output_max'). Kernels outside `keep` are skipped."""
    logits, a, g = routing_weights(mod, moe_params, moe_state, x)
    a = a * w[:, None]
    xt = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    out: dict[str, Any] = {"counts": jnp.sum(a, 0),
                           "logit_gram": jnp.einsum("te,tf->ef", logits * w[:, None], logits)}
    if outputs:
        out.update(expert_outputs(mod, moe_params, xt, a, g))
    ex = moe_params["experts"]
    act = gated(mod.activation, mod.activation_threshold, *mod.swiglu)  # the layer's own
    if {f"{prefix}/experts/wi_gate", f"{prefix}/experts/wi_up"} & keep:
        out["experts/wi"] = expert_input_stats(xt, a)
    if f"{prefix}/experts/wo" in keep:
        dt = ex["wi_gate"].dtype
        proj = {n: jnp.einsum("td,edf->tef", xt.astype(dt), ex[n]) + (
            ex[f"{n}_bias"][None].astype(dt) if f"{n}_bias" in ex else 0)  # MoeMlp.expert_bias
            for n in ("wi_gate", "wi_up")}
        out["experts/wo"] = expert_input_stats(act(proj["wi_gate"], proj["wi_up"])[1], a)
    if "shared_experts" in moe_params:
        sh = moe_params["shared_experts"]
        if {f"{prefix}/shared_experts/wi_gate", f"{prefix}/shared_experts/wi_up"} & keep:
            out["shared_experts/wi"] = input_stats(xt, w)
        if f"{prefix}/shared_experts/wo" in keep:
            h = act(xt @ sh["wi_gate"].astype(jnp.float32), xt @ sh["wi_up"].astype(jnp.float32))[1]
            out["shared_experts/wo"] = input_stats(h, w)
    return out


def add_stats(a: PyTree, b: PyTree) -> PyTree:
    """Two calibration batches' statistics combined: sums, except the maximum for
    'output_max' (`expert_outputs`)."""
    def combine(path, x, y):
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", None))
        return jnp.maximum(x, y) if name == "output_max" else x + y
    return jax.tree_util.tree_map_with_path(combine, a, b)


def moe_group(kernel: str) -> str:
    """The key of a kernel's statistics within moe_stats ('experts/wi_up' -> 'experts/wi')."""
    owner, name = kernel.split("/")[-2:]
    return f"{owner}/{'wo' if name == 'wo' else 'wi'}"
