"""Rematerialization policies by name (`ModelConfig.remat_policy`), built on
`jax.checkpoint_policies` and the `checkpoint_name` tags the model puts on its activations.

A rematerialized block keeps only what its policy saves for the backward pass and recomputes
the rest, trading FLOPs for activation memory:

* 'none': no remat (everything the backward needs is kept);
* 'full': nothing saved inside a block (its input only), the least memory;
* 'dots_saveable': every matmul output saved, elementwise ops recomputed;
* 'dots_with_no_batch_dims_saveable': matmuls without batch dims (the projections, not the
  attention scores) saved;
* 'save_qkv_proj': the query/key/value projections (after RoPE) saved;
* 'save_attention_out': the attention output (before the out projection) saved, so the
  backward does not recompute attention;
* 'save_moe_dispatch': the MoE layer's dispatched tokens and expert outputs saved, so the
  backward does not redo the routing sort/gather and the expert matmuls;
* 'save_attention_out_and_moe_dispatch': both.

Tags (`NAMES`): 'query_proj', 'key_proj', 'value_proj', 'attention_out' (models/attention.py),
'moe_dispatch', 'moe_expert_out' (models/moe/dispatch.py).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name

_cp = jax.checkpoint_policies
NAMES = ("query_proj", "key_proj", "value_proj", "attention_out", "moe_dispatch",
         "moe_expert_out")
_MOE = ("moe_dispatch", "moe_expert_out")

REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": _cp.nothing_saveable,
    "dots_saveable": _cp.dots_saveable,
    "dots_with_no_batch_dims_saveable": _cp.dots_with_no_batch_dims_saveable,
    "save_qkv_proj": _cp.save_only_these_names("query_proj", "key_proj", "value_proj"),
    "save_attention_out": _cp.save_only_these_names("attention_out"),
    "save_moe_dispatch": _cp.save_only_these_names(*_MOE),
    "save_attention_out_and_moe_dispatch": _cp.save_only_these_names("attention_out", *_MOE),
}


def check_remat_policy(name: Any) -> None:
    if name not in REMAT_POLICIES:
        raise ValueError(f"ModelConfig.remat_policy={name!r} is unknown; valid: "
                         f"{sorted(REMAT_POLICIES)}")


def remat_module(module_cls: type[nn.Module], name: str, static_argnums: tuple[int, ...] = (),
                 prevent_cse: bool = True) -> type[nn.Module]:
    """`module_cls` rematerialized with the named policy ('none': unchanged). Inside a scan
    `prevent_cse=False` is safe and faster (jax.checkpoint's docs)."""
    check_remat_policy(name)
    if name == "none":
        return module_cls
    return nn.remat(module_cls, policy=REMAT_POLICIES[name], prevent_cse=prevent_cse,
                    static_argnums=static_argnums)


def tag(x: jax.Array, name: str) -> jax.Array:
    """Names an activation for the policies above (identity otherwise)."""
    return checkpoint_name(x, name)
