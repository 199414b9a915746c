"""Activation functions of the gated MLPs (dense MLP, routed and shared experts).

Every MLP here is gated: ``h = act(gate(x)) * up(x)``, then ``down(h)``. The name picks the
activation on the gate branch (the up branch stays linear, except for dReLU):

* ``silu``  SwiGLU (Llama, Mistral, Qwen; this repo's default);
* ``gelu``  GeGLU, exact (erf) GELU like Hugging Face's ``hidden_act='gelu'``;
* ``relu``  ReGLU: ReLU on the gate only. This is the ReLU-fication of a SwiGLU model
  (ProSparse, "ReLU strikes back" stage 1): swap SiLU for ReLU and keep every weight;
* ``relu2`` squared ReLU on the gate (Primer; Sparsing Law's ReLU^2);
* ``drelu`` ReLU on both the gate and the up branch (dReLU, Turbo Sparse);
* ``clamped_swiglu`` gpt-oss's experts: the gate clamped from above and the up branch on both
  sides at ``limit``, ``a = gate * sigmoid(alpha * gate)`` and ``h = a * (up + 1)``
  (``ModelConfig.swiglu_alpha`` / ``swiglu_limit``).

``threshold > 0`` (ReLU family only) is ProSparse's activation threshold shift (FATReLU):
gate values at or below the threshold give exactly zero, those above pass unchanged
(``relu2``: squared).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

ACTIVATIONS = ("silu", "gelu", "relu", "relu2", "drelu", "clamped_swiglu")
RELU_FAMILY = ("relu", "relu2", "drelu")  # exact zeros: the activation-sparse family
# Hugging Face `hidden_act` of each activation that a Llama-style MLP (act(gate) * up) has.
HF_ACT = {"silu": "silu", "gelu": "gelu", "relu": "relu", "relu2": "relu2"}
FROM_HF_ACT = {v: k for k, v in HF_ACT.items()} | {"swish": "silu"}

Gated = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0  # gpt-oss's (transformers' GptOssConfig defaults)


def check_activation(name: object, threshold: object = 0.0,
                     setting: str = "ModelConfig.mlp_activation") -> None:
    """ValueError naming the setting unless `name` is an activation and `threshold` fits it."""
    if name not in ACTIVATIONS:
        raise ValueError(f"{setting}={name!r} is not a known activation; valid: {ACTIVATIONS}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
        raise ValueError(f"ModelConfig.activation_threshold={threshold!r} must be a number >= 0")
    if threshold > 0 and name not in RELU_FAMILY:
        raise ValueError(f"ModelConfig.activation_threshold={threshold!r} shifts a ReLU-family "
                         f"activation (FATReLU) and has no effect with {setting}={name!r}; "
                         f"use one of {RELU_FAMILY} or threshold 0")


def check_swiglu(alpha: object, limit: object) -> None:
    """ValueError naming the setting unless `alpha` and `limit` are numbers > 0."""
    for name, value in (("swiglu_alpha", alpha), ("swiglu_limit", limit)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"ModelConfig.{name}={value!r} must be a number > 0")


def gate_activation(name: str, threshold: float = 0.0, alpha: float = SWIGLU_ALPHA,
                    limit: float = SWIGLU_LIMIT) -> Callable[[jax.Array], jax.Array]:
    """The activation applied to the gate branch (`alpha`, `limit`: of 'clamped_swiglu')."""
    check_activation(name, threshold)
    t = float(threshold)
    if name == "clamped_swiglu":
        def clamped(g):
            g = jnp.minimum(g, limit)
            return g * jax.nn.sigmoid(alpha * g)
        return clamped
    if name == "silu":
        return jax.nn.silu
    if name == "gelu":
        return lambda g: jax.nn.gelu(g, approximate=False)
    if name in ("relu", "drelu"):
        return (lambda g: jnp.where(g > t, g, jnp.zeros_like(g))) if t else jax.nn.relu
    return (lambda g: jnp.square(jnp.where(g > t, g, jnp.zeros_like(g)))) if t else \
        (lambda g: jnp.square(jax.nn.relu(g)))


def gated(name: str, threshold: float = 0.0, alpha: float = SWIGLU_ALPHA,
          limit: float = SWIGLU_LIMIT) -> Gated:
    """fn(gate, up) -> (a, h): the gate activation `a` and the intermediate `h` that enters
    the down projection (h = a * up; dReLU: a * relu(up); clamped SwiGLU:
    a * (clip(up, -limit, limit) + 1))."""
    act = gate_activation(name, threshold, alpha, limit)
    if name == "drelu":
        return lambda gate, up: (act(gate), act(gate) * jax.nn.relu(up))
    if name == "clamped_swiglu":
        def clamped(gate, up):
            a = act(gate)
            return a, a * (jnp.clip(up, -limit, limit) + 1)
        return clamped

    def fn(gate, up):
        a = act(gate)
        return a, a * up

    return fn
