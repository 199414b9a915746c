"""Timing shared by the benchmarks: cases timed in turns."""
from __future__ import annotations

import time

import jax
import numpy as np


def timed_together(cases: dict, reps: int, warm: int = 0) -> dict[str, float]:
    """Median seconds of each `cases[name] = (fn, args)`, timed in turns (one run of every
    case per round), so load that comes and goes on a shared machine hits all alike.

    `warm` untimed runs open each turn, so the timed run finds memory as the case's own
    previous run left it, as in a loop that calls one function (a training loop): on CPU a
    case that follows another with gigabytes of temporaries otherwise pays for the memory
    the allocator hands back and maps again."""
    for fn, args in cases.values():
        jax.block_until_ready(fn(*args))  # compile
    times = {k: [] for k in cases}
    for _ in range(reps):
        for k, (fn, args) in cases.items():
            for _ in range(warm):
                jax.block_until_ready(fn(*args))
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in times.items()}
