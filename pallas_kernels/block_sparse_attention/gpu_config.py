"""Launch settings of the GPU block-sparse attention kernels, and their tuned defaults.

A :class:`GpuConfig` holds one :class:`PassConfig` per pass (tiles, warps,
pipeline depth) and which backward runs. ``gpu_tuning.json`` (package data)
holds the tuned configs per head-dim bucket (and, optionally, sequence-length
bucket: ``max_seq``), written by
``benchmarks/block_sparse_attention_tune.py --write`` on the device named in
each entry's ``tuned_on``; passes listed in an entry's ``untuned`` are guesses
not yet measured there.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib

TUNING_FILE = pathlib.Path(__file__).with_name("gpu_tuning.json")
# bwd: the fused dq + dk/dv pass; dq_cached: dq from the dS tiles the dk/dv pass stored
PASSES = ("fwd", "dq", "dkv", "bwd", "dq_cached")
BACKWARDS = ("split", "fused", "cached")
DS_CACHE_MAX_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class PassConfig:
    """How one pass cuts its work.

    rows: rows each program owns (query rows for fwd/dq, key rows for dkv); a
      power of two dividing that axis's mask block.
    cols: rows of the other operand per loop step; a power of two dividing the
      other axis's mask block.
    num_warps, num_stages: Triton launch and software-pipelining depth.
    """
    rows: int = 128
    cols: int = 64
    num_warps: int = 8
    num_stages: int = 2

    def fit(self, block_rows: int, block_cols: int) -> PassConfig:
        """Clip the tiles to the mask's blocks (both are powers of two)."""
        return dataclasses.replace(self, rows=min(self.rows, block_rows),
                                   cols=min(self.cols, block_cols))


@dataclasses.dataclass(frozen=True)
class GpuConfig:
    """Tiles per pass, and which backward runs.

    backward: ``"split"`` runs the ``dq`` and ``dkv`` passes, each recomputing
      the probabilities (7 block matmuls per kept pair); ``"fused"`` runs the
      ``bwd`` pass (key-row programs that also add into dq atomically: 5);
      ``"cached"`` runs the ``dkv`` pass storing each kept pair's dS tile, then
      ``dq_cached`` (dq = dS @ k from the stored tiles: 5 matmuls, no atomics,
      one bf16 tile of memory per kept pair).
    ds_cache_max_bytes: the largest dS store ``"cached"`` may allocate; past it
      the backward runs split.
    """
    fwd: PassConfig = PassConfig()
    dq: PassConfig = PassConfig()
    dkv: PassConfig = PassConfig()
    bwd: PassConfig = PassConfig()
    dq_cached: PassConfig = PassConfig()
    backward: str = "split"
    ds_cache_max_bytes: int = DS_CACHE_MAX_BYTES

    @classmethod
    def from_json(cls, obj: dict) -> GpuConfig:
        passes = {p: PassConfig(**obj[p]) for p in PASSES if p in obj}
        return cls(**passes, backward=obj.get("backward", "split"))


def check_config(config: GpuConfig) -> None:
    """Raise a ValueError naming the first bad field of ``config``."""
    for name in PASSES:
        pc = getattr(config, name)
        for field in ("rows", "cols"):
            val = getattr(pc, field)
            if not isinstance(val, int) or val < 16 or val & (val - 1):
                raise ValueError(f"gpu_config.{name}.{field}: {val!r} must be a power of two "
                                 ">= 16.")
        if pc.num_warps not in (1, 2, 4, 8, 16) or pc.num_stages < 1:
            raise ValueError(f"gpu_config.{name}: num_warps={pc.num_warps} must be a power of "
                             f"two <= 16 and num_stages={pc.num_stages} >= 1.")
    if config.backward not in BACKWARDS:
        raise ValueError(f"gpu_config.backward: {config.backward!r} must be one of {BACKWARDS}.")
    if not isinstance(config.ds_cache_max_bytes, int) or config.ds_cache_max_bytes < 0:
        raise ValueError(f"gpu_config.ds_cache_max_bytes: {config.ds_cache_max_bytes!r} must be "
                         "an int >= 0.")


def seq_limit(entry: dict) -> float:
    """The longest sequence a tuning entry serves (``max_seq``; unbounded without it)."""
    return entry.get("max_seq") or math.inf


def pick_entry(entries: list[dict], head_dim: int, seq_len: int | None = None) -> dict:
    """The entry that serves ``head_dim`` and ``seq_len``.

    Head dim: the smallest ``max_head_dim`` bucket covering it, else the largest.
    Within the bucket: the entry with the smallest ``max_seq`` covering ``seq_len``;
    an entry without ``max_seq`` covers every length and is the one used when
    ``seq_len`` is None. If nothing covers the length, the entry with the largest
    ``max_seq`` is used.
    """
    dims = sorted({e["max_head_dim"] for e in entries})
    dim = next((d for d in dims if head_dim <= d), dims[-1])
    bucket = [e for e in entries if e["max_head_dim"] == dim]
    target = math.inf if seq_len is None else seq_len
    covering = [e for e in bucket if seq_limit(e) >= target]
    return min(covering, key=seq_limit) if covering else max(bucket, key=seq_limit)


@functools.cache
def default_config(head_dim: int, seq_len: int | None = None) -> GpuConfig:
    """Tuned settings for ``head_dim`` (and ``seq_len``) from ``gpu_tuning.json``; see
    :func:`pick_entry`. Entries are written by
    ``benchmarks/block_sparse_attention_tune.py --write`` on the device named in
    each entry's ``tuned_on``."""
    entries = json.loads(TUNING_FILE.read_text())["entries"]
    return GpuConfig.from_json(pick_entry(entries, head_dim, seq_len))
