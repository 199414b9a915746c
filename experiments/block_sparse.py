"""The block_sparse reproduction of experiments/reproduce.py: at equal training time, does a
block-sparse model (or a wider block-sparse model) beat the dense one?

    python experiments/reproduce.py block_sparse                  # run (resumable), then report
    python experiments/reproduce.py block_sparse --report_only    # redraw the page

Variants, each a grid point of one of GRIDS (configs/experiments/small.gin, 3 seeds, paired by
seed with dense): dense (dense_small, shared with the other reproductions), unstructured RigL
(block_sparse_rigl), block RigL with 16/32 blocks (block_sparse_block_rigl) and 64 blocks
(block_sparse_block_rigl64: at 0.2 only, the one-block floor), block static
with 32 blocks (block_sparse_block_static) and a 2x wider model under block RigL at density
0.25 (block_sparse_wide). Three passes, in this order:

1. Calibration, once (<out>/block_sparse/calibration.json, reused by reruns): every variant,
   dense included, trains `calibration_steps` steps with eval off, one trial at a time; its
   tokens/s is the mean of the logged intervals after the first (which holds compilation).
   Drop/grow variants update at the full run's cadence in steps, so the measured intervals
   hold about as many updates per step as the full run does.
2. Equal steps: the grids as they are, in <out>/<grid>/.
3. Equal wall-clock: each other variant trains round(steps * its tokens/s / dense's) steps
   (learning-rate warmup and drop/grow schedules as fractions of the run), in
   <out>/block_sparse_time/<grid>,<point>/; a variant at `steps` steps reuses its
   equal-steps trials.
"""
from __future__ import annotations

import ast
import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from sparsejax.analysis.plots import distinct_colors
from sparsejax.config import run_step
from sparsejax.sweep import compare, grid, runner
from sparsejax.sweep.report import check_one_corpus
from sparsejax.train.metrics import read_metrics

HERE = os.path.dirname(os.path.abspath(__file__))
GRIDS_DIR = os.path.join(HERE, "grids")
GRIDS = ("dense_small", "block_sparse_rigl", "block_sparse_block_rigl",
         "block_sparse_block_rigl64", "block_sparse_block_static", "block_sparse_wide")
BASELINE = "dense_small: name=dense"
STEPS = 300  # small.gin's run length: the equal-steps runs, and dense's time budget
CALIBRATION_STEPS, CALIBRATION_LOG_EVERY = 60, 20
WARMUP = 0.1  # small.gin's learning-rate warmup, 30 of its 300 steps, as a fraction of the run
WORK_DIR = "block_sparse"  # <out>/block_sparse/: calibration.json and the calibration trials
TIME_DIR = "block_sparse_time"  # <out>/block_sparse_time/<variant>/: equal wall-clock trials
CALIBRATION_FILE = "calibration.json"
EXTRA_COLUMNS = (("steps", "steps"), ("calibrated tokens/s", "calibrated_tokens_per_s"),
                 ("speed vs dense", "speed_vs_dense"))


@dataclasses.dataclass(frozen=True)
class Arm:
    """One variant: a grid point of one of the reproduction's grids."""

    grid_name: str
    spec: grid.SweepSpec
    point: tuple[tuple[str, str], ...]

    @property
    def label(self) -> str:
        """The variant's name in the tables (as compare.collect names the grid point)."""
        return f"{self.grid_name}: {grid.point_name(self.point)}"

    @property
    def slug(self) -> str:
        """Its directory name under the calibration and equal wall-clock dirs."""
        return variant_slug(self.grid_name, self.point)


def variant_slug(grid_name: str, point: Sequence[tuple[str, str]]) -> str:
    return f"{grid_name},{grid.point_name(point)}"


def load_specs(grids: Sequence[str] = GRIDS) -> dict[str, grid.SweepSpec]:
    """{grid name: its spec} of grid files under experiments/grids/."""
    return {g: grid.build_spec(grid_file=os.path.join(GRIDS_DIR, f"{g}.grid")) for g in grids}


def arms(specs: Mapping[str, grid.SweepSpec]) -> list[Arm]:
    return [Arm(g, s, p) for g, s in specs.items() for p in s.points()]


def _variant_spec(arm: Arm, seeds: tuple[int, ...], overrides: Sequence[str],
                  sweeps: Sequence[tuple[str, tuple[str, ...]]] = ()) -> grid.SweepSpec:
    """The spec of one variant alone (its point as one-value sweeps) with more settings."""
    return grid.SweepSpec(gin_files=arm.spec.gin_files,
                          sweeps=tuple((b, (v,)) for b, v in arm.point) + tuple(sweeps),
                          seeds=seeds, overrides=arm.spec.overrides + tuple(overrides))


