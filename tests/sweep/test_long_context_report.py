"""The long-context frontier's page writer (experiments/long_context.py): the table goes
between the frontier markers, the text around them is kept, every setting is a row with its
difference to dense, the longeval columns appear only when longeval ran, and the plot is
written."""
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _module(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "experiments"))
    spec = importlib.util.spec_from_file_location("long_context_experiment",
                                                  REPO / "experiments" / "long_context.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "long_context_experiment", mod)
    spec.loader.exec_module(mod)
    return mod


def record(method, setting, density, loss, longeval):
    return {"method": method, "setting": setting, "density": density, "recall_mean": density,
            "recall_min": density / 2, "output_error": 1 - density, "eval_loss": loss,
            "eval_loss_stderr": 0.01, "longeval": longeval,
            "longeval_mean": sum(longeval.values()) / len(longeval) if longeval else float("nan")}


def test_frontier_table_between_the_markers(tmp_path, monkeypatch):
    lc = _module(monkeypatch)
    md = tmp_path / "long_context.md"
    md.write_text(f"# Page\n\nclaim kept\n\n{lc.BEGIN}\nSTALE TABLE\n{lc.END}\n\ntext kept\n")
    for longeval in ({"1024": 0.5, "2048": 0.25}, {}):
        records = [record("dense", {}, 1.0, 1.5, longeval),
                   record("xattention", {"threshold": 0.9, "stride": 8}, 0.4, 1.6, longeval)]
        lc.write_report(records, "W", 256, 16, str(tmp_path))
        text = md.read_text()
        assert "claim kept" in text and "text kept" in text and "STALE TABLE" not in text
        rows = [line for line in text.splitlines() if line.startswith("|")]
        assert len(rows) == 4 and len({row.count("|") for row in rows}) == 1
        assert "| xattention | threshold=0.9, stride=8 | 0.400 |" in rows[3]
        assert "1.6000 (+0.1000)" in rows[3]
        assert ("longeval 2048" in rows[0]) == bool(longeval)
        assert (tmp_path / "long_context_frontier.png").stat().st_size > 0
