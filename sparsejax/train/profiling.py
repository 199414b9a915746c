"""`TrainConfig.profile_steps`: a JAX profiler trace of a range of train steps, written where
TensorBoard's profile plugin finds it (WORKDIR/tensorboard/plugins/profile/<run>/*.xplane.pb;
`tensorboard --logdir WORKDIR/tensorboard`, tab "Profile"). Each step is annotated
(`StepTraceAnnotation`), so the trace viewer and the step-time graph show step numbers.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import jax

from sparsejax.config import run_step

log = logging.getLogger(__name__)
SETTING = "TrainConfig.profile_steps"


def resolve_profile_steps(spec: Any, num_steps: int) -> tuple[int, int] | None:
    """(start, stop) absolute steps of a `profile_steps` spec (ints: steps, floats: fractions
    of the run), the trace covering steps start .. stop - 1; ValueError when it is not a pair
    or not inside the run."""
    if spec is None:
        return None
    if not isinstance(spec, (tuple, list)) or len(spec) != 2:
        raise ValueError(f"{SETTING}={spec!r} must be None or a pair (start, stop) of steps "
                         f"(ints, or floats as fractions of TrainConfig.num_steps)")
    start = run_step(spec[0], num_steps, f"{SETTING}[0]")
    stop = run_step(spec[1], num_steps, f"{SETTING}[1]")
    if not 0 <= start < stop <= num_steps:
        raise ValueError(f"{SETTING}={tuple(spec)!r} (steps {start} .. {stop - 1}) is not inside "
                         f"the run: need 0 <= start < stop <= TrainConfig.num_steps={num_steps}")
    return start, stop


class StepProfiler:
    """Starts the trace before the first profiled step this process runs and stops it after
    the last one (or on close)."""

    def __init__(self, spec: Any, num_steps: int, workdir: str):
        self.range = resolve_profile_steps(spec, num_steps)
        self.dir = os.path.join(workdir, "tensorboard")
        self.active = False

    def step(self, step: int):
        """Context for the train step `step` (a no-op outside the profiled range)."""
        if self.range is None or not self.range[0] <= step < self.range[1]:
            return contextlib.nullcontext()
        if not self.active:
            os.makedirs(self.dir, exist_ok=True)
            jax.profiler.start_trace(self.dir)
            self.active = True
            log.info("profiling steps %d .. %d into %s", step, self.range[1] - 1, self.dir)
        return jax.profiler.StepTraceAnnotation("train", step_num=step)

    def after(self, step: int, outputs: Any) -> None:
        """Call after step `step`'s outputs exist: stops after the last profiled step."""
        if self.active and step + 1 >= self.range[1]:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
