"""Fixtures for data tests: a tiny synthetic `files:` corpus and a small stdlib corpus build."""
import numpy as np
import pytest

from sparsejax.data import stdlib_corpus

SMALL_STDLIB_BYTES = 300_000


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> dict:
    """40 files doc_00.txt..doc_39.txt of printable ASCII, 20..400 bytes, some longer than the test seq_len."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    docs = {}
    for i in range(40):
        n = int(rng.integers(20, 400))
        text = "".join(chr(c) for c in rng.integers(32, 127, size=n))
        name = f"doc_{i:02d}.txt"
        (root / name).write_text(text)
        docs[name] = text.encode()
    return {"root": root, "dataset": f"files:{root}/*.txt", "docs": docs}


@pytest.fixture(scope="session")
def small_stdlib_bytes() -> int:
    return SMALL_STDLIB_BYTES


@pytest.fixture(scope="session")
def small_stdlib_dir(tmp_path_factory) -> str:
    """A data dir holding the stdlib corpus capped at SMALL_STDLIB_BYTES, built once."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    stdlib_corpus.stdlib_builder(data_dir, max_bytes=SMALL_STDLIB_BYTES)
    return data_dir
