"""The activation-sparse decode path: at decode steps of a few rows, projections read only
the weight rows (or columns) of the active entries (pallas_kernels/gather_matmul: Triton on
GPU, XLA on CPU).

At a site with `capacity > 0` (models/thresholds.py), for a step of at most `max_rows` rows:

* input sparsity (TEAL/WINA at a projection input): the union over the rows of the kept
  input entries selects rows of the [in, out] kernel; y = x_kept[:, idx] @ W[idx].
* neuron sparsity (CATS, or a ReLU model's exact zeros: the `gate_act` site): the gate is
  computed, the kept neurons (union over rows) select the up kernel's columns and the down
  kernel's rows, so up and down cost only the active neurons.

For the up projection's columns to be contiguous, the collection `DECODE_WEIGHTS`
('decode_weights') may hold the MLP's up kernel neuron-major (`wi_up_t` [mlp, embed],
infer/sparse_decode.py adds it); without it the columns are gathered from [embed, mlp].

Either way each row keeps its own mask, so the result is the masked dense computation (the
one the same thresholds give at eval) up to float summation order; exactly equal on exactly
representable data (tests). When more entries are active than the site's capacity, that
step falls back to the masked dense product (`lax.cond`): never a different result.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.gather_matmul import ops as gather_ops
from sparsejax.models.thresholds import Site, keep_mask, site

DECODE_WEIGHTS = "decode_weights"


def use_sparse(s: Site | None, rows: int) -> bool:
    return s is not None and s.capacity > 0 and rows <= s.max_rows


def active_slots(keep: jax.Array, capacity: int, block: int = 64) -> tuple[jax.Array, jax.Array]:
    """(idx [capacity] int32 of the entries kept by any row, in order, their count) for keep
    [T, F]. Each entry's slot is its rank among the active entries: a prefix sum taken as two
    small triangular matmuls (within blocks of `block` entries, then over the block totals;
    exact: integers far below 2**24) and one scatter. (`jnp.nonzero` and `jnp.cumsum` cost
    about 3x as much on XLA:CPU at decode widths, a large share of a sparse decode step.)"""
    active = jnp.any(keep, axis=0)
    width = active.shape[0]
    a = jnp.pad(active.astype(jnp.float32), (0, (-width) % block)).reshape(-1, block)
    hi = jax.lax.Precision.HIGHEST
    inner = jnp.dot(a, jnp.triu(jnp.ones((block, block), jnp.float32)), precision=hi)
    totals = inner[:, -1]
    offsets = jnp.dot(totals, jnp.triu(jnp.ones((a.shape[0],) * 2, jnp.float32), 1), precision=hi)
    rank = (inner + offsets[:, None]).reshape(-1)[:width].astype(jnp.int32) - 1
    count = (offsets[-1] + totals[-1]).astype(jnp.int32)
    idx = jnp.zeros((capacity,), jnp.int32).at[jnp.where(active, rank, capacity)].set(
        jnp.arange(width, dtype=jnp.int32), mode="drop")
    return idx, count


Slots = tuple[jax.Array, jax.Array]  # (idx [capacity] int32, count): active_slots' result


def shared_slots(keeps: list[jax.Array | None], sites: list[Site | None], rows: int
                 ) -> Slots | None:
    """One slot list for projections of the same input (attention's q/k/v, the MLP's gate
    and up): the union of their keep masks, with the largest of their capacities; None
    unless every one of them takes the sparse path. With equal thresholds (TEAL calibrates
    them on the same input) the union is each mask; otherwise each projection also visits
    the slots only the others keep, where its own masked input is zero: the same result."""
    if any(k is None for k in keeps) or not all(use_sparse(s, rows) for s in sites):
        return None
    width = keeps[0].shape[-1]
    union = keeps[0]
    for k in keeps[1:]:
        union = union | k
    return active_slots(union, min(width, max(s.capacity for s in sites)))


def project(x: jax.Array, kernel: jax.Array, keep: jax.Array | None, s: Site | None,
            slots: Slots | None = None) -> jax.Array:
    """x [T, K] (already masked by `keep`) @ kernel [K, N], reading only the kept rows of the
    kernel when the site's sparse path applies (`slots`: shared_slots' list, covering
    `keep`, to use instead of this site's own)."""
    if keep is None or not use_sparse(s, x.shape[0]):
        return x @ kernel
    if slots is None:
        slots = active_slots(keep, min(s.capacity, kernel.shape[0]))
    idx, count = slots
    if idx.shape[0] >= kernel.shape[0]:  # a slot for every row: it cannot overflow
        return gather_ops.gather_matmul(x, kernel, idx, count)
    return jax.lax.cond(count <= idx.shape[0],
                        lambda: gather_ops.gather_matmul(x, kernel, idx, count),
                        lambda: x @ kernel)


