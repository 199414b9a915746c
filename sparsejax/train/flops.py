"""Model FLOPs per token and model FLOPs utilization (MFU) for the training logs.

Training FLOPs per token = 3 x forward (the backward costs two forwards), rematerialization
not counted (MFU, not hardware FLOPs utilization):

* matmuls: 2 x (kernel entries a token meets) per forward; embeddings are lookups (0);
* attention: 2 x 2 x heads x head_dim x (keys a query attends to) per layer per forward,
  with causal masking (mean (seq + 1) / 2 keys, or fewer within a sliding window; a
  block-sparse mask is counted as dense causal, an upper bound).

Three counts are logged: `flops_per_token/dense` (every expert for every token),
`flops_per_token/active` (the routed experts a token uses: top_k of num_experts; expert choice
capacity_factor x top_k on average; ReLU routing its maximum top_k) and
`flops_per_token/sparse` (the active count with masked-out weights left out: the useful
FLOPs of a sparse run, whose matmuls still run dense). `mfu` is the active count against the
peak (what the hardware must do), `mfu_sparse` the sparse one.

Peak: the datasheet figure of known GPUs/TPUs (dense, per chip, for the compute dtype: bf16,
or TF32 for float32 matmuls on GPUs) times the device count; on a CPU or an unknown device a
square-matmul FLOP/s measured once at start (`measure_matmul_peak`, as
benchmarks/train_throughput.py does; simulated CPU devices share one machine, so it is not
multiplied by their count).
"""
from __future__ import annotations

import functools
import logging
import re
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.models.moe.layer import MoeMlp
from sparsejax.models.moe.router import ROUTERS
from sparsejax.sparsity import masks as masks_lib
from sparsejax.sparsity import paths as paths_lib

log = logging.getLogger(__name__)

# Dense peak TFLOP/s per chip: (bf16, float32 matmuls) from the vendors' datasheets.
DATASHEET_PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "H200": (989.0, 494.0), "H100": (989.0, 494.0), "A100": (312.0, 156.0),
    "L4": (121.0, 60.0), "A10": (125.0, 62.5), "B200": (2250.0, 1100.0),
    "TPU v6": (918.0, 918.0), "TPU v5p": (459.0, 459.0), "TPU v5 lite": (197.0, 197.0),
    "TPU v5e": (197.0, 197.0), "TPU v4": (275.0, 275.0), "TPU v3": (123.0, 123.0),
}
ROUTED_EXPERTS = r"(^|/)experts/"  # stacked routed experts (not shared_experts)


def datasheet_peak(device_kind: str, dtype: str) -> float | None:
    """Per-chip peak FLOP/s of a known device kind for the compute dtype, else None."""
    for kind, (bf16, f32) in DATASHEET_PEAK_TFLOPS.items():
        if kind.lower() in device_kind.lower():
            return (f32 if dtype == "float32" else bf16) * 1e12
    return None


@functools.lru_cache(maxsize=None)
def measure_matmul_peak(n: int = 512, dtype: str = "float32", repeats: int = 5) -> float:
    """Best-of FLOP/s of an n x n x n matmul on the default device (about 0.1 s on a CPU;
    measured once per process)."""
    a = jnp.ones((n, n), jnp.dtype(dtype))
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def peak_flops(devices: list, dtype: str) -> tuple[float, str]:
    """(peak FLOP/s of `devices` together, where the figure comes from)."""
    d = devices[0]
    sheet = None if d.platform == "cpu" else datasheet_peak(d.device_kind, dtype)
    if sheet is not None:
        return sheet * len(devices), f"datasheet {d.device_kind} {dtype} x{len(devices)}"
    peak = measure_matmul_peak(dtype=dtype)
    if d.platform != "cpu":
        peak *= len(devices)
    return peak, f"measured {dtype} matmul on {d.platform}:{d.device_kind}"


def attention_flops_per_token(model_config: Any, seq_len: int) -> float:
    """Training FLOPs per token of the attention scores and values, all layers."""
    w = int(model_config.sliding_window)
    keys = np.minimum(np.arange(1, seq_len + 1), w if w > 0 else seq_len).mean()
    per_layer = 2 * 2 * model_config.num_heads * model_config.head_dim * keys
    return 3.0 * per_layer * model_config.num_layers


