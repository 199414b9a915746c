import os
import subprocess
import sys
import sysconfig

import pytest

from sparsejax.data import check_dataset, stdlib_corpus, text_source

SMALL_STDLIB_BYTES = 300_000  # Must match conftest.SMALL_STDLIB_BYTES.


def _records(data_dir):
    builder = stdlib_corpus.stdlib_builder(data_dir, max_bytes=SMALL_STDLIB_BYTES)
    src = builder.as_data_source()
    return {split: [(r["path"].decode(), r["text"]) for r in src[split]] for split in ("train", "validation")}


def test_splits_non_empty_disjoint_and_complete(small_stdlib_dir, small_stdlib_bytes):
    assert small_stdlib_bytes == SMALL_STDLIB_BYTES
    recs = _records(small_stdlib_dir)
    train = {p for p, _ in recs["train"]}
    val = {p for p, _ in recs["validation"]}
    assert train and val
    assert not train & val
    expected = {rel for rel, _ in stdlib_corpus.stdlib_files(sysconfig.get_paths()["stdlib"], SMALL_STDLIB_BYTES)}
    assert train | val == expected
    assert all(stdlib_corpus.is_validation(p, 5) for p in val)
    assert not any(stdlib_corpus.is_validation(p, 5) for p in train)
    assert sum(len(t) for _, t in recs["train"] + recs["validation"]) <= SMALL_STDLIB_BYTES
    assert not any("/test" in p or p.startswith("test") or "site-packages" in p for p in train | val)
    stdlib = sysconfig.get_paths()["stdlib"]
    path, text = recs["train"][0]
    with open(os.path.join(stdlib, path), "rb") as f:
        assert f.read() == text


def test_build_is_deterministic_and_concurrent_safe(small_stdlib_dir, tmp_path):
    # Two processes build into the same fresh dir at once; both must succeed and match the fixture's build.
    code = (
        "import sys; from sparsejax.data import stdlib_corpus as s; "
        f"b = s.stdlib_builder(sys.argv[1], max_bytes={SMALL_STDLIB_BYTES}); "
        "print(len(b.as_data_source('train')))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err.decode()[-2000:]
    assert _records(str(tmp_path)) == _records(small_stdlib_dir)


def test_tfds_source_reads_prepared_dataset(small_stdlib_dir):
    name = stdlib_corpus.make_config(SMALL_STDLIB_BYTES, 5).name
    counts = check_dataset(f"tfds:stdlib_text/{name}", small_stdlib_dir)
    recs = _records(small_stdlib_dir)
    assert counts == {"train": len(recs["train"]), "validation": len(recs["validation"])}
    src = text_source(f"tfds:stdlib_text/{name}:1.0.0", "validation", small_stdlib_dir)
    assert src[0] == recs["validation"][0][1]


@pytest.mark.parametrize(
    "dataset, match",
    [
        ("tfds:mnist", "'tfds:mnist' is not prepared"),
        ("tfds:no_such_dataset_xyz", "'tfds:no_such_dataset_xyz' is not available"),
        ("tfds:stdlib_text/py311_300000b_val5:9.9.9", "is not available"),
        ("files:/no/such/dir/*.txt", "matches no files"),
        ("stdlib:x", "dataset must be"),
        ("tfds:", "dataset must be"),
    ],
)
def test_bad_datasets_raise(small_stdlib_dir, dataset, match):
    with pytest.raises(ValueError, match=match):
        check_dataset(dataset, small_stdlib_dir)


def test_bad_text_key(small_stdlib_dir):
    name = stdlib_corpus.make_config(SMALL_STDLIB_BYTES, 5).name
    with pytest.raises(ValueError, match="text_key 'body'"):
        from sparsejax.data.sources import tfds_source
        tfds_source(f"stdlib_text/{name}", "train", data_dir=small_stdlib_dir, text_key="body")


def test_default_data_dir_env(monkeypatch):
    monkeypatch.setenv("SPARSEJAX_DATA_DIR", "/some/where")
    assert stdlib_corpus.default_data_dir() == "/some/where"
    monkeypatch.delenv("SPARSEJAX_DATA_DIR")
    assert stdlib_corpus.default_data_dir().endswith(os.path.join(".cache", "sparsejax", "tfds"))


def test_bad_builder_args(tmp_path):
    with pytest.raises(ValueError, match="max_bytes"):
        stdlib_corpus.stdlib_builder(str(tmp_path), max_bytes=0)
    with pytest.raises(ValueError, match="validation_percent"):
        stdlib_corpus.stdlib_builder(str(tmp_path), validation_percent=100)
