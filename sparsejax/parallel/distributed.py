"""Multi-controller start-up: `jax.distributed.initialize` from flags or environment, with
auto-detection on TPU VMs and SLURM, CPU collectives over gloo, and bounded time-outs so a
missing coordinator or a dead peer is an error, never a hang."""
from __future__ import annotations

import logging
import os
import socket
import time

import jax

log = logging.getLogger(__name__)

ENV = {"coordinator_address": "SPARSEJAX_COORDINATOR_ADDRESS",
       "num_processes": "SPARSEJAX_NUM_PROCESSES", "process_id": "SPARSEJAX_PROCESS_ID"}


def _auto_cluster() -> str | None:
    """Which cluster environment JAX can configure itself from, if any."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        return "slurm"
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        return "tpu"
    return None


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Polls the coordinator's TCP port; raises a clear error if it does not answer in time
    (JAX itself would abort the process with a message about another task dying)."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise RuntimeError(f"coordinator {address} is unreachable: no answer within "
                                   f"{timeout_s}s ({e.strerror or e}); is process 0 running?") from None
            time.sleep(0.25)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int = 300,
               heartbeat_timeout_s: int = 60) -> bool:
    """Starts JAX's distributed runtime when this is a multi-process run. Explicit arguments win,
    then SPARSEJAX_* environment variables, then TPU-VM / SLURM auto-detection. Returns True
    if the distributed runtime was started."""
    coordinator_address = coordinator_address or os.environ.get(ENV["coordinator_address"])
    if num_processes is None and os.environ.get(ENV["num_processes"]):
        num_processes = int(os.environ[ENV["num_processes"]])
    if process_id is None and os.environ.get(ENV["process_id"]):
        process_id = int(os.environ[ENV["process_id"]])
    explicit = coordinator_address is not None or num_processes is not None
    cluster = None if explicit else _auto_cluster()
    if not explicit and cluster is None:
        return False
    if explicit:
        if coordinator_address is None or num_processes is None or process_id is None:
            raise ValueError(
                f"a multi-process run needs coordinator_address, num_processes and process_id "
                f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r})")
        if num_processes < 1:
            raise ValueError(f"num_processes={num_processes} must be >= 1")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id={process_id} is out of range: valid are 0..{num_processes - 1}"
                             f" for num_processes={num_processes}")
        if ":" not in coordinator_address:
            raise ValueError(f"coordinator_address={coordinator_address!r} must be HOST:PORT")
        if num_processes == 1:
            return False
    if explicit and process_id != 0:
        wait_for_coordinator(coordinator_address, timeout_s)
    if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address, num_processes=num_processes,
            process_id=process_id, initialization_timeout=timeout_s,
            heartbeat_timeout_seconds=heartbeat_timeout_s)
    except Exception as e:  # e.g. the coordinator never answered
        raise RuntimeError(
            f"could not join the distributed run (coordinator {coordinator_address or cluster}, "
            f"process {process_id} of {num_processes}) within {timeout_s}s: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    log.info("process %d of %d started (%d local / %d global devices)", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
