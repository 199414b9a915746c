"""Dispatch strategies: route tokens to experts, run the experts, combine the outputs.

Every strategy has the signature
    fn(x [T, embed], routing: Routing, w: ExpertWeights, capacity: int, act: Gated,
       observe: RowObserver | None) -> (y [T, embed], dropped)
where `dropped` is the number of active assignments that were not computed (float32 scalar).

* "onehot": one-hot dispatch/combine einsums into a [experts, capacity] buffer; assignments
  past an expert's capacity are dropped. The readable reference (GShard / Switch).
* "ragged_dot": dropless. Sort assignments by expert, one grouped matmul per projection with
  `jax.lax.ragged_dot`, unsort and combine. XLA:CPU's ragged_dot does work and memory of
  experts x tokens (a [g, m, n] intermediate; at 64 experts 20-30x slower than one-hot
  dispatch), so prefer "pallas_gmm" on CPU.
* "pallas_gmm": the same as "ragged_dot" with `pallas_kernels.grouped_matmul.ops.gmm`: the
  Pallas kernel on GPU/TPU, on CPU its XLA padded-tile formulation (work proportional to the
  routed tokens).
"""
from __future__ import annotations

import functools

from typing import Callable

import gin
import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul import ops as gmm_ops
from sparsejax.models.activations import Gated
from sparsejax.models.moe.experts import (SWIGLU, ExpertWeights, GroupedMatmul, batched_ffn,
                                          grouped_ffn, ragged_dot)
from sparsejax.models.moe.router import Routing
from sparsejax.models.remat import tag
from sparsejax.registry import Registry

DISPATCHES: Registry[Callable] = Registry("MoE dispatch")
# Called with (gate activation [rows, mlp], intermediate [rows, mlp], token of each row [rows]
# int32, -1 where a row holds no assignment): models/act_record.py.
RowObserver = Callable[[jax.Array, jax.Array, jax.Array], None]


def capacity_positions(expert_index: jax.Array, mask: jax.Array, num_experts: int) -> jax.Array:
    """Slot of each assignment in its expert's buffer, in GShard priority order: all first
    choices (in token order), then all second choices, ... Inactive assignments take no slot.

    expert_index, mask: [T, k] -> positions [T, k] int32 (meaningless where mask is False).
    """
    oh = jax.nn.one_hot(expert_index.T, num_experts, dtype=jnp.int32)  # [k, T, E]
    oh = oh * mask.T[..., None].astype(jnp.int32)
    k, t, e = oh.shape
    pos = jnp.cumsum(oh.reshape(k * t, e), axis=0).reshape(k, t, e) - 1
    return jnp.sum(pos * oh, axis=-1).T.astype(jnp.int32)


def sort_by_expert(expert_index: jax.Array, mask: jax.Array, num_experts: int):
    """Stable order that groups active assignments by expert (inactive ones last).

    expert_index, mask: [A] -> (order [A], group_sizes [E] int32).
    """
    key = jnp.where(mask, expert_index, num_experts)
    order = jnp.argsort(key, stable=True)
    sizes = jax.ops.segment_sum(jnp.ones_like(key), key, num_experts + 1)[:num_experts]
    return order, sizes.astype(jnp.int32)


def inverse_permutation(order: jax.Array) -> jax.Array:
    return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def combine(y_flat: jax.Array, routing: Routing) -> jax.Array:
    """Sums weighted per-assignment outputs y_flat [A, embed] back onto tokens [T, embed]."""
    w = (routing.weight * routing.mask).astype(y_flat.dtype)[:, None]
    if routing.token_major:
        return jnp.sum((y_flat * w).reshape(routing.num_tokens, routing.k, -1), axis=1)
    return jax.ops.segment_sum(y_flat * w, routing.token_index, routing.num_tokens)


def _slot_tokens(dispatch: jax.Array) -> jax.Array:
    """Token of each buffer slot of a one-hot dispatch [T, E, C] -> [E * C] (-1: empty)."""
    used = jnp.sum(dispatch, axis=0) > 0
    return jnp.where(used, jnp.argmax(dispatch, axis=0), -1).reshape(-1).astype(jnp.int32)


