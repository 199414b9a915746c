"""The embedded default corpus: the running Python's standard-library sources as a TFDS dataset.

Every machine that runs sparsejax has these files, so the default training run
needs neither the network nor a downloaded dataset. The builder writes
`array_record` files (random access, read by grain without TensorFlow).

By default the corpus is the whole library (`*.py`, test directories and
`site-packages` excluded: about 730 files, 12 MB on Python 3.11). With
`stdlib_builder.max_bytes` set it is a deterministic sample of it: files in
the order of a hash of their relative path, up to the cap, so a capped corpus
is drawn from every package rather than the alphabetical start of the tree.

The corpus depends on the running Python's version, so its size (files,
bytes, tokens per split) and a fingerprint of its contents (the split, path
and SHA-256 of every file) are stored with the dataset (`corpus_info`) and
printed when it is built; runs record the fingerprint in their metrics.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import logging
import os
import pathlib
import sys
import sysconfig
import time
import zlib
from typing import Any, Iterator

import gin
from etils import epath
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils

DATA_DIR_ENV = "SPARSEJAX_DATA_DIR"
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
SPLITS = ("train", "validation")


def default_data_dir() -> str:
    """Returns `$SPARSEJAX_DATA_DIR` if set, else `~/.cache/sparsejax/tfds`."""
    return os.environ.get(DATA_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "sparsejax", "tfds")


def _sample_key(rel: str) -> bytes:
    return hashlib.sha256(rel.encode("utf-8")).digest()


def stdlib_files(stdlib_dir: str | os.PathLike, max_bytes: int | None = None) -> list[tuple[str, pathlib.Path]]:
    """Returns (relative path, path) of the stdlib `*.py` files, test dirs skipped, sorted by path.

    `max_bytes=None` keeps every file. Otherwise files are taken in the order of
    the SHA-256 of their relative path until the next one would pass
    `max_bytes`: a deterministic sample spread over the whole library.
    """
    root = pathlib.Path(stdlib_dir)
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS or part.startswith("test_") for part in rel.parts[:-1]):
            continue
        if rel.name.startswith("test_") or not path.is_file():
            continue
        found.append((rel.as_posix(), path))
    if max_bytes is not None:
        found.sort(key=lambda item: _sample_key(item[0]))
        kept, total = [], 0
        for rel, path in found:
            size = path.stat().st_size
            if total + size > max_bytes:
                break
            kept.append((rel, path))
            total += size
        found = kept
    return sorted(found, key=lambda item: item[0])


def is_validation(key: str, validation_percent: int) -> bool:
    """Stable split assignment: crc32 of `key` (a relative path) modulo 100 < `validation_percent`."""
    return zlib.crc32(key.encode("utf-8")) % 100 < validation_percent


def fingerprint(entries: list[tuple[str, str, bytes]]) -> str:
    """16 hex digits of SHA-256 over sorted (split, relative path, content) entries."""
    h = hashlib.sha256()
    for split, rel, data in sorted(entries, key=lambda e: (e[0], e[1])):
        h.update(f"{split}\0{rel}\0{hashlib.sha256(data).hexdigest()}\n".encode("utf-8"))
    return h.hexdigest()[:16]


def read_corpus(stdlib_dir: str, max_bytes: int | None, validation_percent: int) -> dict[str, Any]:
    """The files of the corpus per split ({split: [(rel, text)]}) and its `info` (sizes, fingerprint).

    Files that are not UTF-8 (a few legacy ones) are left out, deterministically.
    Tokens count the byte tokenizer's ids: bytes plus bos and eos per file.
    """
    splits: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    entries = []
    for rel, path in stdlib_files(stdlib_dir, max_bytes):
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        split = "validation" if is_validation(rel, validation_percent) else "train"
        splits[split].append((rel, text))
        entries.append((split, rel, data))
    sizes = {}
    for split, files in splits.items():
        n_bytes = sum(len(t.encode("utf-8")) for _, t in files)
        sizes[split] = {"files": len(files), "bytes": n_bytes, "tokens": n_bytes + 2 * len(files)}
    info = {
        "fingerprint": fingerprint(entries),
        "python": ".".join(map(str, sys.version_info[:3])),
        "stdlib_dir": str(stdlib_dir),
        "max_bytes": max_bytes,
        "validation_percent": validation_percent,
        **{k: sum(s[k] for s in sizes.values()) for k in ("files", "bytes", "tokens")},
        "splits": sizes,
    }
    return {"splits": splits, "info": info}


def describe(info: dict[str, Any]) -> str:
    """One line: files, bytes, tokens (per split) and fingerprint of a corpus `info`."""
    per = ", ".join(f"{s} {v['files']} files / {v['tokens']:,} tokens" for s, v in info["splits"].items())
    return (f"{info['files']} files, {info['bytes']:,} bytes, {info['tokens']:,} tokens ({per}); "
            f"Python {info['python']}; fingerprint {info['fingerprint']}")


@dataclasses.dataclass
class StdlibConfig(tfds.core.BuilderConfig):
    """Which stdlib files make up the corpus; the name encodes the fields so configs never collide."""

    max_bytes: int | None = None
    validation_percent: int = 5
    stdlib_dir: str = ""


def make_config(max_bytes: int | None, validation_percent: int, stdlib_dir: str | None = None) -> StdlibConfig:
    """Returns the builder config for this Python's stdlib, whole (`max_bytes=None`) or sampled to a cap."""
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1):
        raise ValueError(f"stdlib_builder.max_bytes={max_bytes!r} must be None (the whole library) or an int >= 1")
    if not isinstance(validation_percent, int) or not 0 < validation_percent < 100:
        raise ValueError(f"stdlib_builder.validation_percent={validation_percent!r} must be an int in (0, 100)")
    stdlib_dir = stdlib_dir or sysconfig.get_paths()["stdlib"]
    size = "all" if max_bytes is None else f"{max_bytes}b"
    what = "every file" if max_bytes is None else f"a path-hash sample of at most {max_bytes} bytes"
    return StdlibConfig(
        name=f"py{sys.version_info.major}{sys.version_info.minor}_{size}_val{validation_percent}",
        description=f"*.py under {stdlib_dir} (tests excluded), {what}, {validation_percent}% validation",
        max_bytes=max_bytes,
        validation_percent=validation_percent,
        stdlib_dir=stdlib_dir,
    )