def experts_per_token(moe: Any) -> float:
    """Routed experts a token uses on average (see module docstring)."""
    if moe is None:
        return 0.0
    if not ROUTERS.get(moe.router, "MoeMlp.router").token_choice:
        return min(float(moe.num_experts), moe.capacity_factor * moe.top_k)
    return float(moe.top_k)


def _real_size(path: str, shape: tuple, valid: Mapping[str, tuple[int, int]]) -> int:
    if path in valid:
        return int(np.prod(shape)) - masks_lib.padded_count(shape, *valid[path])
    return int(np.prod(shape))


def matmul_entries(params: Any, valid: Mapping[str, tuple[int, int]], expert_fraction: float
                   ) -> tuple[float, float]:
    """(all, active) kernel entries a token meets: kernels of rank >= 2 except embeddings,
    routed experts counted in full / scaled by `expert_fraction`; vocab padding left out."""
    dense = active = 0.0
    for path, p in paths_lib.named_leaves(params):
        if len(p.shape) < 2 or re.search(r"embed", path):
            continue
        n = _real_size(path, tuple(p.shape), valid)
        dense += n
        active += n * (expert_fraction if re.search(ROUTED_EXPERTS, path) else 1.0)
    return dense, active


def sparse_matmul_entries(params: Any, masks: Any, valid: Mapping[str, tuple[int, int]],
                          expert_fraction: float) -> jax.Array:
    """Active kernel entries a token meets that the masks keep (jittable)."""
    masks = jax.tree.map(lambda p: None, params) if masks is None else masks
    named = paths_lib.named_leaves(params)
    flat_m = jax.tree.leaves(masks, is_leaf=masks_lib.is_none)
    total = jnp.float32(0)
    for (path, p), m in zip(named, flat_m):
        if len(p.shape) < 2 or re.search(r"embed", path):
            continue
        frac = expert_fraction if re.search(ROUTED_EXPERTS, path) else 1.0
        n = (jnp.float32(_real_size(path, tuple(p.shape), valid)) if m is None
             else jnp.sum(m, dtype=jnp.int32).astype(jnp.float32))
        total = total + frac * n
    return total


class FlopsMeter:
    """FLOPs per token of a run's model and its MFU at a given throughput."""

    def __init__(self, run: Any, seq_len: int, devices: list | None = None):
        mc = run.model_config
        has_moe = "moe" in [mc.mlp_kind(i) for i in range(mc.num_layers)]
        moe = MoeMlp(embed_dim=mc.embed_dim) if has_moe else None  # its gin settings
        self.expert_fraction = experts_per_token(moe) / moe.num_experts if moe else 1.0
        self.valid = dict(run.sparsity_method.valid)
        self.attention = attention_flops_per_token(mc, seq_len)
        dense, active = matmul_entries(run.abstract_model_params, self.valid,
                                       self.expert_fraction)
        self.dense = 6.0 * dense + self.attention
        self.active = 6.0 * active + self.attention
        self.peak, self.peak_source = peak_flops(devices or jax.devices(), mc.dtype)
        method = run.sparsity_method
        self._sparse = jax.jit(
            lambda s: 6.0 * sparse_matmul_entries(method.finalize_structure(s.params),
                                                  s.sparsity.get("masks"), self.valid,
                                                  self.expert_fraction) + self.attention,
            in_shardings=(run.state_shardings,),
            out_shardings=jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec()))
        log.info("model FLOPs per token: %.4g dense, %.4g active; peak %.4g FLOP/s (%s)",
                 self.dense, self.active, self.peak, self.peak_source)

    def start_record(self) -> dict[str, Any]:
        return {"flops_per_token/dense": self.dense, "flops_per_token/active": self.active,
                "peak_flops": self.peak, "peak_flops_source": self.peak_source}

    def metrics(self, state: Any, tokens_per_s: float) -> dict[str, float]:
        sparse = float(self._sparse(state))
        return {"flops_per_token/dense": self.dense, "flops_per_token/active": self.active,
                "flops_per_token/sparse": sparse,
                "mfu": self.active * tokens_per_s / self.peak,
                "mfu_sparse": sparse * tokens_per_s / self.peak}
