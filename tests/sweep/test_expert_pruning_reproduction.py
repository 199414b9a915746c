"""The expert_pruning reproduction (experiments/expert_pruning.py) end to end on a shrunk
setup: a tiny 4-expert MoE trained 6 steps, reduced to 2 experts by merge and REAP with two
calibration seeds and fine-tuned 2 steps; its records, the paired differences on the page,
the plot, a rerun that skips finished points, and the page registered in reproduce.py."""
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n",
        "for i in range(10):\n    total += i * i\n", "class Point:\n    x: int = 0\n"]


def load(name):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def test_harness_end_to_end_on_a_shrunk_setup(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(40):
        (root / f"doc_{i:02d}.txt").write_text(DOCS[i % 4] * (1 + i % 3))
    ep = load("expert_pruning")
    source = ("--gin_file=tiny.gin", "--gin_file=moe/top2.gin", "--gin.MoeMlp.num_experts=4",
              "--gin.MoeMlp.mlp_dim=32", f"--gin.TrainConfig.dataset='files:{root}/*.txt'",
              "--gin.TrainConfig.global_batch_size=8", "--gin.TrainConfig.seq_len=32",
              "--gin.TrainConfig.eval_tokens=256", "--gin.TrainConfig.eval_every=3",
              "--gin.TrainConfig.log_every=3", "--gin.TrainConfig.checkpoint_every=6",
              "--gin.TrainConfig.async_checkpoints=False", "--gin.TrainConfig.progress_bar=False")
    out = str(tmp_path / "runs")
    kw = dict(methods=("merge", "reap"), fractions=(0.5,), seeds=(0, 1), source_flags=source,
              source_steps=6, finetune_steps=2, prune_flags=("--calibration_samples=8",),
              num_experts=4)
    assert ep.run(out, **kw) == 0
    records = ep.load_results(out)
    assert sorted(r["key"] for r in records) == ["merge|2|0", "merge|2|1", "reap|2|0",
                                                 "reap|2|1"]
    for r in records:
        dst = os.path.join(out, ep.WORK_DIR, "points", r["key"].replace("|", "_"))
        assert "MoeMlp.num_experts = 2" in open(os.path.join(dst, "config.gin")).read()
        report = json.load(open(os.path.join(dst, "prune_report.json")))
        assert report["settings"]["experts"] == r["method"]
        assert report["settings"]["calibration_seed"] == r["seed"]
        assert r["pruned_loss"] == report["eval_after"]["eval_loss"]
        assert np.isfinite(r["finetuned_loss"]) and r["finetuned_loss"] != r["pruned_loss"]
        assert r["dense_loss"] == records[0]["dense_loss"]  # one source
    by = {(r["method"], r["seed"]): r for r in records}
    rows = {r["reducer"]: r for r in ep.summary_rows(records)}
    diffs = [by["merge", s]["pruned_loss"] - by["reap", s]["pruned_loss"] for s in (0, 1)]
    assert rows["merge"]["pruned_delta"][0] == pytest.approx(np.mean(diffs))
    assert rows["merge"]["pruned_delta"][1] == pytest.approx(np.std(diffs, ddof=1) / np.sqrt(2))
    assert rows["reap"]["pruned_delta"] is None and rows["merge"]["seeds"] == 2
    md = ep.markdown(records)
    assert md.count("\n| 2 | ") == 2 and f"{np.mean(diffs):+.4f} ± " in md
    assert os.path.isfile(ep.plot(records, str(tmp_path / "p.png")))

    before = open(ep.results_path(out)).read()  # a rerun finds every point finished
    assert ep.run(out, **kw) == 0 and open(ep.results_path(out)).read() == before

    rep = load("reproduce")
    assert "expert_pruning" in rep.CUSTOM
    results = tmp_path / "results"
    results.mkdir()
    page = results / "expert_pruning.md"
    page.write_text(f"# E\n\nClaim: x.\n\n{rep.BEGIN}\n{rep.END}\n\nWe see: y.\n")
    assert rep.main(["expert_pruning", "--report_only", f"--out={out}",
                     f"--results_dir={results}"]) == 0
    text = page.read_text()
    assert text.startswith("# E\n\nClaim: x.\n\n") and text.endswith("\n\nWe see: y.\n")
    assert "| 2 | merge | 2 |" in text and "expert_pruning.png" in text


def test_shipped_source_and_points():
    from sparsejax import config as config_lib
    from sparsejax.models.moe.layer import MoeMlp
    from sparsejax.models.transformer import ModelConfig
    ep = load("expert_pruning")
    files = [f.split("=", 1)[1] for f in ep.SOURCE_FLAGS if f.startswith("--gin_file=")]
    config_lib.parse_gin(files, [f[len("--gin."):] for f in ep.SOURCE_FLAGS
                                 if f.startswith("--gin.")])
    mc = ModelConfig()
    moe = MoeMlp(embed_dim=mc.embed_dim)
    assert moe.num_experts == ep.NUM_EXPERTS == 16 and moe.top_k == 2
    assert [mc.mlp_kind(i) for i in range(mc.num_layers)].count("moe") == 2
    pts = ep.points(ep.METHODS, ep.FRACTIONS, ep.SEEDS, ep.NUM_EXPERTS)
    assert len(pts) == 24 and {p["num_experts"] for p in pts} == {12, 8}
    assert set(ep.METHODS) == {"frequency", "reconstruction", "merge", "reap"}
    assert ep.REFERENCE in ep.METHODS
