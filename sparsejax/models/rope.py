"""RoPE frequencies, with the context-extension scalings of released checkpoints.

`ModelConfig.rope_scaling` is None (plain RoPE) or a dict with a `type`:

* ``{'type': 'linear', 'factor': F}``: every frequency divided by F (position interpolation).
* ``{'type': 'llama3', 'factor': F, 'low_freq_factor': L, 'high_freq_factor': H,
  'original_max_position_embeddings': N}``: Llama-3.1 — long wavelengths (> N / L) divided by
  F, short ones (< N / H) kept, a smooth blend in between.
* ``{'type': 'yarn', 'factor': F, 'original_max_position_embeddings': N, 'beta_fast': 32,
  'beta_slow': 1, 'mscale': ..., 'mscale_all_dim': ..., 'attention_factor': ...,
  'truncate': True}``: YaRN — a linear ramp between interpolated and original frequencies
  over the dimensions, and cos/sin multiplied by an attention factor (0.1 ln F + 1 by default).
  Multi-head latent attention also scales its softmax by mscale(F, mscale_all_dim) ** 2
  (models/mla.py `softmax_scale`).

The math is numpy over the `head_dim / 2` frequencies; `rotary_embedding` applies them.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

ROPE_SCALINGS = {
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"},
    "yarn": {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "attention_factor", "truncate"},
}
_REQUIRED = {"linear": {"factor"}, "llama3": ROPE_SCALINGS["llama3"],
             "yarn": {"factor", "original_max_position_embeddings"}}


def check_rope_scaling(scaling: Mapping[str, Any] | None) -> None:
    """ValueError naming `ModelConfig.rope_scaling` if the dict is not a valid scaling."""
    if scaling is None:
        return
    name = "ModelConfig.rope_scaling"
    if not isinstance(scaling, Mapping) or "type" not in scaling:
        raise ValueError(f"{name}={scaling!r} must be None or a dict with a 'type' in "
                         f"{sorted(ROPE_SCALINGS)}")
    kind = scaling["type"]
    if kind not in ROPE_SCALINGS:
        raise ValueError(f"{name} type={kind!r} is not supported; valid: {sorted(ROPE_SCALINGS)}")
    keys = set(scaling) - {"type"}
    unknown, missing = keys - ROPE_SCALINGS[kind], _REQUIRED[kind] - keys
    if unknown:
        raise ValueError(f"{name} ({kind}) has unknown keys {sorted(unknown)}; valid: "
                         f"{sorted(ROPE_SCALINGS[kind])}")
    if missing:
        raise ValueError(f"{name} ({kind}) is missing {sorted(missing)}")
    if not float(scaling["factor"]) > 0:
        raise ValueError(f"{name} factor={scaling['factor']} must be > 0")
    if kind == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ValueError(f"{name} (llama3) needs high_freq_factor > low_freq_factor")


def rope_frequencies(head_dim: int, theta: float,
                     scaling: Mapping[str, Any] | None = None) -> tuple[np.ndarray, float]:
    """(inverse frequencies float32 [head_dim // 2], cos/sin multiplier) for RoPE."""
    check_rope_scaling(scaling)
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    if scaling is None:
        return inv_freq, 1.0
    kind, factor = scaling["type"], float(scaling["factor"])
    if kind == "linear":
        return (inv_freq / np.float32(factor)).astype(np.float32), 1.0
    if kind == "llama3":
        return _llama3(inv_freq, factor, scaling), 1.0
    return _yarn(head_dim, theta, factor, scaling)


def _llama3(inv_freq: np.ndarray, factor: float, s: Mapping[str, Any]) -> np.ndarray:
    old_len = float(s["original_max_position_embeddings"])
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, blended, scaled).astype(np.float32)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(head_dim: int, theta: float, factor: float,
          s: Mapping[str, Any]) -> tuple[np.ndarray, float]:
    old_len = float(s["original_max_position_embeddings"])
    attention = s.get("attention_factor")
    if attention is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attention = (_yarn_mscale(factor, m) / _yarn_mscale(factor, m_all) if m and m_all
                     else _yarn_mscale(factor))
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1.0 - ramp  # 1: keep the original frequency, 0: interpolate
    pos_freqs = np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv.astype(np.float32), float(attention)