def drop_grow_every(spec: grid.SweepSpec, steps: int) -> int | None:
    """Steps between drop/grow updates in a run of `steps` steps, from the spec's
    `DropGrowSchedule.frequency` setting (None when it sets none: no drop/grow)."""
    values = [o.split("=", 1)[1] for o in spec.overrides
              if o.split("=", 1)[0].strip() == "DropGrowSchedule.frequency"]
    if not values:
        return None
    return run_step(ast.literal_eval(values[-1].strip()), steps, "DropGrowSchedule.frequency", 1)


def calibration_spec(arm: Arm, steps: int = STEPS, calibration_steps: int = CALIBRATION_STEPS,
                     log_every: int = CALIBRATION_LOG_EVERY) -> grid.SweepSpec:
    """The variant's first seed for `calibration_steps` steps, eval off, logging every
    `log_every`; a drop/grow variant updates every as many steps as in its run of `steps`."""
    extra = [f"TrainConfig.num_steps={calibration_steps}", f"TrainConfig.log_every={log_every}",
             "TrainConfig.eval_tokens=0"]
    every = drop_grow_every(arm.spec, steps)
    if every is not None:
        extra += [f"DropGrowSchedule.frequency={every}", "DropGrowSchedule.end=1.0"]
    return _variant_spec(arm, arm.spec.seeds[:1], extra)


def time_spec(arm: Arm, num_steps: int) -> grid.SweepSpec:
    """The variant's seeds trained for `num_steps` steps, warmup as a fraction of the run."""
    return _variant_spec(arm, arm.spec.seeds, [f"learning_rate_schedule.warmup_steps={WARMUP}"],
                         sweeps=(("TrainConfig.num_steps", (str(num_steps),)),))


def calibration_path(out: str) -> str:
    return os.path.join(out, WORK_DIR, CALIBRATION_FILE)


def time_dir(out: str, slug: str) -> str:
    return os.path.join(out, TIME_DIR, slug)


def time_matched_steps(calibration: Mapping[str, Any], baseline: str = BASELINE,
                       steps: int = STEPS) -> dict[str, int]:
    """{variant: round(steps * its tokens/s / the baseline's)} from a calibration."""
    tps = {label: v["tokens_per_s"] for label, v in calibration["variants"].items()}
    if baseline not in tps:
        raise ValueError(f"baseline={baseline!r} has no calibration; calibrated: {sorted(tps)}")
    return {label: max(1, round(steps * t / tps[baseline])) for label, t in tps.items()}


def run_spec(spec: grid.SweepSpec, sweep_dir: str, parallel: int) -> int:
    """Runs (or resumes) a sweep into `sweep_dir`. Returns the number of failed trials."""
    sweep = runner.run_sweep(spec, sweep_dir, parallel=parallel)
    if sweep.stopped:
        raise KeyboardInterrupt
    return len(sweep.failed)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = re.findall(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
    except OSError:
        names = []
    return names[0].strip() if names else ""


def machine() -> dict[str, Any]:
    """The host and JAX's first device, asked in a child process as the trials are run (this
    process never initializes a backend, so it holds no accelerator memory)."""
    probe = ("import jax; d = jax.devices()[0]; print(d.platform + '\\t' + d.device_kind)")
    lines = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                           check=True).stdout.strip().splitlines()
    device_platform, device_kind = lines[-1].split("\t")
    return {"processor": platform.processor(), "cpu_model": _cpu_model(),
            "cpu_count": os.cpu_count(), "device_platform": device_platform,
            "device_kind": device_kind}


def _trial_tokens_per_s(sweep_dir: str, spec: grid.SweepSpec) -> dict[str, Any]:
    """Tokens/s of a finished calibration trial: its logged intervals after the first."""
    wd = runner.trial_dir(sweep_dir, spec.trials()[0])
    records = read_metrics(os.path.join(wd, "metrics.jsonl"))
    intervals = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]
    with open(os.path.join(wd, "config.gin")) as f:
        bound = dict(re.findall(r"^TrainConfig\.(global_batch_size|seq_len)\s*=\s*(\d+)\s*$",
                                f.read(), re.MULTILINE))
    return {"tokens_per_s": float(np.mean(intervals)), "intervals": intervals,
            "tokens_per_step": int(bound["global_batch_size"]) * int(bound["seq_len"])}