def neuron_sparse_mlp(gate: jax.Array, x_up: jax.Array, w_up: jax.Array, w_down: jax.Array,
                      gated: Callable, keep_a: jax.Array, s: Site,
                      down_site: Callable[[jax.Array, jax.Array], jax.Array],
                      w_up_t: jax.Array | None = None) -> jax.Array:
    """down(mask(act(gate) * up)) computing up and down for the kept neurons only.

    gate [T, F] (computed); x_up [T, D] the up projection's input; keep_a [T, F] the gate
    activation's mask; `down_site(h, idx)` applies the down projection's own input site
    (if any) to compact h [T, C] at neurons idx; `w_up_t`: w_up stored [F, D], if given."""
    cap = min(s.capacity, gate.shape[-1])
    idx, count = active_slots(keep_a, cap)

    def sparse():
        valid = jnp.arange(cap) < count
        if w_up_t is not None:  # contiguous rows of the neuron-major copy
            up_c = gather_ops.gather_matmul(x_up, w_up_t, idx, count, mode="cols", transpose_w=True)
        else:
            up_c = gather_ops.gather_matmul(x_up, w_up, idx, count, mode="cols")  # [T, C]
        _, h_c = gated(jnp.take(gate, idx, axis=1), up_c)
        keep_c = jnp.take(keep_a, idx, axis=1) & valid[None, :]
        h_c = down_site(jnp.where(keep_c, h_c, jnp.zeros_like(h_c)), idx)
        h_full = jnp.zeros(gate.shape, h_c.dtype).at[:, idx].add(
            jnp.where(valid[None, :], h_c, jnp.zeros_like(h_c)))
        return gather_ops.gather_matmul(h_full, w_down, idx, count)

    def dense():
        _, h = gated(gate, x_up @ w_up)
        h = down_site(jnp.where(keep_a, h, jnp.zeros_like(h)), None)
        return h @ w_down

    return jax.lax.cond(count <= cap, sparse, dense)


def _masked(s: Site | None, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    if s is None:
        return x, None
    keep = keep_mask(s, x)
    return jnp.where(keep, x, jnp.zeros_like(x)), keep


def sparse_decode_applies(module, rows: int,
                          names: tuple[str, ...] = ("wi_gate_in", "wi_up_in", "gate_act", "wo_in")
                          ) -> bool:
    """Whether any of `module`'s sites takes the sparse decode path for `rows` rows."""
    return any(use_sparse(site(module, n), rows) for n in names)


def decode_gated_mlp(module, t: jax.Array, gated: Callable, dtype) -> jax.Array:
    """A GatedMlp's decode step t [T, embed] -> [T, embed] through its sites' sparse paths
    (the same masks as the eval path in models/layers.py)."""
    p = module.variables["params"]
    kg, ku, ko = (p[n]["kernel"].astype(dtype) for n in ("wi_gate", "wi_up", "wo"))
    s_g, s_u, s_a, s_o = (site(module, n) for n in ("wi_gate_in", "wi_up_in", "gate_act", "wo_in"))
    xg, keep_g = _masked(s_g, t)
    xu, keep_u = _masked(s_u, t)
    rows = t.shape[0]
    neuron = use_sparse(s_a, rows)  # up is then read by columns: gate keeps its own rows
    slots = None if neuron else shared_slots([keep_g, keep_u], [s_g, s_u], rows)
    gate = project(xg, kg, keep_g, s_g, slots)

    def down_site(h, idx):
        if s_o is None:
            return h
        scale = s_o.scale if idx is None else jnp.take(s_o.scale, idx)
        keep = jnp.abs(h.astype(jnp.float32)) * scale.astype(jnp.float32) > s_o.threshold
        return jnp.where(keep, h, jnp.zeros_like(h))

    if neuron:
        a = gated(gate, gate)[0]
        ku_t = (module.get_variable(DECODE_WEIGHTS, "wi_up_t").astype(dtype)
                if module.has_variable(DECODE_WEIGHTS, "wi_up_t") else None)
        return neuron_sparse_mlp(gate, xu, ku, ko, gated, keep_mask(s_a, a), s_a, down_site,
                                 ku_t)
    a, h = gated(gate, project(xu, ku, keep_u, s_u, slots))
    if s_a is not None:
        h = jnp.where(keep_mask(s_a, a), h, jnp.zeros_like(h))
    h, keep_o = _masked(s_o, h)
    return project(h, ko, keep_o, s_o)
