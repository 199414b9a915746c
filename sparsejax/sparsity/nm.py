"""N:M semi-structured sparsity: magnitude N:M masks, SR-STE pieces and learnable
N:M masks (Gumbel-softmax over the C(M, N) patterns of each group, as in MaskLLM).

Groups are ``M`` consecutive entries along ``axis`` (default -2: the input
dimension of a flax ``[..., d_in, d_out]`` kernel).
"""
from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def check_nm(n: int, m: int) -> None:
    """Raises ``ValueError`` unless ``1 <= n <= m``."""
    if int(m) != m or m < 1:
        raise ValueError(f"m: {m!r} must be a positive integer")
    if int(n) != n or not 1 <= n <= m:
        raise ValueError(f"n: {n!r} must be an integer in [1, m={m}] (N:M keeps N of every M)")


def check_groupable(shape: tuple[int, ...], m: int, axis: int, name: str) -> None:
    """Raises ``ValueError`` if the grouped dimension of ``name`` is not divisible by ``m``."""
    if len(shape) < 2:
        raise ValueError(f"{name}: N:M needs a kernel of rank >= 2, got shape {shape}")
    d = shape[axis]
    if d % m:
        raise ValueError(
            f"{name}: dimension {axis} of shape {shape} has size {d}, not divisible by M={m}; "
            "exclude this param or choose M dividing it")


def _grouped(x: jax.Array, m: int, axis: int) -> jax.Array:
    """``x`` with ``axis`` moved last and split into ``[..., d // m, m]``."""
    y = jnp.moveaxis(x, axis, -1)
    return y.reshape(*y.shape[:-1], y.shape[-1] // m, m)


def _ungrouped(g: jax.Array, shape: tuple[int, ...], axis: int) -> jax.Array:
    moved = list(shape)
    d = moved.pop(axis % len(shape))
    y = g.reshape(*moved, d)
    return jnp.moveaxis(y, -1, axis)


def nm_mask(w: jax.Array, n: int, m: int, axis: int = -2) -> jax.Array:
    """Keeps the ``n`` largest-magnitude entries of every group of ``m`` (exactly n; ties by index)."""
    return nm_topk(jnp.abs(w), n, m, axis)


def nm_topk(scores: jax.Array, n: int, m: int, axis: int = -2) -> jax.Array:
    """Keeps the ``n`` highest-scoring entries of every group of ``m`` (exactly n; ties by index)."""
    check_nm(n, m)
    check_groupable(scores.shape, m, axis, "scores")
    g = _grouped(scores.astype(jnp.float32), m, axis)
    order = jnp.argsort(-g, axis=-1, stable=True)
    ranks = jnp.argsort(order, axis=-1)
    return _ungrouped(ranks < n, scores.shape, axis)


def nm_group_counts(mask: jax.Array, m: int, axis: int = -2) -> jax.Array:
    """Kept count of every group: ``[..., d // m]`` (for checks)."""
    return jnp.sum(_grouped(mask.astype(jnp.int32), m, axis), axis=-1)


def srste_refine(grad: jax.Array, w: jax.Array, mask: jax.Array, lam: float) -> jax.Array:
    """SR-STE gradient: the straight-through gradient plus ``lam * (1 - mask) * w``."""
    return grad + lam * jnp.where(mask, jnp.zeros_like(w), w)


# --- learnable N:M -----------------------------------------------------------------


def patterns(n: int, m: int) -> np.ndarray:
    """The C(m, n) candidate masks of one group: ``[C, m]`` float32 (0/1)."""
    check_nm(n, m)
    out = np.zeros((len(list(itertools.combinations(range(m), n))), m), np.float32)
    for i, idx in enumerate(itertools.combinations(range(m), n)):
        out[i, list(idx)] = 1.0
    return out


def logits_shape(shape: tuple[int, ...], n: int, m: int, axis: int = -2) -> tuple[int, ...]:
    """Shape of the mask logits of a kernel: ``moveaxis(kernel, axis, -1)`` with the last
    dimension ``d`` replaced by ``[d // m, C(m, n)]``."""
    moved = list(shape)
    d = moved.pop(axis % len(shape))
    return (*moved, d // m, patterns(n, m).shape[0])


def init_logits(w: jax.Array, n: int, m: int, axis: int = -2, prior_strength: float = 3.0) -> jax.Array:
    """Logits favouring the magnitude N:M pattern by ``prior_strength`` (0 = uniform prior)."""
    check_groupable(w.shape, m, axis, "w")
    pats = jnp.asarray(patterns(n, m))
    kept = _grouped(jnp.abs(w).astype(jnp.float32), m, axis) @ pats.T  # [..., d/m, C]
    best = jax.nn.one_hot(jnp.argmax(kept, axis=-1), pats.shape[0], dtype=jnp.float32)
    return prior_strength * best


def soft_mask(logits: jax.Array, shape: tuple[int, ...], n: int, m: int, axis: int = -2, *,
              tau, kappa, rng: jax.Array | None) -> jax.Array:
    """Differentiable mask of ``shape``: ``softmax((kappa * logits + gumbel) / tau) @ patterns``.

    ``rng=None`` drops the Gumbel noise (deterministic soft mask).
    """
    z = kappa * logits.astype(jnp.float32)
    if rng is not None:
        z = z + jax.random.gumbel(rng, z.shape, jnp.float32)
    y = jax.nn.softmax(z / tau, axis=-1)
    return _ungrouped(y @ jnp.asarray(patterns(n, m)), shape, axis)


def hard_mask(logits: jax.Array, shape: tuple[int, ...], n: int, m: int, axis: int = -2) -> jax.Array:
    """Bool mask from the most likely pattern of every group (exactly n of m kept)."""
    pats = jnp.asarray(patterns(n, m))
    y = jax.nn.one_hot(jnp.argmax(logits, axis=-1), pats.shape[0], dtype=jnp.float32)
    return _ungrouped(y @ pats, shape, axis) > 0.5
