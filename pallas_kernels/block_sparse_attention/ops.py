"""Public block-sparse attention op: validation, backend dispatch and ``custom_vjp``."""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse_attention import gpu as gpu_impl
from pallas_kernels.block_sparse_attention import gpu_config as gpu_config_lib
from pallas_kernels.block_sparse_attention import masks as masks_lib
from pallas_kernels.block_sparse_attention import tpu as tpu_impl
from pallas_kernels.block_sparse_attention import xla as xla_impl

_BACKENDS = ("gpu", "tpu", "xla")
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
DEFAULT_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class _Config:
    backend: str
    rule: Any
    scale: float
    block_q: int
    block_k: int
    interpret: bool
    gpu_config: Any = None
    rows: Any = None  # XLA path: query blocks bucketed by list length (xla.plan_rows)


def _impl(backend: str):
    if backend == "gpu":
        return gpu_impl
    if backend == "tpu":
        return tpu_impl
    return xla_impl


def _kernel_kw(cfg: _Config) -> dict:
    """Keyword arguments every pass of ``cfg.backend`` takes."""
    kw = dict(rule=cfg.rule, scale=cfg.scale, block_q=cfg.block_q, block_k=cfg.block_k)
    if cfg.backend == "xla":
        kw["rows"] = cfg.rows
    else:
        kw["interpret"] = cfg.interpret
    if cfg.backend == "gpu":
        kw["config"] = cfg.gpu_config
    return kw


def _fwd_call(cfg: _Config, q, k, v, seg, lists):
    kv_idx, kv_cnt, kv_nfull = lists[:3]
    full = (kv_nfull,) if cfg.backend != "xla" else ()
    return _impl(cfg.backend).fwd(q, k, v, seg, kv_idx, kv_cnt, *full, **_kernel_kw(cfg))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q, k, v, seg, lists):
    return _fwd_call(cfg, q, k, v, seg, lists)[0]


def _attention_fwd(cfg, q, k, v, seg, lists):
    o, lse = _fwd_call(cfg, q, k, v, seg, lists)
    return o, (q, k, v, seg, o, lse, lists)


def _attention_bwd(cfg, res, do):
    q, k, v, seg, o, lse, (kv_idx, kv_cnt, kv_nfull, q_idx, q_cnt, q_nfull) = res
    kw = _kernel_kw(cfg)
    if cfg.backend == "xla":
        dq, dk, dv = xla_impl.bwd(q, k, v, seg, o, lse, do, kv_idx, kv_cnt, **kw)
    else:
        full = (kv_nfull, q_nfull)
        dq, dk, dv = _impl(cfg.backend).bwd(q, k, v, seg, o, lse, do, kv_idx, kv_cnt, q_idx,
                                            q_cnt, *full, **kw)
    return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def default_backend() -> str:
    """'gpu' on CUDA/ROCm, 'tpu' on TPU, otherwise 'xla'."""
    platform = jax.default_backend()
    if platform in ("gpu", "cuda", "rocm"):
        return "gpu"
    return "tpu" if platform == "tpu" else "xla"


def _validate(q, k, v, mask, segment_ids, backend):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name}: shape {x.shape} must be [batch, seq, heads, head_dim].")
    if k.shape != v.shape:
        raise ValueError(f"k/v: shapes {k.shape} and {v.shape} must be equal.")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q/k: shapes {q.shape} and {k.shape} must agree in batch and head_dim.")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(f"k: kv heads {k.shape[2]} must divide q heads {q.shape[2]}.")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q/k/v: dtypes {q.dtype}, {k.dtype}, {v.dtype} must be equal.")
    if q.dtype not in _DTYPES:
        raise ValueError(f"q: dtype {q.dtype} unsupported; use float32, bfloat16 or float16.")
    if not isinstance(mask, masks_lib.BlockMask):
        raise ValueError(f"mask: {mask!r} must be a BlockMask (see kinds.make_mask).")
    if backend not in _BACKENDS:
        raise ValueError(f"backend: {backend!r} must be None or one of {_BACKENDS}.")
    if segment_ids is not None:
        if segment_ids.shape != (q.shape[0], q.shape[1]) or q.shape[1] != k.shape[1]:
            raise ValueError(f"segment_ids: shape {segment_ids.shape} must be [batch, seq] = "
                             f"{(q.shape[0], q.shape[1])} with seq_q == seq_k (got {k.shape[1]}).")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids: dtype {segment_ids.dtype} must be an integer type.")


