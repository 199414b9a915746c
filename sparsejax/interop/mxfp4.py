"""Quantized checkpoints on import: MXFP4 experts (published gpt-oss) are dequantized, other
quantization methods are refused in one line.

An MXFP4 tensor `X` is stored as `X_blocks` (uint8 [*prefix, rows, groups, 16]: 32 FP4 E2M1
values per group, two per byte, low nibble first) and `X_scales` (uint8 [*prefix, rows,
groups]: one power-of-two exponent per group, biased by 127). Dequantized, row r holds
`FP4[nibble] * 2 ** (scale - 127)` over its groups in order, and the rows become the last
axis: [E, rows, groups * 32] -> [E, groups * 32, rows], the [E, in, out] layout of gpt-oss's
unquantized `gate_up_proj` / `down_proj`. transformers'
`integrations.mxfp4.convert_moe_packed_tensors` is the reference (tests compare them).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from sparsejax.interop.safetensors_io import SUPPORTED_DTYPES, SafetensorsCheckpoint

FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)
BLOCKS, SCALES = "_blocks", "_scales"


def dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 [*prefix, groups * 32, rows] from MXFP4 blocks [*prefix, rows, groups, 16] and
    scales [*prefix, rows, groups] (module docstring)."""
    blocks, scales = np.asarray(blocks, np.uint8), np.asarray(scales, np.uint8)
    if blocks.shape[:-1] != scales.shape or blocks.ndim < 3:
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} and scales {list(scales.shape)} "
                         f"do not match ([..., rows, groups, 16] and [..., rows, groups])")
    values = np.stack([FP4_VALUES[blocks & 0x0F], FP4_VALUES[blocks >> 4]], axis=-1)
    values = values.reshape(*scales.shape, -1)  # [..., rows, groups, 32]
    values = np.ldexp(values, scales.astype(np.int32)[..., None] - 127)
    return np.swapaxes(values.reshape(*scales.shape[:-1], -1), -1, -2).astype(np.float32)


class DequantizedCheckpoint:
    """A `SafetensorsCheckpoint` whose MXFP4 pairs (`X_blocks`, `X_scales`) read as the
    float32 tensor `X` (names, shapes, `read`); the last dequantized tensor is kept, since
    each device's slice of a param is read in turn."""

    def __init__(self, ckpt: SafetensorsCheckpoint):
        self._ckpt = ckpt
        self.pairs: dict[str, tuple[str, str]] = {}
        self.shapes = {}
        for name, shape in ckpt.shapes.items():
            if name.endswith(SCALES) and name[:-len(SCALES)] + BLOCKS in ckpt.shapes:
                continue
            if name.endswith(BLOCKS):
                base = name[:-len(BLOCKS)]
                scales = base + SCALES
                if scales not in ckpt.shapes:
                    raise ValueError(f"MXFP4 tensor {name} has no {scales} beside it")
                *prefix, rows, groups, width = shape
                self.pairs[base] = (name, scales)
                self.shapes[base] = (*prefix, groups * width * 2, rows)
                continue
            if ckpt.dtypes[name] not in SUPPORTED_DTYPES:
                raise ValueError(f"tensor {name} has dtype {ckpt.dtypes[name]}; supported: "
                                 f"{SUPPORTED_DTYPES} (and MXFP4 *_blocks / *_scales pairs)")
            self.shapes[name] = shape
        self._last: tuple[str | None, np.ndarray | None] = (None, None)

    @property
    def names(self) -> list[str]:
        return sorted(self.shapes)

    def nbytes(self) -> int:
        return self._ckpt.nbytes()

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        if name not in self.pairs:
            return self._ckpt.read(name, index)
        if self._last[0] != name:
            blocks, scales = self.pairs[name]
            self._last = (name, dequantize(self._ckpt.read(blocks), self._ckpt.read(scales)))
        full = self._last[1]
        return full if index is None else np.ascontiguousarray(full[index])

    def close(self) -> None:
        self._last = (None, None)
        self._ckpt.close()


def open_checkpoint(src: str, cfg: Mapping[str, Any]) -> Any:
    """The checkpoint in `src` to import: as stored, or with its MXFP4 tensors dequantized
    when config.json's quantization_config says mxfp4; any other quantization is refused."""
    quant = cfg.get("quantization_config")
    if not quant:
        return SafetensorsCheckpoint(src)
    method = quant.get("quant_method") if isinstance(quant, Mapping) else quant
    if method != "mxfp4":
        raise ValueError(f"config.json quantization_config quant_method={method!r} is not "
                         f"supported (mxfp4 is dequantized on import); import the checkpoint's "
                         f"unquantized weights, e.g. saved by transformers after loading it "
                         f"dequantized")
    return DequantizedCheckpoint(SafetensorsCheckpoint(src, SUPPORTED_DTYPES + ("U8",)))