def load_calibration(out: str) -> dict[str, Any] | None:
    path = calibration_path(out)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def calibrate(out: str, variants: Sequence[Arm], steps: int = STEPS,
              calibration_steps: int = CALIBRATION_STEPS,
              log_every: int = CALIBRATION_LOG_EVERY) -> tuple[dict[str, Any] | None, int]:
    """(calibration, failed trials): <out>/block_sparse/calibration.json if it exists (refused
    if measured with other settings), else every variant measured now, one after another."""
    if calibration_steps < 2 * log_every:
        raise ValueError(f"calibration_steps={calibration_steps} must be at least 2 * log_every="
                         f"{2 * log_every}: the first logged interval includes compilation")
    specs = {a.label: calibration_spec(a, steps, calibration_steps, log_every) for a in variants}
    path = calibration_path(out)
    cal = load_calibration(out)
    if cal is not None:
        stale = [label for label, s in specs.items()
                 if cal["variants"].get(label, {}).get("spec") != s.to_json()]
        if stale:
            raise ValueError(f"{path} holds no calibration, or one with other settings, of "
                             f"{stale}; delete it and {os.path.join(out, TIME_DIR)} to calibrate "
                             "again")
        return cal, 0
    trials = os.path.join(out, WORK_DIR, "calibration")
    shutil.rmtree(trials, ignore_errors=True)  # a pass cut short: measure all again, back to back
    measured = {}
    for a in variants:
        d = os.path.join(trials, a.slug)
        failed = run_spec(specs[a.label], d, parallel=1)
        if failed:
            return None, failed
        measured[a.label] = {**_trial_tokens_per_s(d, specs[a.label]),
                             "spec": specs[a.label].to_json()}
    cal = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "machine": machine(), "steps": calibration_steps, "log_every": log_every,
           "variants": measured}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(cal, f, indent=1)
    os.replace(tmp, path)
    return cal, 0


def run(out: str, parallel: int = 2, specs: Mapping[str, grid.SweepSpec] | None = None,
        baseline: str = BASELINE, steps: int = STEPS, calibration_steps: int = CALIBRATION_STEPS,
        log_every: int = CALIBRATION_LOG_EVERY) -> int:
    """Calibration, equal steps, equal wall-clock (see the module doc); resumable. `specs`
    ({grid name: spec}, default the shipped GRIDS) are the equal-steps sweeps, `steps` their
    run length. Returns the number of failed trials."""
    specs = load_specs() if specs is None else dict(specs)
    for spec in specs.values():
        runner.validate_spec(spec)
    variants = arms(specs)
    labels = [a.label for a in variants]
    if baseline not in labels:
        raise ValueError(f"baseline={baseline!r} is not a variant; valid: {labels}")
    cal, failed = calibrate(out, variants, steps, calibration_steps, log_every)
    for g, spec in specs.items():
        failed += run_spec(spec, os.path.join(out, g), parallel)
    if cal is None:
        return failed
    matched = time_matched_steps(cal, baseline, steps)
    for a in variants:
        if a.label != baseline and matched[a.label] != steps:
            failed += run_spec(time_spec(a, matched[a.label]), time_dir(out, a.slug), parallel)
    return failed


# --- report ------------------------------------------------------------------------------------


def _collect(sweep_dirs: Sequence[str], allow_mixed_corpora: bool) -> list[compare.Variant]:
    return compare.collect([d for d in sweep_dirs
                            if os.path.isfile(os.path.join(d, runner.SPEC_FILE))],
                           allow_mixed_corpora)


def results(out: str, grids: Sequence[str] = GRIDS, baseline: str = BASELINE,
            steps: int = STEPS, allow_mixed_corpora: bool = False
            ) -> tuple[list[compare.Variant], list[compare.Variant], dict[str, Any] | None]:
    """(equal-steps variants, equal wall-clock variants, calibration) from the trials in
    `out`; the equal wall-clock list is empty until calibrated and reuses the equal-steps
    variants of the baseline and of variants at `steps` steps."""
    equal = _collect([os.path.join(out, g) for g in grids], allow_mixed_corpora)
    cal = load_calibration(out)
    if cal is None:
        return equal, [], None
    matched = time_matched_steps(cal, baseline, steps)
    timed = []
    for v in equal:
        if v.label == baseline or matched.get(v.label) == steps:
            timed.append(v)
            continue
        d = time_dir(out, variant_slug(os.path.basename(os.path.normpath(v.sweep_dir)), v.point))
        found = _collect([d], allow_mixed_corpora)
        tv = found[0] if found else compare.Variant(v.label, d, v.point, [])
        tv.label = v.label
        timed.append(tv)
    check_one_corpus([r for v in equal + timed for r in v.results], allow_mixed_corpora)
    return equal, timed, cal


