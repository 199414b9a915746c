"""Metric sinks: WORKDIR/metrics.jsonl (one JSON object per logged step) and TensorBoard, and the
per-step losses averaged over each logging interval."""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import jax
import numpy as np
from tensorboardX import SummaryWriter


def to_python(value: Any) -> Any:
    """Arrays -> floats/ints/lists so a metrics dict serializes to JSON."""
    arr = np.asarray(value)
    if arr.ndim == 0:
        v = arr.item()
        return None if isinstance(v, float) and not math.isfinite(v) else v
    return [to_python(x) for x in arr]


class IntervalLoss:
    """Collects each step's `loss` and `nonfinite` flag (device arrays, fetched only at log time)
    and reports the interval's mean loss over its finite steps (`loss`), the last step's loss
    (`loss_last`), the number of steps averaged (`loss_steps`) and of non-finite steps
    (`nonfinite`). After a resume the first interval holds only the steps since the resume."""

    def __init__(self):
        self._losses: list[Any] = []
        self._flags: list[Any] = []

    def add(self, metrics: dict[str, Any]) -> None:
        self._losses.append(metrics["loss"])
        self._flags.append(metrics["nonfinite"])

    def pop(self) -> dict[str, Any]:
        losses = np.asarray(jax.device_get(self._losses), np.float64)
        flags = np.asarray(jax.device_get(self._flags), np.int64)
        self._losses, self._flags = [], []
        good = losses[np.isfinite(losses) & (flags == 0)]
        return {"loss": float(np.mean(good)) if good.size else None,
                "loss_last": float(losses[-1]) if losses.size else None,
                "loss_steps": int(good.size), "nonfinite": int(flags.sum())}


class MetricsWriter:
    """Appends to metrics.jsonl and writes scalars to TensorBoard. Only the process that owns
    output (process 0) should create one with `enabled=True`."""

    def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            if tensorboard:
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        record = {"step": int(step), **{k: to_python(v) for k, v in metrics.items()}}
        if not self.enabled:
            return record
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k == "step":
                    continue
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
                elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
                    for i, x in enumerate(v):
                        self._tb.add_scalar(f"{k}/{i}", x, step)
        return record

    def close(self):
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
    """Reads a metrics.jsonl file into a list of records (lines that do not parse are skipped,
    e.g. a last line cut off by a crash)."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def truncate_metrics(path: str, step: int) -> None:
    """Drops records past `step` from a metrics.jsonl: after resuming from a checkpoint, the
    steps logged after it are recomputed and logged again. Lines that do not parse (a last
    line cut off by a crash) are dropped with a warning naming the file."""
    if not os.path.exists(path):
        return
    keep, bad = [], 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if record.get("step", 0) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
    if bad:
        logging.getLogger(__name__).warning("%s: dropped %d line(s) that do not parse (cut off "
                                            "by a crash?)", path, bad)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


FINGERPRINT = "corpus_fingerprint"


def recorded_fingerprints(records: list[dict[str, Any]]) -> list[str]:
    """The distinct corpus fingerprints recorded in a run's metrics, in order of appearance
    (more than one: the run was resumed on a changed corpus)."""
    out: list[str] = []
    for r in records:
        fp = r.get(FINGERPRINT)
        if fp is not None and fp not in out:
            out.append(fp)
    return out
