"""Shared fixtures: a real, single-member etcd on loopback.

``etcd_server`` yields an :class:`EtcdServer` that is running when the test
starts. One process serves the whole session (tests use distinct key
prefixes); a test may stop, kill or restart it, and the next test gets it
running again. The process is always terminated at the end of the session,
also when tests fail or pytest is interrupted.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

# The etcd store imports etcd3 the right way (protobuf implementation
# chosen first, import-time deprecation noise silenced); reuse that.
from nlbfarm.coordinator.etcd import etcd3

ETCD_BIN = shutil.which("etcd") or "/usr/bin/etcd"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0


@pytest.fixture(autouse=True)
def _agent_state_files_in_tmp(monkeypatch, tmp_path):
    """In-process agents with the default node.state_dir keep their state files in the test's
    directory, not in the machine's /run (a test that sets state_dir gets what it set)."""
    from nlbfarm.node import agent, handoff
    real = handoff.state_path

    def redirected(state_dir, cluster, node_id):
        if state_dir == handoff.DEFAULT_STATE_DIR:
            state_dir = str(tmp_path / "run-nlbfarm")
        return real(state_dir, cluster, node_id)
    monkeypatch.setattr(agent, "state_path", redirected)


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdServer:
    """One etcd member; ``start()`` after ``stop()``/``kill()`` reuses data dir and ports."""

    def __init__(self, data_dir: Path, name: str = "nlbfarm-test"):
        self.name = name
        self.data_dir = data_dir
        self.log_path = data_dir.parent / f"{name}.log"
        self.client_port = free_port()
        self.peer_port = free_port()
        self.endpoint = f"127.0.0.1:{self.client_port}"
        self.proc: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _argv(self) -> list[str]:
        client_url = f"http://{self.endpoint}"
        peer_url = f"http://127.0.0.1:{self.peer_port}"
        return [
            ETCD_BIN,
            "--name", self.name,  # first, so `pgrep -f 'etcd --name'` finds it
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"{self.name}={peer_url}",
            "--initial-cluster-token", f"{self.name}-{self.client_port}",
            # Short raft timeouts: etcd then grants leases as short as 1 s.
            "--election-timeout", "500",
            "--heartbeat-interval", "50",
            "--logger", "zap",
            "--log-outputs", "stderr",
            "--log-level", "warn",
        ]

    def start(self) -> None:
        """Start (or restart) etcd and wait until a real client read succeeds."""
        if self.running:
            return
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                self._argv(), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"etcd exited with {self.proc.returncode} during start; log tail:\n{self.log_tail()}"
                )
            client = etcd3.client("127.0.0.1", self.client_port, timeout=1.0)
            try:
                client.get("/health-probe")
                return
            except Exception as exc:  # not ready yet
                last_error = exc
            finally:
                client.close()
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(
            f"etcd not healthy within {START_TIMEOUT_S}s at {self.endpoint}: {last_error!r}; "
            f"log tail:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """SIGTERM and wait; SIGKILL if it does not exit in time."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT_S)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL (a crash) and reap."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        self.proc = None

    def client(self, timeout: float = 2.0):
        """A raw python-etcd3 client (for compaction and other admin calls)."""
        return etcd3.client("127.0.0.1", self.client_port, timeout=timeout)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@pytest.fixture(scope="session")
def _etcd_session(tmp_path_factory):
    if not os.access(ETCD_BIN, os.X_OK):
        pytest.skip(f"etcd binary not found at {ETCD_BIN}")
    server = EtcdServer(tmp_path_factory.mktemp("etcd") / "data")
    atexit.register(server.kill)  # last resort if the session teardown never runs
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def etcd_server(_etcd_session: EtcdServer) -> EtcdServer:
    """A running etcd; its ``endpoint`` is ``"127.0.0.1:<port>"``."""
    _etcd_session.start()  # no-op unless an earlier test left it stopped
    return _etcd_session



# Namespaces only these tests create. A crashed earlier run may have left some;
# they are removed before the session so they can neither collide nor pile up.
# Test sessions on one machine are serialised by a lock first: the cleanup must
# never remove the namespaces of a run that is still going.
_STALE = r"^(nft-[0-9a-f]{8}|hs[ab]-[0-9a-f]{6}|iplt-[0-9a-f]+.*|farmd-[0-9a-f]{6}|(tfarm|tcli|tdemo|tfault|tops|ttraf|tucast|trules|tsix|ttlsc?|tsafe|tans)-.*)$"
_SESSION_LOCK = "/run/lock/nlbfarm-tests.lock"


@pytest.fixture(scope="session", autouse=True)
def _one_session_at_a_time_and_no_stale_namespaces():
    import fcntl
    if os.geteuid() != 0 or not shutil.which("ip"):
        yield
        return
    os.makedirs(os.path.dirname(_SESSION_LOCK), exist_ok=True)
    with open(_SESSION_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")
        for line in names:
            name = line.split(" ")[0]
            if name and re.match(_STALE, name):
                for pid in subprocess.run(["ip", "netns", "pids", name], capture_output=True,
                                          text=True).stdout.split():
                    subprocess.run(["kill", "-9", pid])
                subprocess.run(["ip", "netns", "del", name])
        yield