@DISPATCHES.register("onehot")
def onehot_dispatch(x: jax.Array, routing: Routing, w: ExpertWeights, capacity: int,
                    act: Gated = SWIGLU, observe: RowObserver | None = None):
    """Reference strategy: one-hot einsums with a fixed capacity per expert."""
    t, e = routing.num_tokens, routing.num_experts
    if routing.token_major:
        idx = routing.expert_index.reshape(t, routing.k)
        mask = routing.mask.reshape(t, routing.k)
        pos = capacity_positions(idx, mask, e)
        keep = mask & (pos < capacity)
        oh_e = jax.nn.one_hot(idx, e, dtype=x.dtype) * keep[..., None].astype(x.dtype)
        oh_c = jax.nn.one_hot(pos, capacity, dtype=x.dtype)
        dispatch = jnp.einsum("tke,tkc->tec", oh_e, oh_c)  # [T, E, C]
        gate = routing.weight.reshape(t, routing.k).astype(x.dtype)
        comb = jnp.einsum("tke,tkc,tk->tec", oh_e, oh_c, gate)
        dropped = jnp.sum(mask & ~keep).astype(jnp.float32)
    else:  # expert-major: routing already holds exactly C_r tokens per expert
        c_r = routing.token_index.shape[0] // e
        if c_r > capacity:
            raise ValueError(f"expert-choice capacity {c_r} exceeds the buffer capacity "
                             f"{capacity}")
        tok = jax.nn.one_hot(routing.token_index.reshape(e, c_r), t, dtype=x.dtype)  # [E,Cr,T]
        tok = tok * routing.mask.reshape(e, c_r, 1).astype(x.dtype)
        dispatch = jnp.pad(tok, ((0, 0), (0, capacity - c_r), (0, 0))).transpose(2, 0, 1)
        gate = jnp.pad(routing.weight.reshape(e, c_r), ((0, 0), (0, capacity - c_r)))
        comb = dispatch * gate.astype(x.dtype)[None]
        dropped = jnp.zeros((), jnp.float32)
    expert_in = tag(jnp.einsum("tec,td->ecd", dispatch, x), "moe_dispatch")
    obs = None if observe is None else (
        lambda a, h: observe(a.reshape(-1, a.shape[-1]), h.reshape(-1, h.shape[-1]),
                             _slot_tokens(dispatch)))
    expert_out = tag(batched_ffn(expert_in, w, act, obs), "moe_expert_out")
    return jnp.einsum("tec,ecd->td", comb, expert_out), dropped


def grouped_dispatch(x: jax.Array, routing: Routing, w: ExpertWeights,
                     gmm: GroupedMatmul = ragged_dot, act: Gated = SWIGLU,
                     observe: RowObserver | None = None):
    """Dropless: sort by expert, grouped matmuls, unsort, combine."""
    order, sizes = sort_by_expert(routing.expert_index, routing.mask, routing.num_experts)
    x_sorted = tag(jnp.take(x, routing.token_index[order], axis=0), "moe_dispatch")  # [A, embed]
    obs = None
    if observe is not None:
        filled = jnp.arange(order.shape[0]) < jnp.sum(sizes)
        rows = jnp.where(filled, routing.token_index[order], -1).astype(jnp.int32)
        obs = lambda a, h: observe(a, h, rows)
    y_sorted = tag(grouped_ffn(x_sorted, sizes, w, gmm, act, obs), "moe_expert_out")
    y_flat = jnp.take(y_sorted, inverse_permutation(order), axis=0)
    return combine(y_flat, routing), jnp.zeros((), jnp.float32)


@gin.configurable
def pallas_gmm(backend: str | None = None, interpret: bool = False) -> GroupedMatmul:
    """The Pallas grouped matmul. `backend`/`interpret` force a kernel (e.g. backend='gpu',
    interpret=True runs the Triton kernel in interpret mode on CPU); by default the op picks
    the device's kernel, or its XLA formulation (backend 'xla') on CPU."""
    if backend is None and not interpret:
        return gmm_ops.gmm
    return functools.partial(gmm_ops.gmm, backend=backend, interpret=interpret)


@DISPATCHES.register("ragged_dot")
def ragged_dot_dispatch(x: jax.Array, routing: Routing, w: ExpertWeights, capacity: int,
                        act: Gated = SWIGLU, observe: RowObserver | None = None):
    """Dropless: sort by expert, `jax.lax.ragged_dot` per projection, unsort, combine."""
    return grouped_dispatch(x, routing, w, ragged_dot, act, observe)


@DISPATCHES.register("pallas_gmm")
def pallas_gmm_dispatch(x: jax.Array, routing: Routing, w: ExpertWeights, capacity: int,
                        act: Gated = SWIGLU, observe: RowObserver | None = None):
    """Dropless with the grouped-matmul op (Pallas kernel on GPU/TPU, XLA tiles on CPU)."""
    return grouped_dispatch(x, routing, w, pallas_gmm(), act, observe)


def get_dispatch(name: str) -> Callable:
    """Returns fn(x, routing, w, capacity, act=SWIGLU, observe=None) -> (y, dropped) for a
    registered strategy name."""
    return DISPATCHES.get(name, "dispatch")
