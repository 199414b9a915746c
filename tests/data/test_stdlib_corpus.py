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
    src = text_source(f"tfds:stdlib_text/{name}:2.0.0", "validation", small_stdlib_dir)
    assert src[0] == recs["validation"][0][1]


@pytest.mark.parametrize(
    "dataset, match",
    [
        ("tfds:mnist", "'tfds:mnist' is not prepared"),
        ("tfds:no_such_dataset_xyz", "'tfds:no_such_dataset_xyz' is not available"),
        (f"tfds:stdlib_text/{stdlib_corpus.make_config(SMALL_STDLIB_BYTES, 5).name}:9.9.9", "is not available"),
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
    with pytest.raises(ValueError, match=r"stdlib_builder.max_bytes=0 must be None \(the whole library\)"):
        stdlib_corpus.stdlib_builder(str(tmp_path), max_bytes=0)
    with pytest.raises(ValueError, match="stdlib_builder.validation_percent=100"):
        stdlib_corpus.stdlib_builder(str(tmp_path), validation_percent=100)


def test_default_corpus_is_the_whole_library_with_its_size_stored_and_printed(tmp_path, capsys):
    builder = stdlib_corpus.stdlib_builder(str(tmp_path))
    err = capsys.readouterr().err
    info = stdlib_corpus.corpus_info(builder)
    every = stdlib_corpus.stdlib_files(sysconfig.get_paths()["stdlib"])
    assert info["files"] <= len(every) and info["files"] >= len(every) - 5  # a few are not UTF-8
    assert info["files"] == sum(len(builder.as_data_source(s)) for s in ("train", "validation"))
    assert info["bytes"] > 5_000_000 and info["tokens"] == info["bytes"] + 2 * info["files"]
    assert info["splits"]["train"]["files"] + info["splits"]["validation"]["files"] == info["files"]
    assert f"{info['files']} files, {info['bytes']:,} bytes, {info['tokens']:,} tokens" in err
    assert info["fingerprint"] in err and "built the stdlib corpus" in err
    stdlib_corpus.stdlib_builder(str(tmp_path))  # already built: silent
    assert capsys.readouterr().err == ""


def test_capped_corpus_is_a_hash_sample_not_an_alphabetical_prefix():
    stdlib = sysconfig.get_paths()["stdlib"]
    every = stdlib_corpus.stdlib_files(stdlib)
    sample = stdlib_corpus.stdlib_files(stdlib, SMALL_STDLIB_BYTES)
    total = sum(p.stat().st_size for _, p in sample)
    assert total <= SMALL_STDLIB_BYTES and len(sample) < len(every)
    ranks = {rel: i for i, (rel, _) in enumerate(every)}
    chosen = sorted(ranks[rel] for rel, _ in sample)
    assert chosen[-1] > 0.8 * len(every) and chosen[0] < 0.2 * len(every)  # spread over the tree
    by_hash = sorted(every, key=lambda f: stdlib_corpus._sample_key(f[0]))
    assert {rel for rel, _ in by_hash[:len(sample)]} == {rel for rel, _ in sample}


def test_fingerprint_follows_contents_paths_and_splits(tmp_path):
    lib = tmp_path / "lib"
    (lib / "pkg").mkdir(parents=True)
    (lib / "tests").mkdir()
    for name, text in [("a.py", "x = 1\n"), ("pkg/b.py", "y = 2\n"), ("tests/t.py", "skip\n")]:
        (lib / name).write_text(text)
    first = stdlib_corpus.read_corpus(str(lib), None, 5)["info"]
    assert first["files"] == 2 and first["bytes"] == 12 and first["tokens"] == 16
    assert stdlib_corpus.read_corpus(str(lib), None, 5)["info"]["fingerprint"] == first["fingerprint"]
    (lib / "tests" / "t.py").write_text("changed\n")  # not in the corpus: same fingerprint
    assert stdlib_corpus.read_corpus(str(lib), None, 5)["info"]["fingerprint"] == first["fingerprint"]
    (lib / "a.py").write_text("x = 3\n")
    changed = stdlib_corpus.read_corpus(str(lib), None, 5)["info"]["fingerprint"]
    assert changed != first["fingerprint"]
    (lib / "pkg" / "b.py").rename(lib / "pkg" / "c.py")
    assert stdlib_corpus.read_corpus(str(lib), None, 5)["info"]["fingerprint"] != changed
    splits = {stdlib_corpus.read_corpus(str(lib), None, v)["info"]["fingerprint"] for v in (1, 50, 99)}
    assert len(splits) > 1  # the split assignment is part of the fingerprint


def test_corpus_summary_fingerprints(small_stdlib_dir, tmp_path):
    from sparsejax.data.sources import corpus_summary
    stdlib = corpus_summary("stdlib", small_stdlib_dir)
    # check_dataset's default corpus is the whole library, built here in its own dir.
    builder = stdlib_corpus.stdlib_builder(small_stdlib_dir)
    assert stdlib["corpus_fingerprint"] == stdlib_corpus.corpus_info(builder)["fingerprint"]
    assert stdlib["corpus_tokens"] == stdlib_corpus.corpus_info(builder)["tokens"]
    for i in range(30):
        (tmp_path / f"d{i}.txt").write_text("word " * (i + 1))
    files = corpus_summary(f"files:{tmp_path}/*.txt")
    assert sum(files["corpus_documents"].values()) == 30
    assert corpus_summary(f"files:{tmp_path}/*.txt") == files
    (tmp_path / "d3.txt").write_text("other")
    assert corpus_summary(f"files:{tmp_path}/*.txt")["corpus_fingerprint"] != files["corpus_fingerprint"]
    name = stdlib_corpus.make_config(SMALL_STDLIB_BYTES, 5).name
    tf = corpus_summary(f"tfds:stdlib_text/{name}", small_stdlib_dir)
    assert len(tf["corpus_fingerprint"]) == 16 and tf["corpus_fingerprint"] != stdlib["corpus_fingerprint"]
