"""Tokenizers: byte-level (the default; every UTF-8 byte is a token, plus pad/bos/eos
specials) and Hugging Face tokenizer.json files, chosen by the gin-configurable
`make_tokenizer`, which the data pipeline, eval, validation and sampling call."""
from __future__ import annotations

import functools
import os
from typing import Sequence

import gin
import numpy as np
from tokenizers import Tokenizer


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

    def encode_text(self, text: str) -> np.ndarray:
        """int32 ids of a document: its bytes after the BOS, as training rows start."""
        return self.encode(text, add_bos=True)

    def encode_document(self, text: str | bytes) -> np.ndarray:
        """int32 ids of a document as training rows hold it: [bos, bytes..., eos]."""
        return self.encode(text, add_bos=True, add_eos=True)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Returns the text of the byte ids in `ids`; special ids are dropped, bad UTF-8 replaced."""
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise ValueError(f"ids must be 1-D, got shape {arr.shape}")
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"ids must lie in [0, {self.vocab_size}), got range [{arr.min()}, {arr.max()}]")
        return arr[arr < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizer.json` through the `tokenizers` library (no transformers).

    Text is encoded as transformers' `tokenizer(text)` encodes it: the specials its own
    post-processor adds (a BOS for Llama's, none for Qwen's), never a BOS inferred from
    config.json. `add_bos_token` / `add_eos_token` in tokenizer_config.json change nothing,
    as in transformers 5, which encodes through the tokenizer.json's post-processor whatever
    they say (tests/interop/test_tokenizer_config.py). `bos_id` / `eos_id` / `pad_id` come
    from the checkpoint's config (None: not defined): EOS separates the documents packed into training rows (`encode_document`);
    padding uses `pad_id`, else `eos_id`, else 0 (padded positions are masked out of every
    loss).
    """

    def __init__(self, path: str, bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None):
        if not path or not os.path.isfile(path):
            raise ValueError(f"make_tokenizer.path={path!r}: no tokenizer.json there")
        self._tok = Tokenizer.from_file(path)
        self.path = path
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        for name, value in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
            if value is not None and not 0 <= int(value) < self.vocab_size:
                raise ValueError(f"make_tokenizer.{name}={value} is outside the tokenizer's "
                                 f"vocabulary [0, {self.vocab_size})")
        self.bos_id, self.eos_id = bos_id, eos_id
        self.pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)

    def encode(self, text: str | bytes, *, add_bos: bool = False,
               add_eos: bool = False) -> np.ndarray:
        """int32 ids of `text` (no template specials; bos/eos only where asked and defined)."""
        if isinstance(text, (bytes, bytearray, memoryview)):
            text = bytes(text).decode("utf-8", errors="replace")
        elif not isinstance(text, str):
            raise ValueError(f"text must be str or bytes, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if add_eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return np.asarray(ids, np.int32)

    def encode_text(self, text: str) -> np.ndarray:
        """int32 ids of a document as the tokenizer itself encodes it (its own special tokens,
        as `tokenizer(text)` in transformers)."""
        return np.asarray(self._tok.encode(text, add_special_tokens=True).ids, np.int32)

    def encode_document(self, text: str | bytes) -> np.ndarray:
        """int32 ids of a document as training rows hold it: `encode_text`, then EOS (the
        separator between packed documents) when the config defines one and the tokenizer
        did not end with it. An empty text may come out with no ids at all."""
        if isinstance(text, (bytes, bytearray, memoryview)):
            text = bytes(text).decode("utf-8", errors="replace")
        ids = self.encode_text(text)
        if self.eos_id is not None and (ids.size == 0 or ids[-1] != self.eos_id):
            ids = np.append(ids, np.int32(self.eos_id))
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise ValueError(f"ids must be 1-D, got shape {arr.shape}")
        return self._tok.decode([int(i) for i in arr], skip_special_tokens=True)


TOKENIZER_KINDS = ("byte", "hf")


@gin.configurable
def make_tokenizer(kind: str = "byte", path: str | None = None, bos_id: int | None = None,
                   eos_id: int | None = None, pad_id: int | None = None):
    """The run's tokenizer: 'byte' (default) or 'hf' (a tokenizer.json at `path`; `sparsejax
    import-hf` writes these bindings into the workdir's config.gin)."""
    if kind == "byte":
        if path is not None:
            raise ValueError("make_tokenizer.path is set but kind='byte'; set kind='hf'")
        return ByteTokenizer()
    if kind == "hf":
        return _hf_tokenizer(path, bos_id, eos_id, pad_id)
    raise ValueError(f"make_tokenizer.kind={kind!r} is unknown; valid: {TOKENIZER_KINDS}")


@functools.lru_cache(maxsize=4)
def _hf_tokenizer(path, bos_id, eos_id, pad_id) -> HFTokenizer:
    return HFTokenizer(path, bos_id, eos_id, pad_id)
