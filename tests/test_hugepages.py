"""The CLI's restart with transparent huge pages (sparsejax/hugepages.py)."""
import os
import subprocess
import sys

import pytest

from sparsejax import cli, hugepages

GLIBC = (2, 36)


@pytest.mark.parametrize("env, mode, glibc, want", [
    ({}, "madvise", GLIBC, True),
    ({}, "always", GLIBC, False),  # the kernel gives huge pages anyway
    ({}, "never", GLIBC, False),
    ({}, None, GLIBC, False),  # no THP file (not Linux)
    ({}, "madvise", None, False),  # musl, macOS
    ({}, "madvise", (2, 34), False),  # before the tunable existed
    ({"SPARSEJAX_HUGEPAGES": "0"}, "madvise", GLIBC, False),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", GLIBC, False),  # user's choice
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}, "madvise", GLIBC, True),
])
def test_wanted(env, mode, glibc, want):
    assert hugepages.wanted(env, mode, glibc) is want


def test_thp_mode_reads_the_bracketed_mode(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert hugepages.thp_mode(str(f)) == "madvise"
    assert hugepages.thp_mode(str(tmp_path / "missing")) is None


def _restart(monkeypatch, **env):
    """Runs cli.main() as a process entry would, with huge pages wanted; returns the execve
    call it made."""
    calls = []

    def fake_execve(path, argv, environ):
        calls.append((path, argv, environ))
        raise SystemExit(0)

    monkeypatch.setattr(hugepages, "thp_mode", lambda: "madvise")
    monkeypatch.setattr(hugepages, "glibc_version", lambda: GLIBC)
    monkeypatch.setattr(hugepages.os, "execve", fake_execve)
    for k in ("GLIBC_TUNABLES", "SPARSEJAX_HUGEPAGES"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(sys, "argv", ["sparsejax", "list"])
    try:
        assert cli.main() == 0  # no restart: the command ran
    except SystemExit:  # the restart
        pass
    return calls


def test_cli_restarts_itself_with_the_tunable(monkeypatch):
    (path, argv, env), = _restart(monkeypatch, GLIBC_TUNABLES="glibc.malloc.trim_threshold=1")
    assert path == sys.executable and argv == [sys.executable, *sys.orig_argv[1:]]
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.trim_threshold=1:glibc.malloc.hugetlb=1"


def test_cli_in_process_and_switched_off_do_not_restart(monkeypatch, capsys):
    assert _restart(monkeypatch, SPARSEJAX_HUGEPAGES="0") == []
    calls = []
    monkeypatch.setattr(hugepages.os, "execve", lambda *a: calls.append(a))
    assert cli.main(["list"]) == 0  # an in-process call (tests, notebooks) never restarts
    assert calls == []


def test_a_real_process_restarts_once():
    """On this machine: the restarted process has the tunable exactly when it is wanted, and
    does not restart again (it prints once)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "SPARSEJAX_HUGEPAGES")}
    code = ("from sparsejax import hugepages; hugepages.ensure(); import os; "
            "print(os.environ.get('GLIBC_TUNABLES', ''))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    want = hugepages.wanted(env, hugepages.thp_mode(), hugepages.glibc_version())
    assert out == [hugepages.TUNABLE if want else ""]