def table_rows(variants: Sequence[compare.Variant], calibration: Mapping[str, Any] | None,
               baseline: str = BASELINE) -> list[dict[str, Any]]:
    """compare.compare_rows plus the steps trained and the calibrated tokens/s."""
    rows = compare.compare_rows(
        variants, baseline if any(v.label == baseline for v in variants) else None)
    calibrated = (calibration or {"variants": {}})["variants"]
    tps = {label: c["tokens_per_s"] for label, c in calibrated.items()}
    for row, v in zip(rows, variants):
        done = sorted({r["final_step"] for r in v.results if r.get("final_step")})
        row["steps"] = ", ".join(str(s) for s in done) or None
        t = tps.get(v.label)
        row["calibrated_tokens_per_s"] = None if t is None else f"{t:,.0f}"
        row["speed_vs_dense"] = None if t is None or baseline not in tps else \
            f"{t / tps[baseline]:.2f}x"
    return rows


def markdown(equal: Sequence[compare.Variant], timed: Sequence[compare.Variant],
             calibration: Mapping[str, Any] | None, baseline: str = BASELINE,
             steps: int = STEPS) -> str:
    """Both tables and a line on the calibration."""
    parts = [f"**Equal steps** ({steps} steps each):", "",
             compare.markdown_table(table_rows(equal, calibration, baseline), EXTRA_COLUMNS)]
    if calibration is None:
        parts += ["**Equal wall-clock**: not calibrated yet."]
        return "\n".join(parts)
    m = calibration["machine"]
    cpu = m["cpu_model"] or m["processor"] or "CPU"
    parts += [f"**Equal wall-clock** (each variant trains round({steps} × its calibrated "
              f"tokens/s / dense's) steps, the time dense takes for {steps}; a variant at {steps} "
              "steps shows its equal-steps trials):", "",
              compare.markdown_table(table_rows(timed, calibration, baseline), EXTRA_COLUMNS),
              f"Calibration ({WORK_DIR}/{CALIBRATION_FILE}, {calibration['date']}): {cpu}, "
              f"{m['cpu_count']} CPUs, JAX device {m['device_platform']}:{m['device_kind']}; "
              f"each variant trained {calibration['steps']} steps alone with eval off; its "
              f"tokens/s is the mean of the logged {calibration['log_every']}-step intervals "
              "after the first."]
    return "\n".join(parts)


def plot(equal: Sequence[compare.Variant], timed: Sequence[compare.Variant],
         calibration: Mapping[str, Any] | None, path: str) -> str | None:
    """Eval loss against calibrated training time (one seed per variant, equal wall-clock
    runs) and the final eval loss of each variant in both comparisons. None before any
    trial has finished."""
    if not any(v.results for v in list(equal) + list(timed)):
        return None
    labels = [v.label for v in equal]
    colors = dict(zip(labels, distinct_colors(len(labels))))
    fig = Figure(figsize=(13, 5))
    ax1, ax2 = fig.subplots(1, 2)
    cal = (calibration or {"variants": {}})["variants"]
    late = []
    for v in timed:
        c = cal.get(v.label)
        if not v.results or c is None:
            continue
        curve = compare.eval_curve(v.metrics[0])
        x = np.array([s for s, _ in curve], float) * c["tokens_per_step"] / c["tokens_per_s"]
        y = np.array([loss for _, loss in curve])
        late += list(y[x >= x.max() / 3])
        ax1.plot(x, y, "o-", ms=3, color=colors[v.label],
                 label=f"{v.label} (seed {v.results[0]['_trial'].seed})")
    if late:
        pad = 0.05 * (max(late) - min(late) or 1.0)
        ax1.set_ylim(min(late) - pad, max(late) + pad)
        ax1.legend(fontsize=6)
    ax1.set(xlabel="training time (s) at the calibrated tokens/s", ylabel="eval loss (nats/token)",
            title="equal wall-clock: eval loss over training")
    for offset, marker, name, variants in ((-0.15, "o", "equal steps", equal),
                                           (0.15, "s", "equal wall-clock", timed)):
        for v in variants:
            finals = [r["final_eval_loss"] for r in v.results
                      if r.get("final_eval_loss") is not None]
            if not finals:
                continue
            i = labels.index(v.label) + offset
            ax2.scatter(finals, [i] * len(finals), color=colors[v.label], marker=marker, alpha=0.4,
                        s=14)
            ax2.errorbar(np.mean(finals), i, xerr=np.std(finals, ddof=1) if len(finals) > 1 else 0,
                         fmt=marker, color=colors[v.label], capsize=3, ms=7,
                         mfc="white" if marker == "s" else None)
    ax2.scatter([], [], marker="o", color="gray", label="equal steps")
    ax2.scatter([], [], marker="s", edgecolors="gray", facecolors="white",
                label="equal wall-clock")
    ax2.set_yticks(range(len(labels)), labels, fontsize=7)
    ax2.invert_yaxis()
    ax2.set(xlabel="final eval loss (small: seeds; large: mean ± std)",
            title="final eval loss per variant")
    ax2.legend(fontsize=7)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