def _block_sizes(mask, sq, sk, block_q, block_k, backend):
    if isinstance(mask, masks_lib.BlockLayoutMask):
        implied = mask.block_sizes(sq, sk)
        block_q = implied[0] if block_q is None else block_q
        block_k = implied[1] if block_k is None else block_k
    block_q = min(DEFAULT_BLOCK, sq) if block_q is None else block_q
    block_k = min(DEFAULT_BLOCK, sk) if block_k is None else block_k
    for name, blk, seq in (("block_q", block_q, sq), ("block_k", block_k, sk)):
        if not isinstance(blk, (int, np.integer)) or blk <= 0 or seq % blk:
            raise ValueError(f"{name}: {blk!r} must be a positive integer dividing the sequence "
                             f"length {seq}.")
        if backend == "gpu" and (blk < 16 or blk & (blk - 1)):
            raise ValueError(f"{name}: {blk} must be a power of two >= 16 for the GPU backend.")
    return int(block_q), int(block_k)


def dense_equivalent(mask, layout, seq_q, seq_k, block_q, block_k) -> bool:
    """Whether the masked attention equals dense attention (no token rule, every block
    listed) or dense causal attention (the causal rule, every block it touches listed),
    so that a dense implementation (cuDNN) can run it."""
    if not isinstance(layout, np.ndarray) or seq_q != seq_k:
        return False
    rule = mask.token_rule
    if rule is None:
        return bool(layout.all())
    if not isinstance(rule, masks_lib.CausalMask):
        return False
    touched = rule.block_layout(seq_q, seq_k, block_q, block_k)
    return bool(np.all(layout | ~touched))


def _full_tiles(mask, backend, seq_q, seq_k, block_q, block_k):
    """``[q_blocks, kv_blocks]`` tiles where the token rule holds for every pair, for the
    kernels that skip the rule there (GPU, TPU); None when there is no rule to skip."""
    if backend == "xla" or mask.token_rule is None:
        return None
    return np.asarray(mask.token_rule.full_layout(seq_q, seq_k, block_q, block_k))[0]


