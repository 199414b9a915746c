"""The post-training reproduction's page writer (experiments/posttrain_report.py): the grid's
tables and the papers' numbers are separate blocks, so a `--papers_only` run (no grid
records) adds its table and keeps the grid that an earlier run wrote."""
import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location(
        "posttrain_report", REPO / "experiments" / "posttrain_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_papers_only_run_keeps_the_grid_and_the_text_around_it(tmp_path):
    rep = _module()
    results = tmp_path / "results"
    results.mkdir()
    md = results / "posttrain.md"
    grid = "| method | 50% |\n|---|---|\n| magnitude | 4.754 |"
    md.write_text(f"# Page\n\nclaim\n\n{rep.BEGIN}\n{grid}\n{rep.END}\n\n**What we see** kept\n")
    out = tmp_path / "out"
    out.mkdir()
    paper = {"key": "dense", "method": "dense", "level": None, "window": 256,
             "perplexity": 4.5, "loss": 1.504, "loss_stderr": 0.01, "tokens": 1000,
             "windows": 4, **{f"{t}/acc": 0.5 for t in rep.PAPER_TASKS},
             **{f"{t}/acc_stderr": 0.05 for t in rep.PAPER_TASKS}}
    (out / "papers.jsonl").write_text(json.dumps(paper) + "\n")
    got = rep.write_report(str(out), str(results), "unused")
    assert got["points"] == 0 and got["papers"] == 1
    page = md.read_text()
    assert grid in page and "**What we see** kept" in page and page.startswith("# Page")
    assert page.count(rep.PAPERS_BEGIN) == 1 and "| dense | 4.500" in page
    # a second run replaces the papers' block instead of appending another
    paper["perplexity"] = 4.25
    (out / "papers.jsonl").write_text(json.dumps(paper) + "\n")
    rep.write_report(str(out), str(results), "unused")
    page = md.read_text()
    assert page.count(rep.PAPERS_BEGIN) == 1 and "| dense | 4.250" in page
    assert "| dense | 4.500" not in page and grid in page
