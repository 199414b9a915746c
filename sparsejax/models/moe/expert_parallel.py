"""Expert parallelism: experts sharded over the `expert` mesh axis; tokens travel to their
experts' devices and back inside `jax.shard_map`.

Tokens are split over the batch axes ('data', 'fsdp', 'expert' where present); expert
weights over 'expert' (and their mlp dim over 'tensor', with a psum at the end). Exchange
modes:

* "all_to_all": fixed receive buffer of `capacity` slots per (source device, expert), the
  same drop rule as the "onehot" strategy applied to each device's tokens; overflow is
  dropped and counted. Works everywhere, including XLA:CPU.
* "ragged": dropless, `jax.lax.ragged_all_to_all` + grouped matmul (GPU/TPU only; not
  implemented on XLA:CPU). "ragged_emulated" is the same algorithm with the ragged exchange
  emulated by a padded `all_to_all`, so its permutation logic can be tested on CPU.
"""
from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sparsejax.models.moe.dispatch import capacity_positions, inverse_permutation, sort_by_expert
from sparsejax.models.activations import Gated
from sparsejax.models.moe.experts import (SWIGLU, ExpertWeights, GroupedMatmul, batched_ffn,
                                          grouped_ffn, ragged_dot)
from sparsejax.models.remat import tag

EXCHANGES = ("all_to_all", "ragged", "ragged_emulated")
BATCH_AXES = ("data", "fsdp", "expert")
EXPERT_AXIS = "expert"
TENSOR_AXIS = "tensor"


def expert_axis_size(mesh) -> int:
    """Size of the 'expert' axis of `mesh` (1 when the mesh is empty or has no such axis)."""
    if mesh is None or mesh.empty:
        return 1
    return dict(mesh.shape).get(EXPERT_AXIS, 1)


