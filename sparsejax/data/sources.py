"""Random-access text sources, chosen by one `dataset` string.

- ``"stdlib"``: the embedded corpus (`stdlib_corpus`), built on first use.
- ``"tfds:NAME[/CONFIG][:VERSION]"``: a TFDS text dataset already prepared on
  disk as `array_record`. Never downloads.
- ``"files:GLOB"``: local text files, one document per file, split into
  train/validation by a stable hash of each path relative to the glob's root.

Each split is a sequence of documents as `bytes`, which grain reads by index;
`byte_lengths(docs)` gives their sizes (all the row index needs) and
`corpus_summary` a fingerprint of a dataset, which runs record so that tables
never mix runs trained on different corpora without saying so.
"""
from __future__ import annotations

import glob
import hashlib
import os
from typing import Any, Sequence

import gin
import numpy as np
import tensorflow_datasets as tfds

from sparsejax.data import stdlib_corpus

SPLITS = ("train", "validation")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


class _TextRecords(Sequence[bytes]):
    """Projects a TFDS data source's records onto one text feature, as bytes."""

    def __init__(self, records: Sequence, key: str):
        self._records = records
        self._key = key

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> bytes:
        text = self._records[index][self._key]
        return text.encode("utf-8") if isinstance(text, str) else bytes(text)

    def byte_lengths(self) -> np.ndarray:
        """Bytes per document (reads every record once)."""
        return np.fromiter((len(self[i]) for i in range(len(self))), np.int64, len(self))

    def __repr__(self) -> str:
        return f"_TextRecords({self._records!r}, key={self._key!r})"


