"""The embedded default corpus: the running Python's standard-library sources as a TFDS dataset.

Every machine that runs sparsejax has these files, so the default training run
needs neither the network nor a downloaded dataset. The builder writes
`array_record` files (random access, read by grain without TensorFlow).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import logging
import os
import pathlib
import sys
import sysconfig
import zlib
from typing import Iterator

import gin
from etils import epath
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils

DATA_DIR_ENV = "SPARSEJAX_DATA_DIR"
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


def default_data_dir() -> str:
    """Returns `$SPARSEJAX_DATA_DIR` if set, else `~/.cache/sparsejax/tfds`."""
    return os.environ.get(DATA_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "sparsejax", "tfds")


def stdlib_files(stdlib_dir: str | os.PathLike, max_bytes: int) -> list[tuple[str, pathlib.Path]]:
    """Returns sorted (relative path, path) of stdlib `*.py` files, skipping test dirs, until `max_bytes`.

    Files are taken in sorted relative-path order and the first file that would
    push the total past `max_bytes` ends the list, so the set is deterministic.
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
    found.sort(key=lambda item: item[0])
    out, total = [], 0
    for rel, path in found:
        size = path.stat().st_size
        if total + size > max_bytes:
            break
        out.append((rel, path))
        total += size
    return out


def is_validation(key: str, validation_percent: int) -> bool:
    """Stable split assignment: crc32 of `key` (a relative path) modulo 100 < `validation_percent`."""
    return zlib.crc32(key.encode("utf-8")) % 100 < validation_percent


@dataclasses.dataclass
class StdlibConfig(tfds.core.BuilderConfig):
    """Which stdlib files make up the corpus; the name encodes the fields so configs never collide."""

    max_bytes: int = 4_000_000
    validation_percent: int = 5
    stdlib_dir: str = ""


def make_config(max_bytes: int, validation_percent: int, stdlib_dir: str | None = None) -> StdlibConfig:
    """Returns the builder config for this Python's stdlib capped at `max_bytes` bytes."""
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    if not 0 < validation_percent < 100:
        raise ValueError(f"validation_percent must be in (0, 100), got {validation_percent}")
    stdlib_dir = stdlib_dir or sysconfig.get_paths()["stdlib"]
    name = f"py{sys.version_info.major}{sys.version_info.minor}_{max_bytes}b_val{validation_percent}"
    return StdlibConfig(
        name=name,
        description=f"*.py under {stdlib_dir}, sorted, first {max_bytes} bytes, {validation_percent}% validation",
        max_bytes=max_bytes,
        validation_percent=validation_percent,
        stdlib_dir=stdlib_dir,
    )


class StdlibText(tfds.core.GeneratorBasedBuilder):
    """Source files of the running Python's standard library, one example per file."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [make_config(4_000_000, 5)]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's default lookup needs the `importlib_resources` backport; the answer is just this file.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "path": tfds.features.Text()}),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        cfg = self.builder_config
        files = stdlib_files(cfg.stdlib_dir or sysconfig.get_paths()["stdlib"], cfg.max_bytes)
        val = [f for f in files if is_validation(f[0], cfg.validation_percent)]
        train = [f for f in files if not is_validation(f[0], cfg.validation_percent)]
        return {"train": self._generate_examples(train), "validation": self._generate_examples(val)}

    def _generate_examples(self, files: list[tuple[str, pathlib.Path]]) -> Iterator[tuple[str, dict]]:
        for rel, path in files:
            try:
                text = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                continue  # A few legacy files are not UTF-8; skipping them is deterministic.
            yield rel, {"text": text, "path": rel}


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
    max_bytes: int = 4_000_000,
    validation_percent: int = 5,
) -> StdlibText:
    """Returns the prepared stdlib corpus builder, building it on first use.

    Safe when several processes start at once: the build runs under an
    exclusive `fcntl` lock in `data_dir`, and TFDS writes into a temporary
    directory that it renames into place, so readers never see a partial build.
    """
    data_dir = os.path.expanduser(data_dir or default_data_dir())
    config = make_config(max_bytes, validation_percent)
    with quiet_tfds():
        return _prepared_builder(data_dir, config)


def _prepared_builder(data_dir: str, config: StdlibConfig) -> StdlibText:
    if any(c.name == config.name for c in StdlibText.BUILDER_CONFIGS):
        config = config.name  # TFDS refuses a config object that shadows a registered one.
    builder = StdlibText(data_dir=data_dir, config=config, file_format="array_record")
    if builder.is_prepared():
        return builder
    os.makedirs(data_dir, exist_ok=True)
    lock_path = os.path.join(data_dir, f".stdlib_text_{builder.builder_config.name}.lock")
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            # Re-create after taking the lock: another process may have finished the build meanwhile.
            builder = StdlibText(data_dir=data_dir, config=config, file_format="array_record")
            if not builder.is_prepared():
                builder.download_and_prepare(
                    download_config=tfds.download.DownloadConfig(try_download_gcs=False)
                )
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
    return StdlibText(data_dir=data_dir, config=config, file_format="array_record")
