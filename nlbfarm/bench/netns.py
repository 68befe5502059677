"""Housekeeping shared by the benchmarks: namespaces they build themselves, the run lock,
and a process's CPU time."""
from __future__ import annotations

import fcntl
import os
import subprocess
import time


def sh(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()[-400:]}")
    return p


def proc_cpu_s(pid: int) -> float:
    """User and system CPU seconds a process has used (utime + stime of /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def delete_ns(name: str) -> None:
    for pid in sh("ip", "netns", "pids", name, check=False).stdout.split():
        try:
            os.kill(int(pid), 9)
        except (OSError, ValueError):
            pass
    sh("ip", "netns", "del", name, check=False)


def remove_stale(prefix: str) -> list[str]:
    """Delete every namespace with ``prefix``: called under the lock, so none of them is in use."""
    stale = [line.split()[0] for line in sh("ip", "netns", "list", check=False).stdout.splitlines()
             if line.strip() and line.split()[0].startswith(prefix)]
    for name in stale:
        delete_ns(name)
    return stale


class Lock:
    """One run of a benchmark at a time (its stale-namespace cleanup must not hit a live run)."""

    def __init__(self, path: str, wait_s: float):
        self.path, self.wait_s = path, wait_s

    def __enter__(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.f = open(self.path, "w")
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self.f.close()
                    raise RuntimeError(f"another run holds {self.path} for more than {self.wait_s:.0f} s")
                time.sleep(0.5)

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()