class TextFiles(Sequence[bytes]):
    """Reads whole local files as documents, lazily, by index."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> bytes:
        with open(self.paths[index], "rb") as f:
            return f.read()

    def byte_lengths(self) -> np.ndarray:
        """Bytes per document, from the file sizes (nothing is read)."""
        return np.fromiter((os.path.getsize(p) for p in self.paths), np.int64, len(self.paths))

    def __repr__(self) -> str:
        return f"TextFiles({len(self.paths)} files)"


@gin.configurable
def files_source(pattern: str, split: str, validation_percent: int = 5) -> TextFiles:
    """Files matching `pattern` (``**`` recurses) assigned to `split` by a stable path hash.

    The hash is of the path relative to the pattern's non-wildcard directory, so
    the split does not depend on where the corpus lives on disk.
    """
    _check_split(split)
    if not 0 < validation_percent < 100:
        raise ValueError(f"validation_percent must be in (0, 100), got {validation_percent}")
    pattern = os.path.expanduser(pattern)
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        raise ValueError(f"dataset 'files:{pattern}' matches no files")
    root = _glob_root(pattern)
    want_validation = split == "validation"
    chosen = [
        p for p in paths
        if stdlib_corpus.is_validation(os.path.relpath(p, root), validation_percent) == want_validation
    ]
    if not chosen:
        raise ValueError(
            f"dataset 'files:{pattern}' has {len(paths)} files but none falls in split {split!r} "
            f"(validation_percent={validation_percent}); add files or change validation_percent"
        )
    return TextFiles(chosen)


def _glob_root(pattern: str) -> str:
    """The longest leading directory of `pattern` without glob magic characters."""
    parts = pattern.split(os.sep)
    fixed = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return os.sep.join(fixed) or ("/" if pattern.startswith(os.sep) else ".")


@gin.configurable
def tfds_source(
    name: str,
    split: str,
    data_dir: str | None = None,
    text_key: str = "text",
    train_split: str = "train",
    validation_split: str = "validation",
) -> _TextRecords:
    """A prepared `array_record` TFDS dataset's `text_key` feature; raises ValueError, never downloads.

    `train_split`/`validation_split` are TFDS split specs (e.g. ``"train[:95%]"``)
    so datasets without a validation split can carve one out.
    """
    _check_split(split)
    where = data_dir or "the TFDS default data dir"
    with stdlib_corpus.quiet_tfds():
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except Exception as e:  # DatasetNotFoundError, bad config/version names, unreadable dirs.
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"dataset 'tfds:{name}' is not available in {where}: {reason}") from e
        if not builder.is_prepared():
            raise ValueError(
                f"dataset 'tfds:{name}' is not prepared in {where} ({builder.data_dir}); "
                "prepare it there with file_format='array_record' (sparsejax never downloads)"
            )
        features = builder.info.features
        if features is None or text_key not in features:
            keys = sorted(features.keys()) if features is not None else []
            raise ValueError(f"text_key {text_key!r} is not a feature of dataset 'tfds:{name}'; features: {keys}")
        tfds_split = train_split if split == "train" else validation_split
        try:
            records = builder.as_data_source(split=tfds_split)
        except NotImplementedError as e:
            raise ValueError(
                f"dataset 'tfds:{name}' in {builder.data_dir} is stored as {builder.info.file_format}, "
                "not array_record; re-prepare it with file_format='array_record'"
            ) from e
        except Exception as e:  # Unknown split names and bad slice specs.
            raise ValueError(
                f"split {tfds_split!r} of dataset 'tfds:{name}' is not readable "
                f"(splits: {sorted(builder.info.splits.keys())}): {e}"
            ) from e
    if len(records) == 0:
        raise ValueError(f"split {tfds_split!r} of dataset 'tfds:{name}' is empty")
    return _TextRecords(records, text_key)


def stdlib_source(split: str, data_dir: str | None = None) -> _TextRecords:
    """The embedded stdlib corpus split (built on first use under `data_dir`)."""
    _check_split(split)
    builder = stdlib_corpus.stdlib_builder(data_dir)
    with stdlib_corpus.quiet_tfds():
        records = builder.as_data_source(split=split)
    if len(records) == 0:
        raise ValueError(
            f"split {split!r} of dataset 'stdlib' in {builder.data_dir} is empty; raise "
            "stdlib_builder.max_bytes (None: the whole library)"
        )
    return _TextRecords(records, "text")


def text_source(dataset: str, split: str, data_dir: str | None = None) -> Sequence[bytes]:
    """Returns split `split` of `dataset` ("stdlib", "tfds:NAME[/CONFIG][:VERSION]" or "files:GLOB").

    `data_dir` is where TFDS data lives: for "stdlib" it defaults to
    `$SPARSEJAX_DATA_DIR` or `~/.cache/sparsejax/tfds`; for "tfds:" to TFDS's
    own default (`$TFDS_DATA_DIR` or `~/tensorflow_datasets`); "files:" ignores it.
    """
    _check_split(split)
    if not isinstance(dataset, str):
        raise ValueError(f"dataset must be a string, got {type(dataset).__name__}")
    if dataset == "stdlib":
        return stdlib_source(split, data_dir)
    kind, _, arg = dataset.partition(":")
    if kind == "tfds" and arg:
        return tfds_source(arg, split, data_dir=data_dir)
    if kind == "files" and arg:
        return files_source(arg, split)
    raise ValueError(
        f"dataset must be 'stdlib', 'tfds:NAME[/CONFIG][:VERSION]' or 'files:GLOB', got {dataset!r}"
    )


def byte_lengths(docs: Sequence[bytes]) -> np.ndarray:
    """Bytes per document of a source: its own `byte_lengths()` if it has one, else len() of each."""
    if hasattr(docs, "byte_lengths"):
        return np.asarray(docs.byte_lengths(), np.int64)
    return np.fromiter((len(docs[i]) for i in range(len(docs))), np.int64, len(docs))


def document_name(docs: Sequence[bytes], index: int) -> str:
    """How a message names document `index` of a source: its path, if it is a file."""
    return repr(docs.paths[index]) if isinstance(docs, TextFiles) else f"document {index}"


def corpus_summary(dataset: str, data_dir: str | None = None) -> dict[str, Any]:
    """`{'corpus_fingerprint': 16 hex digits, 'corpus_documents': {split: n}}` of `dataset`.

    stdlib: the fingerprint stored with the corpus (split, path and content of
    every file), plus its token count; files: SHA-256 of every file's split,
    path relative to the glob root and size; tfds: of the dataset's full name
    and each split's example count and size.
    """
    docs = {split: text_source(dataset, split, data_dir) for split in SPLITS}
    out: dict[str, Any] = {"corpus_documents": {s: len(d) for s, d in docs.items()}}
    if dataset == "stdlib":
        info = stdlib_corpus.corpus_info(stdlib_corpus.stdlib_builder(data_dir))
        out["corpus_fingerprint"] = info["fingerprint"]
        out["corpus_tokens"] = info["tokens"]
        return out
    h = hashlib.sha256(dataset.partition(":")[0].encode())
    if dataset.startswith("files:"):
        root = _glob_root(os.path.expanduser(dataset.partition(":")[2]))
        for split, d in docs.items():
            for path, size in zip(d.paths, d.byte_lengths()):
                h.update(f"{split}\0{os.path.relpath(path, root)}\0{size}\n".encode())
    else:
        name = dataset.partition(":")[2]
        with stdlib_corpus.quiet_tfds():
            info = tfds.builder(name, data_dir=data_dir).info
        h.update(info.full_name.encode())
        for split, s in sorted(info.splits.items()):
            h.update(f"\0{split}\0{s.num_examples}\0{s.num_bytes}".encode())
    out["corpus_fingerprint"] = h.hexdigest()[:16]
    return out


def check_dataset(dataset: str, data_dir: str | None = None) -> dict[str, int]:
    """Opens every split of `dataset` and returns its number of documents per split.

    Cheap (builds the stdlib corpus at most once); call it before compiling a
    model so a typo or an unprepared dataset fails in seconds with a ValueError.
    """
    return {split: len(text_source(dataset, split, data_dir)) for split in SPLITS}
