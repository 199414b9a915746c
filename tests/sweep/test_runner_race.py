"""A trial that another runner finished is never launched again: whether its result.json is
written already, or its process has exited 'done' (releasing the lock) and its runner has not
written the marker yet; in the second case the marker is written by whoever sees it."""
import json
import os

from sparsejax.sweep import grid, runner


def setup(tmp_path, monkeypatch):
    spec = grid.build_spec(["tiny.gin"], ["ModelConfig.num_layers=[1]"], "1", [])
    out = str(tmp_path)
    (trial,) = spec.trials()
    wd = runner.trial_dir(out, trial)
    os.makedirs(wd)
    r = runner.SweepRunner(spec, out, stream=open(os.devnull, "w"))
    monkeypatch.setattr(runner, "summarize_trial", lambda wd: {"final_eval_loss": 1.5})
    monkeypatch.setattr(runner.subprocess, "Popen",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("relaunched")))
    return r, trial, wd


def test_a_trial_finished_elsewhere_is_not_relaunched(tmp_path, monkeypatch):
    r, trial, wd = setup(tmp_path, monkeypatch)
    with open(os.path.join(wd, runner.LOG_FILE), "w") as f:
        f.write("# sweep launch 2026-01-01 00:00:00: python -m sparsejax.cli train\n"
                '{"step": 4, "status": "done"}\n')
    assert r._launch(trial) == "finished"  # exited 'done', marker not yet written
    result = json.load(open(os.path.join(wd, "result.json")))
    assert result["status"] == "done" and result["wall_s"] is None
    assert result["final_eval_loss"] == 1.5
    assert r._launch(trial) == "finished"  # marker present


def test_an_interrupted_trial_is_relaunched(tmp_path, monkeypatch):
    r, trial, wd = setup(tmp_path, monkeypatch)
    with open(os.path.join(wd, runner.LOG_FILE), "w") as f:
        f.write('# sweep launch 2026-01-01 00:00:00: python\n{"status": "done"}\n'
                '# sweep launch 2026-01-01 00:01:00: python\n{"step": 2, "status": "preempted"}\n')
    try:
        r._launch(trial)
    except AssertionError as e:
        assert "relaunched" in str(e)
    else:
        raise AssertionError("an unfinished trial was not launched")
    assert not os.path.exists(os.path.join(wd, "result.json"))