class StdlibText(tfds.core.GeneratorBasedBuilder):
    """Source files of the running Python's standard library, one example per file."""

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release: the alphabetical start of the library up to max_bytes.",
        "2.0.0": "The whole library by default, a path-hash sample under max_bytes; size and "
                 "fingerprint in the metadata.",
    }
    BUILDER_CONFIGS = [make_config(None, 5)]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's default lookup needs the `importlib_resources` backport; the answer is just this file.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "path": tfds.features.Text()}),
            supervised_keys=None,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        cfg = self.builder_config
        corpus = read_corpus(cfg.stdlib_dir or sysconfig.get_paths()["stdlib"], cfg.max_bytes,
                             cfg.validation_percent)
        self.info.metadata.update(corpus["info"])  # written to metadata.json with the dataset
        return {split: self._generate_examples(files) for split, files in corpus["splits"].items()}

    def _generate_examples(self, files: list[tuple[str, str]]) -> Iterator[tuple[str, dict]]:
        for rel, text in files:
            yield rel, {"text": text, "path": rel}


def corpus_info(builder: StdlibText) -> dict[str, Any]:
    """The stored size and fingerprint of a prepared corpus (see `read_corpus`)."""
    meta = dict(builder.info.metadata or {})
    if "fingerprint" not in meta:
        raise ValueError(f"the stdlib corpus in {builder.data_dir} has no stored fingerprint; "
                         "delete that directory so it is rebuilt")
    return meta


@contextlib.contextmanager
def quiet_tfds() -> Iterator[None]:
    """Turns TFDS progress bars and its info/warning logs off for the block, restoring them after.

    TFDS warns on every builder made from a config outside `BUILDER_CONFIGS`,
    which ours always are (the name holds the Python version and size cap).
    """
    was_active = getattr(tqdm_utils, "_active", True)
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    tfds.display_progress_bar(False)
    absl_logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        absl_logger.setLevel(level)
        tfds.display_progress_bar(was_active)


@gin.configurable
def stdlib_builder(
    data_dir: str | None = None,
    max_bytes: int | None = None,
    validation_percent: int = 5,
) -> StdlibText:
    """Returns the prepared stdlib corpus builder, building it on first use.

    `max_bytes=None` is the whole library; a cap gives a path-hash sample (see
    the module docstring). A build prints the corpus's size, fingerprint and
    build time to stderr. Safe when several processes start at once: the build
    runs under an exclusive `fcntl` lock in `data_dir`, and TFDS writes into a
    temporary directory that it renames into place, so readers never see a
    partial build.
    """
    data_dir = os.path.expanduser(data_dir or default_data_dir())
    config = make_config(max_bytes, validation_percent)
    with quiet_tfds():
        builder, seconds = _prepared_builder(data_dir, config)
    if seconds is not None:
        print(f"built the stdlib corpus {builder.builder_config.name} in {seconds:.1f} s: "
              f"{describe(corpus_info(builder))} -> {builder.data_dir}", file=sys.stderr, flush=True)
    return builder


def _prepared_builder(data_dir: str, config: StdlibConfig) -> tuple[StdlibText, float | None]:
    """The prepared builder, and the build time in seconds if this call built it (else None)."""
    if any(c.name == config.name for c in StdlibText.BUILDER_CONFIGS):
        config = config.name  # TFDS refuses a config object that shadows a registered one.
    builder = StdlibText(data_dir=data_dir, config=config, file_format="array_record")
    if builder.is_prepared():
        return builder, None
    os.makedirs(data_dir, exist_ok=True)
    lock_path = os.path.join(data_dir, f".stdlib_text_{builder.builder_config.name}.lock")
    seconds = None
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            # Re-create after taking the lock: another process may have finished the build meanwhile.
            builder = StdlibText(data_dir=data_dir, config=config, file_format="array_record")
            if not builder.is_prepared():
                t0 = time.perf_counter()
                builder.download_and_prepare(
                    download_config=tfds.download.DownloadConfig(try_download_gcs=False)
                )
                seconds = time.perf_counter() - t0
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
    return StdlibText(data_dir=data_dir, config=config, file_format="array_record"), seconds