def _lists(mask, layout, seq_q, seq_k, block_q, block_k, full=None):
    """Row lists (kv blocks per q block) and column lists (q blocks per kv block):
    ``(kv_idx, kv_cnt, kv_nfull, q_idx, q_cnt, q_nfull)``. Given ``full`` (``[q_blocks,
    kv_blocks]``, the tiles where the token rule holds everywhere) each list names its
    full blocks first and ``*_nfull`` counts them; otherwise ``*_nfull`` is None."""
    if isinstance(layout, np.ndarray):
        rows = masks_lib.compress(layout)
        cols = masks_lib.compress(np.swapaxes(layout, -1, -2))
    else:
        max_nnz = mask.max_blocks_per_row(seq_q, seq_k, block_q, block_k)
        rows = masks_lib.compress_dynamic(layout, max_nnz)
        cols = masks_lib.compress_dynamic(jnp.swapaxes(layout, -1, -2), seq_q // block_q)
    out = []
    for (idx, cnt), fl in ((rows, full), (cols, None if full is None else full.T)):
        nfull = None
        if fl is not None:
            idx, nfull = masks_lib.full_first(idx, cnt, fl)
        out += [idx, cnt, nfull]
    return tuple(None if a is None else jnp.asarray(a) for a in out)


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: masks_lib.BlockMask,
                           *, segment_ids: jax.Array | None = None, scale: float | None = None,
                           block_q: int | None = None, block_k: int | None = None,
                           backend: str | None = None, interpret: bool = False,
                           dense_fast_path: bool = True, gpu_config: Any = None) -> jax.Array:
    """Softmax attention restricted to ``mask``; skipped blocks cost nothing.

    Args:
      q: ``[batch, seq_q, heads, head_dim]``; k, v: ``[batch, seq_k, kv_heads, head_dim]``
        with ``kv_heads`` dividing ``heads`` (grouped-query attention).
      mask: a :mod:`masks` object (causal, sliding window, global+local, strided,
        chunked, explicit block layout, or data-dependent top-k).
      segment_ids: ``[batch, seq]`` int; tokens attend only within equal ids.
      scale: logit scale, default ``1/sqrt(head_dim)``.
      block_q, block_k: tile sizes (default 128, or implied by a ``BlockLayoutMask``).
      backend: ``"gpu"`` (Pallas Triton), ``"tpu"`` (Pallas Mosaic) or ``"xla"``;
        default by platform. ``interpret=True`` runs a Pallas kernel in interpret mode.
      dense_fast_path: without segment ids, a mask that is plain dense or plain causal
        attention (see :func:`dense_equivalent`) runs as dense attention instead: on GPU
        (compiled, 16-bit) dense and causal masks (e.g. ``CausalMask``) through
        ``jax.nn.dot_product_attention(implementation="cudnn")``, on the XLA path dense
        ones through its XLA implementation (causal is faster block-sparse there). Same
        result, faster.
      gpu_config: a ``gpu_config.GpuConfig`` (per-pass tiles, warps, pipeline stages,
        split, fused or cached backward) for the GPU kernels; default: the tuned entry for the
        head dim and sequence length in ``gpu_tuning.json``.

    Returns:
      ``[batch, seq_q, heads, head_dim]`` in q's dtype; rows that see no key are zero.
    """
    backend = default_backend() if backend is None else backend
    _validate(q, k, v, mask, segment_ids, backend)
    b, sq, h, d = q.shape
    sk = k.shape[1]
    block_q, block_k = _block_sizes(mask, sq, sk, block_q, block_k, backend)
    qb, kb = sq // block_q, sk // block_k
    layout = masks_lib.layout_for(mask, q, k, block_q, block_k)
    if layout.shape[-2:] != (qb, kb) or layout.shape[1] not in (1, h) or layout.shape[0] not in (1, b):
        raise ValueError(f"mask: block layout shape {tuple(layout.shape[1:])} does not match "
                         f"[heads in (1, {h}), q_blocks={qb}, kv_blocks={kb}] for seq_q={sq}, "
                         f"seq_k={sk}, block_q={block_q}, block_k={block_k}.")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
    if (dense_fast_path and segment_ids is None
            and dense_equivalent(mask, layout, sq, sk, block_q, block_k)):
        causal = mask.token_rule is not None
        if backend == "gpu" and not interpret and q.dtype != jnp.float32:
            try:
                return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                                    implementation="cudnn")
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # cuDNN missing, or a head dim / length it does not take: the kernel runs
        elif backend == "xla" and not causal:
            return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")
    pad = 0
    if backend == "gpu" and d & (d - 1):
        pad = int(pl_next_pow2(max(d, 16))) - d
    elif backend == "gpu" and d < 16:
        pad = 16 - d
    if pad:
        widths = [(0, 0)] * 3 + [(0, pad)]
        q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
    if gpu_config is not None:
        if not isinstance(gpu_config, gpu_config_lib.GpuConfig):
            raise ValueError(f"gpu_config: {gpu_config!r} must be None or a GpuConfig.")
        gpu_config_lib.check_config(gpu_config)
    lists = _lists(mask, layout, sq, sk, block_q, block_k,
                   _full_tiles(mask, backend, sq, sk, block_q, block_k))
    rows = None
    if backend == "xla" and isinstance(layout, np.ndarray):
        rows = xla_impl.plan_rows(layout.sum(-1))
    elif backend == "xla" and hasattr(mask, "row_bounds"):  # dynamic, with static bounds
        rows = xla_impl.plan_rows(mask.row_bounds(sq, sk, block_q, block_k), exact=False)
    cfg = _Config(backend, mask.token_rule, scale, block_q, block_k, bool(interpret), gpu_config,
                  rows)
    out = _attention(cfg, q, k, v, segment_ids, lists)
    return out[..., :d] if pad else out


def pl_next_pow2(x: int) -> int:
    return 1 << (int(x) - 1).bit_length()
