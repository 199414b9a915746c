"""End to end: a 2 values x 2 seeds sweep on the tiny model is SIGKILLed (runner and trials)
mid-way, rerun, finishes without rerunning finished trials, and its table matches the
trials' metrics.jsonl; `sparsejax report` regenerates the same table."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from sparsejax.sweep import grid, runner

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

ARGS = ["--gin_file=tiny.gin", "--sweep=ModelConfig.num_layers=[1, 2]", "--seeds=2",
        "--parallel=2", "--gin.TrainConfig.num_steps=4", "--gin.TrainConfig.eval_every=4",
        "--gin.TrainConfig.eval_tokens=512", "--gin.TrainConfig.checkpoint_every=2",
        "--gin.TrainConfig.log_every=2", "--gin.TrainConfig.progress_bar=False",
        "--gin.TrainConfig.async_checkpoints=False"]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sweep_cmd(out):
    return [sys.executable, "-m", "sparsejax.cli", "sweep", *ARGS, f"--out={out}"]


def launches(trial_dir):
    with open(os.path.join(trial_dir, runner.LOG_FILE)) as f:
        return f.read().count("# sweep launch ")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Runs the sweep, SIGKILLs the runner's whole process group once two trials are done and
    a third has a checkpoint, then reruns it to completion."""
    out = str(tmp_path_factory.mktemp("sweep"))
    spec = grid.build_spec(["tiny.gin"], ["ModelConfig.num_layers=[1, 2]"], "2",
                           [a[len("--gin."):] for a in ARGS if a.startswith("--gin.")])
    dirs = {t.name: runner.trial_dir(out, t) for t in spec.trials()}
    log1 = open(os.path.join(out, "runner1.log"), "w")
    p = subprocess.Popen(sweep_cmd(out), cwd=REPO, stdout=log1, stderr=subprocess.STDOUT,
                         start_new_session=True)
    t0, killed_with_ckpt = time.time(), None
    while killed_with_ckpt is None:
        assert p.poll() is None, open(log1.name).read()
        assert time.time() - t0 < 240, "sweep made no progress"
        done = [n for n, d in dirs.items() if os.path.isfile(os.path.join(d, "result.json"))]
        ckpt = [n for n, d in dirs.items() if n not in done and
                os.path.isdir(os.path.join(d, "checkpoints", "2"))]
        if len(done) >= 2 and ckpt:
            os.killpg(p.pid, signal.SIGKILL)  # the runner and every trial it started
            killed_with_ckpt = ckpt
        time.sleep(0.05)
    p.wait(timeout=30)
    before = {n: os.stat(os.path.join(dirs[n], "result.json")).st_mtime_ns for n in done}
    assert len(before) < 4, "every trial finished before the kill"
    p2 = subprocess.run(sweep_cmd(out), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p2.returncode == 0, p2.stdout + p2.stderr
    return dict(out=out, spec=spec, dirs=dirs, finished_before=before,
                killed_with_ckpt=killed_with_ckpt, stdout=p2.stdout)


def test_rerun_skips_finished_and_resumes_killed(sweep):
    dirs, before = sweep["dirs"], sweep["finished_before"]
    assert f"{len(before)} already finished" in sweep["stdout"]
    assert "[4/4] done" in sweep["stdout"]
    for name, d in dirs.items():
        assert os.path.isfile(os.path.join(d, "result.json")), name
        if name in before:  # not relaunched, marker untouched
            assert launches(d) == 1
            assert os.stat(os.path.join(d, "result.json")).st_mtime_ns == before[name]
            assert f"start {name}\n" not in sweep["stdout"]
        else:
            assert launches(d) == 2
            assert f"start {name}\n" in sweep["stdout"]
    for name in sweep["killed_with_ckpt"]:  # resumed from its checkpoint, not from scratch
        assert "resumed from step" in open(os.path.join(dirs[name], runner.LOG_FILE)).read()


def _read_csv(out):
    with open(os.path.join(out, "results.csv")) as f:
        return list(csv.DictReader(f))


def test_table_matches_trial_metrics(sweep):
    out, dirs = sweep["out"], sweep["dirs"]
    rows = {r["num_layers"]: r for r in _read_csv(out)}
    assert set(rows) == {"1", "2"}
    for layers in ("1", "2"):
        finals, bests, tps = [], [], []
        for seed in (0, 1):
            recs = [json.loads(line) for line in
                    open(os.path.join(dirs[f"num_layers={layers},seed={seed}"], "metrics.jsonl"))]
            evals = [r["eval_loss"] for r in recs if "eval_loss" in r]
            assert [r["step"] for r in recs if "eval_loss" in r] == [4]  # resumed runs: no dup
            finals.append(evals[-1])
            bests.append(min(evals))
            tps.append(np.mean([r["tokens_per_s"] for r in recs if "tokens_per_s" in r][1:]))
        row = rows[layers]
        assert int(row["n_seeds"]) == 2
        np.testing.assert_allclose(float(row["final_eval_loss_mean"]), np.mean(finals), rtol=1e-9)
        np.testing.assert_allclose(float(row["final_eval_loss_std"]), np.std(finals, ddof=1),
                                   rtol=1e-6)
        np.testing.assert_allclose(float(row["best_eval_loss_mean"]), np.mean(bests), rtol=1e-9)
        np.testing.assert_allclose(float(row["tokens_per_s"]), np.mean(tps), rtol=1e-9)
        # Hand count for tiny.gin (embed 64, mlp 128, 4 heads x 16, 2 kv heads, vocab 259
        # padded to 384 for sharding; the padding is not counted): per layer q 64*64 + k,v
        # 2*64*32 + out 64*64 + mlp 3*64*128 = 36864 kernel entries + 2 norms; embedding
        # 259*64; lm_head 64*259; final norm 64.
        n = int(layers)
        params = 259 * 64 + 64 + n * (36864 + 2 * 64) + 64 * 259
        assert float(row["params"]) == params == float(row["avg_params"])
        assert float(row["flops_per_token"]) == 2 * (n * 36864 + 64 * 259)  # no embed FLOPs
    md = open(os.path.join(out, "results.md")).read()
    m, s = np.mean(finals), np.std(finals, ddof=1)  # the num_layers=2 row
    assert f"| 2 | 2/2 | {m:.4f} ± {s:.4f} |" in md


def test_plots_written(sweep):
    out = sweep["out"]
    for name in ("loss_curves.png", "eval_loss_vs_num_layers.png"):
        with open(os.path.join(out, name), "rb") as f:
            head = f.read(8)
        assert head == b"\x89PNG\r\n\x1a\n", name
        assert os.path.getsize(os.path.join(out, name)) > 5000


def test_report_regenerates_table(sweep):
    out = sweep["out"]
    want = open(os.path.join(out, "results.csv")).read()
    os.remove(os.path.join(out, "results.csv"))
    os.remove(os.path.join(out, "loss_curves.png"))
    p = subprocess.run([sys.executable, "-m", "sparsejax.cli", "report", f"--out={out}"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["finished"] == 4
    assert open(os.path.join(out, "results.csv")).read() == want
    assert os.path.isfile(os.path.join(out, "loss_curves.png"))
