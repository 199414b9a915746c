"""Byte-level tokenizer: every UTF-8 byte is a token, plus pad/bos/eos specials."""
from __future__ import annotations

from typing import Sequence

import numpy as np


class ByteTokenizer:
    """Maps text to its UTF-8 bytes (ids 0..255) and back.

    Needs no vocabulary file, so every machine can train on any text offline.
    Special ids sit above the byte range: ``pad_id=256``, ``bos_id=257``,
    ``eos_id=258``; ``vocab_size=259``.
    """

    pad_id: int = 256
    bos_id: int = 257
    eos_id: int = 258
    vocab_size: int = 259

    def encode(self, text: str | bytes, *, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
        """Returns int32 ids [len(bytes) (+ bos/eos)] for `text` (str is UTF-8 encoded)."""
        if isinstance(text, str):
            text = text.encode("utf-8")
        elif not isinstance(text, (bytes, bytearray, memoryview)):
            raise ValueError(f"text must be str or bytes, got {type(text).__name__}")
        body = np.frombuffer(bytes(text), dtype=np.uint8)
        out = np.empty(body.size + int(add_bos) + int(add_eos), dtype=np.int32)
        start = 0
        if add_bos:
            out[0] = self.bos_id
            start = 1
        out[start:start + body.size] = body
        if add_eos:
            out[-1] = self.eos_id
        return out

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Returns the text of the byte ids in `ids`; special ids are dropped, bad UTF-8 replaced."""
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise ValueError(f"ids must be 1-D, got shape {arr.shape}")
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"ids must lie in [0, {self.vocab_size}), got range [{arr.min()}, {arr.max()}]")
        return arr[arr < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")