def buffer_capacity(tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert for `tokens` tokens routed to k experts each."""
    return max(1, math.ceil(capacity_factor * tokens * k / num_experts))


def _buffer_exchange(x, idx, weight, mask, w: ExpertWeights, *, num_experts: int,
                     capacity: int, act: Gated = SWIGLU):
    """Per-device body of the all_to_all mode. x: [T, D]; idx/weight/mask: [T, k]."""
    n = jax.lax.axis_size(EXPERT_AXIS)
    t, k = idx.shape
    d = x.shape[-1]
    e_l = num_experts // n
    pos = capacity_positions(idx, mask, num_experts)
    keep = mask & (pos < capacity)
    slot = jnp.where(keep, idx * capacity + pos, num_experts * capacity).reshape(-1)  # [T*k]
    tok = jnp.repeat(jnp.arange(t), k)
    send = jnp.zeros((num_experts * capacity, d), x.dtype).at[slot].set(x[tok], mode="drop")
    recv = jax.lax.all_to_all(send.reshape(n, e_l * capacity, d), EXPERT_AXIS, 0, 0)
    # recv: [source, E_l * C, D] -> per local expert [E_l, source * C, D]
    buf = recv.reshape(n, e_l, capacity, d).transpose(1, 0, 2, 3).reshape(e_l, n * capacity, d)
    buf = tag(buf, "moe_dispatch")
    out = tag(batched_ffn(buf, w, act), "moe_expert_out")
    out = out.reshape(e_l, n, capacity, d).transpose(1, 0, 2, 3).reshape(n, e_l * capacity, d)
    back = jax.lax.all_to_all(out, EXPERT_AXIS, 0, 0).reshape(num_experts * capacity, d)
    y = jnp.take(back, slot, axis=0, mode="fill", fill_value=0)  # [T*k, D]
    gate = (weight * keep).reshape(-1, 1).astype(y.dtype)
    y = jnp.sum((y * gate).reshape(t, k, d), axis=1)
    return y, jnp.sum(mask & ~keep).astype(jnp.float32)


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name):
    """`jax.lax.ragged_all_to_all` (one slice per device) built from a padded all_to_all."""
    L, d = operand.shape
    ar = jnp.arange(L)
    src_idx = jnp.clip(input_offsets[:, None] + ar[None], 0, L - 1)
    chunks = jnp.where((ar[None] < send_sizes[:, None])[..., None], operand[src_idx], 0)
    recv = jax.lax.all_to_all(chunks, axis_name, 0, 0)              # [src, L, D]
    recv_off = jax.lax.all_to_all(output_offsets, axis_name, 0, 0)  # where src writes in mine
    tgt = jnp.where(ar[None] < recv_sizes[:, None], recv_off[:, None] + ar[None],
                    output.shape[0])
    return output.at[tgt.reshape(-1)].set(recv.reshape(-1, d), mode="drop")


def _exclusive_cumsum(a):
    return jnp.cumsum(a) - a


def _ragged_exchange(x, idx, weight, mask, w: ExpertWeights, *, num_experts: int,
                     gmm: GroupedMatmul, exchange, act: Gated = SWIGLU):
    """Per-device body of the dropless ragged mode. x: [T, D]; idx/weight/mask: [T, k]."""
    n = jax.lax.axis_size(EXPERT_AXIS)
    t, k = idx.shape
    d = x.shape[-1]
    e_l = num_experts // n
    a = t * k
    order, sizes = sort_by_expert(idx.reshape(-1), mask.reshape(-1), num_experts)
    x_sorted = jnp.take(x, jnp.repeat(jnp.arange(t), k)[order], axis=0)  # [A, D]
    dev_counts = sizes.reshape(n, e_l)                      # what I send to each device, per expert
    send_sizes = dev_counts.sum(1)
    input_offsets = _exclusive_cumsum(send_sizes)
    recv_counts = jax.lax.all_to_all(dev_counts, EXPERT_AXIS, 0, 0)  # [src, E_l]
    recv_sizes = recv_counts.sum(1)
    recv_offsets = _exclusive_cumsum(recv_sizes)
    output_offsets = jax.lax.all_to_all(recv_offsets, EXPERT_AXIS, 0, 0)
    m = a * n  # worst case: every token of every device picks one of my experts
    recv = exchange(x_sorted, jnp.zeros((m, d), x.dtype), input_offsets, send_sizes,
                    output_offsets, recv_sizes, axis_name=EXPERT_AXIS)
    # rows arrive grouped by (source, local expert): regroup by local expert
    seg = jnp.searchsorted(jnp.cumsum(recv_counts.reshape(-1)), jnp.arange(m), side="right")
    local_e = jnp.where(seg < n * e_l, seg % e_l, e_l)
    order2, sizes2 = sort_by_expert(local_e, local_e < e_l, e_l)
    out = tag(grouped_ffn(tag(jnp.take(recv, order2, axis=0), "moe_dispatch"), sizes2, w, gmm,
                          act), "moe_expert_out")
    out = jnp.take(out, inverse_permutation(order2), axis=0)
    back_offsets = jax.lax.all_to_all(input_offsets, EXPERT_AXIS, 0, 0)
    back = exchange(out, jnp.zeros((a, d), x.dtype), recv_offsets, recv_sizes, back_offsets,
                    send_sizes, axis_name=EXPERT_AXIS)
    y = jnp.take(back, inverse_permutation(order), axis=0)
    gate = (weight * mask).reshape(-1, 1).astype(y.dtype)
    return jnp.sum((y * gate).reshape(t, k, d), axis=1), jnp.zeros((), jnp.float32)


def expert_parallel_ffn(x: jax.Array, expert_index: jax.Array, weight: jax.Array,
                        mask: jax.Array, w: ExpertWeights, *, num_experts: int,
                        capacity_factor: float = 1.25, exchange: str = "all_to_all",
                        gmm: GroupedMatmul = ragged_dot, mesh=None, act: Gated = SWIGLU):
    """Runs the routed experts with the experts sharded over the mesh's 'expert' axis.

    x: [T, embed] (global tokens); expert_index, weight, mask: [T, k] token-major routing;
    w: the full (global) expert weights [E, ...]. `mesh` defaults to the current mesh; `act`:
    the experts' gated activation (models/activations.py).
    Returns (y [T, embed], dropped assignments, a float32 scalar summed over all devices).
    """
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh is None or mesh.empty or EXPERT_AXIS not in mesh.axis_names:
        raise ValueError(f"expert parallelism needs a mesh with an {EXPERT_AXIS!r} axis; got "
                         f"{None if mesh is None else mesh.axis_names}")
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange={exchange!r} is unknown; valid: {EXCHANGES}")
    n = expert_axis_size(mesh)
    if num_experts % n:
        raise ValueError(f"num_experts={num_experts} must be divisible by the 'expert' mesh "
                         f"axis size {n}")
    axes = dict(mesh.shape)
    batch_axes = tuple(a for a in BATCH_AXES if a in axes)
    shards = math.prod(axes[a] for a in batch_axes)
    t, k = expert_index.shape
    if t % shards:
        raise ValueError(f"number of tokens {t} must be divisible by the {shards} batch shards "
                         f"of mesh axes {batch_axes}")
    tp = TENSOR_AXIS if TENSOR_AXIS in axes else None
    if tp and w.wi_gate.shape[-1] % axes[TENSOR_AXIS]:
        tp = None  # mlp dim not divisible: keep it whole on every device
    if exchange == "all_to_all":
        cap = buffer_capacity(t // shards, k, num_experts, capacity_factor)
        body = partial(_buffer_exchange, num_experts=num_experts, capacity=cap, act=act)
    else:
        ex = (jax.lax.ragged_all_to_all if exchange == "ragged"
              else emulated_ragged_all_to_all)
        body = partial(_ragged_exchange, num_experts=num_experts, gmm=gmm, exchange=ex, act=act)

    def per_device(x, idx, weight, mask, w):
        y, dropped = body(x, idx, weight, mask, w)
        if tp:
            y = jax.lax.psum(y, tp)
        return y, jax.lax.psum(dropped, batch_axes)

    tok_spec = P(batch_axes, None)
    w_spec = ExpertWeights(P(EXPERT_AXIS, None, tp), P(EXPERT_AXIS, None, tp),
                           P(EXPERT_AXIS, tp, None))
    fn = jax.shard_map(per_device, mesh=mesh,
                       in_specs=(tok_spec, tok_spec, tok_spec, tok_spec, w_spec),
                       out_specs=(tok_spec, P()))
    return fn(x, expert_index.astype(jnp.int32), weight, mask, w)
