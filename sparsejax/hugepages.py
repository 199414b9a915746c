"""Transparent huge pages for XLA:CPU's buffers.

XLA:CPU takes every step's temporaries and outputs from malloc, and glibc serves large
blocks with fresh `mmap`s that it returns on free. Where the kernel gives huge pages only to
memory that asks for them (`/sys/kernel/mm/transparent_hugepage/enabled` = `madvise`, the
common default), each step then faults its buffers in 4 KiB at a time: arrays beyond the last
cache level move at a fifth of the memory's speed, and a compact (block-sparse) step, whose
gathered operands are large and whose FLOPs are few, loses most of what it saves.
glibc ≥ 2.35 asks for huge pages on its own blocks when the tunable `glibc.malloc.hugetlb=1`
is set, which glibc reads only when a process starts. So `sparsejax` (the CLI) and the speed
benchmarks restart themselves once with it (`ensure`); everything else about the process is
unchanged.

Measured on this project's 2-core CPU (`python benchmarks/train_throughput.py`): base.gin's
dense train step 0.42-0.45 of the machine's matmul peak without, 0.52 with; the block-sparse
projection at density 0.1 (`benchmarks/sparse_weights.py`) 3.4x dense without, 5.1-6.0x with.

`SPARSEJAX_HUGEPAGES=0` turns the restart off. In a notebook or your own script (no restart
there) start Python with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` in the environment.
"""
from __future__ import annotations

import os
import platform
import sys
from typing import Mapping, Optional

TUNABLE = "glibc.malloc.hugetlb=1"
SWITCH = "SPARSEJAX_HUGEPAGES"  # "0" turns the restart off
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_MODE) -> Optional[str]:
    """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'), or None."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def glibc_version() -> Optional[tuple[int, int]]:
    """(major, minor) of the C library when it is glibc, else None."""
    lib, version = platform.libc_ver()
    if lib != "glibc":
        return None
    try:
        major, minor = version.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def wanted(env: Mapping[str, str], mode: Optional[str],
           glibc: Optional[tuple[int, int]]) -> bool:
    """Whether a restart with the tunable would change anything: the kernel gives huge pages
    on request only ('madvise'; 'always' gives them anyway, 'never' not at all), the C library
    is glibc ≥ 2.35 (the first with the tunable), and neither the tunable nor the switch is
    set already."""
    return (mode == "madvise" and glibc is not None and glibc >= (2, 35)
            and env.get(SWITCH, "1") != "0"
            and "glibc.malloc.hugetlb" not in env.get("GLIBC_TUNABLES", ""))


def ensure() -> None:
    """Restarts this process (same interpreter, same command line) with the tunable set, when
    `wanted`; returns only when no restart is needed. Call it first thing in a program's
    entry point, before any work: the process is replaced."""
    if not wanted(os.environ, thp_mode(), glibc_version()):
        return
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES"), TUNABLE) if t)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
