"""Timing shared by the benchmarks: cases timed in turns."""
from __future__ import annotations

import time

import jax
import numpy as np


def timed_together(cases: dict, reps: int) -> dict[str, float]:
    """Median seconds of each `cases[name] = (fn, args)`, timed in turns (one run of every
    case per round), so load that comes and goes on a shared machine hits all alike."""
    for fn, args in cases.values():
        jax.block_until_ready(fn(*args))  # compile
    times = {k: [] for k in cases}
    for _ in range(reps):
        for k, (fn, args) in cases.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in times.items()}
