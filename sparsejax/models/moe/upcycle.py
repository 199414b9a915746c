"""Sparse upcycling (Komatsuzaki et al. 2022): start an MoE model from a dense checkpoint.

Every expert of an MoE layer becomes a copy of the dense MLP at the same place in the model,
the router is freshly initialized, and every other parameter is copied unchanged. With
renormalized top-k routing the upcycled model computes exactly the dense function at step 0.
"""
from __future__ import annotations

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


@gin.configurable
def upcycle_params(dense_params: Any, moe_params_template: Any, rng: jax.Array, *,
                   dense_mlp_name: str = "mlp", moe_name: str = "moe") -> Any:
    """Builds MoE params from dense params.

    dense_params: param tree of the dense model (plain arrays or logically-partitioned boxes).
    moe_params_template: param tree of the MoE model (e.g. its `init`), whose MoE layers are
    modules named `moe_name` with params `router_kernel`, `experts/{wi_gate,wi_up,wo}` and
    optionally `shared_experts/...`. The dense MLP at the same place is named `dense_mlp_name`.
    Shared experts keep their template (fresh) values. Returns a tree shaped like the template.
    Raises ValueError when an MLP shape or any other param does not match.
    """
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
