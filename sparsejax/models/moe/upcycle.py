"""Sparse upcycling (Komatsuzaki et al. 2022): start an MoE model from a dense checkpoint.

Every expert of an MoE layer becomes a copy of the dense MLP at the same place in the model,
the router is freshly initialized, and every other parameter is copied unchanged. With
renormalized top-k routing the upcycled model computes exactly the dense function at step 0.

Drop-Upcycling (Nakamura et al. 2025), `reinit_fraction` r > 0: after the copy, each expert
re-initializes floor(r * mlp_dim) of its intermediate dimensions, a random set drawn per
expert (the columns of wi_gate and wi_up and the rows of wo at those indices), from a normal
distribution with the mean and standard deviation of the dense matrix it replaces. Experts
then start different from each other, which the paper finds makes them specialize faster.
"""
from __future__ import annotations

import zlib
from typing import Any

import gin
import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.core import meta

EXPERT_PARAMS = ("wi_gate", "wi_up", "wo")
ROUTER_INIT = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def _unbox(v):
    return v.unbox() if isinstance(v, meta.AxisMetadata) else v


def _rebox(template, value):
    return template.replace_boxed(value) if isinstance(template, meta.AxisMetadata) else value


def _dense_leaf(dense: dict, path: tuple) -> Any:
    """The dense param at `path`, accepting both `.../wi_gate/kernel` and `.../wi_gate`."""
    for p in (path + ("kernel",), path):
        if p in dense:
            return _unbox(dense[p])
    raise ValueError(f"dense_params has no MLP param at {'/'.join(path)}[/kernel]; the dense "
                     f"MLP must be a gated MLP with params {EXPERT_PARAMS}")


def drop_indices(rng: jax.Array, num_experts: int, mlp_dim: int, fraction: float) -> jax.Array:
    """Bool [E, mlp_dim]: each expert's floor(fraction * mlp_dim) re-initialized dimensions,
    a uniformly random set drawn independently per expert."""
    n = int(fraction * mlp_dim)
    keys = jax.random.split(rng, num_experts)
    ranks = jax.vmap(lambda k: jax.random.permutation(k, mlp_dim))(keys)  # [E, F]
    return ranks < n


def drop_upcycle(expert: jax.Array, dense: jax.Array, name: str, dropped: jax.Array,
                 rng: jax.Array) -> jax.Array:
    """Stacked copies `expert` [E, ...] of the dense matrix `dense`, with the entries of the
    dropped intermediate dimensions (`dropped` [E, mlp_dim]; the last axis of wi_gate/wi_up,
    the first of wo) drawn from N(mean(dense), std(dense))."""
    d32 = dense.astype(jnp.float32)
    fresh = jnp.mean(d32) + jnp.std(d32) * jax.random.normal(rng, expert.shape, jnp.float32)
    sel = dropped[:, None, :] if name in ("wi_gate", "wi_up") else dropped[:, :, None]
    return jnp.where(sel, fresh.astype(expert.dtype), expert)


@gin.configurable
def upcycle_params(dense_params: Any, moe_params_template: Any, rng: jax.Array, *,
                   dense_mlp_name: str = "mlp", moe_name: str = "moe",
                   reinit_fraction: float = 0.0) -> Any:
    """Builds MoE params from dense params.

    dense_params: param tree of the dense model (plain arrays or logically-partitioned boxes).
    moe_params_template: param tree of the MoE model (e.g. its `init`), whose MoE layers are
    modules named `moe_name` with params `router_kernel`, `experts/{wi_gate,wi_up,wo}` and
    optionally `shared_experts/...`. The dense MLP at the same place is named `dense_mlp_name`.
    Shared experts keep their template (fresh) values. Returns a tree shaped like the template.
    `reinit_fraction` in [0, 1]: Drop-Upcycling's re-initialized share of each expert's
    intermediate dimensions (module docstring; 0: plain upcycling).
    Raises ValueError when an MLP shape or any other param does not match.
    """
    if isinstance(reinit_fraction, bool) or not 0.0 <= float(reinit_fraction) <= 1.0:
        raise ValueError(f"upcycle_params.reinit_fraction={reinit_fraction!r} must be in [0, 1] "
                         f"(0: plain upcycling)")
    dense = traverse_util.flatten_dict(dense_params)
    template = traverse_util.flatten_dict(moe_params_template)
    out = {}
    for i, (path, tv) in enumerate(sorted(template.items())):
        t_val = _unbox(tv)
        if moe_name in path:
            at = path.index(moe_name)
            prefix, rest = path[:at], path[at + 1:]
            if rest == ("router_kernel",):
                new = ROUTER_INIT(jax.random.fold_in(rng, i), t_val.shape, t_val.dtype)
            elif len(rest) == 2 and rest[0] == "experts" and rest[1] in EXPERT_PARAMS:
                d_val = _dense_leaf(dense, prefix + (dense_mlp_name, rest[1]))
                if tuple(d_val.shape) != tuple(t_val.shape[1:]):
                    raise ValueError(
                        f"dense MLP param {'/'.join(prefix + (dense_mlp_name, rest[1]))} has "
                        f"shape {tuple(d_val.shape)} but the MoE expert param "
                        f"{'/'.join(path)} needs {tuple(t_val.shape[1:])} per expert; the "
                        f"dense mlp_dim and embed_dim must equal the MoE ones")
                new = jnp.broadcast_to(d_val.astype(t_val.dtype)[None], t_val.shape)
                if reinit_fraction > 0:  # the same dimensions for one layer's three matrices
                    layer_key = jax.random.fold_in(
                        rng, zlib.crc32("/".join(map(str, prefix)).encode()))
                    e, f = t_val.shape[0], t_val.shape[-1 if rest[1] != "wo" else 1]
                    dropped = drop_indices(jax.random.fold_in(layer_key, 0), e, f,
                                           float(reinit_fraction))
                    new = drop_upcycle(new, d_val, rest[1], dropped,
                                       jax.random.fold_in(layer_key, 1 + EXPERT_PARAMS.index(
                                           rest[1])))
            else:
                new = t_val  # shared experts etc.: keep the fresh initialization
        else:
            if path not in dense:
                raise ValueError(f"param {'/'.join(path)} of the MoE model is missing from "
                                 f"dense_params")
            d_val = _unbox(dense[path])
            if tuple(d_val.shape) != tuple(t_val.shape):
                raise ValueError(f"param {'/'.join(path)} has shape {tuple(d_val.shape)} in "
                                 f"dense_params but {tuple(t_val.shape)} in the MoE model")
            new = d_val.astype(t_val.dtype)
        out[path] = _rebox(tv, new)
    return traverse_util.unflatten_dict(out)
