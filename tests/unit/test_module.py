"""Farm module commands: start/stop/restart, the restart budget, timeouts and the command runner."""
from __future__ import annotations

import os
import signal
import time

from nlbfarm.config import ModuleSection
from nlbfarm.node.module import FarmModule, run_command


class Clock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_start_and_stop_run_the_commands(tmp_path):
    m = FarmModule(ModuleSection(name="web", start=f"echo started > {tmp_path}/start",
                                 stop=f"echo stopped > {tmp_path}/stop"))
    r = m.start()
    assert r.ok and r.returncode == 0 and r.detail == "exit 0"
    assert (tmp_path / "start").read_text() == "started\n"
    assert not (tmp_path / "stop").exists()
    assert m.stop().ok
    assert (tmp_path / "stop").read_text() == "stopped\n"


def test_missing_commands_succeed():
    m = FarmModule(ModuleSection())
    r = m.start()
    assert (r.ok, r.returncode, r.detail, r.duration) == (True, None, "no start command", 0.0)
    assert m.stop().detail == "no stop command"


def test_restart_runs_stop_then_start(tmp_path):
    log = tmp_path / "log"
    m = FarmModule(ModuleSection(start=f"echo start >> {log}", stop=f"echo stop >> {log}"))
    r = m.restart()
    assert r.ok and log.read_text() == "stop\nstart\n"
    assert r.detail == "stop: exit 0; start: exit 0"
    assert m.restarts_in_window() == 1


def test_restart_starts_even_if_stop_fails(tmp_path):
    m = FarmModule(ModuleSection(start=f"touch {tmp_path}/up", stop="echo cannot stop; exit 1"))
    r = m.restart()
    assert r.ok and (tmp_path / "up").exists()
    assert r.detail == "stop: exit 1: cannot stop; start: exit 0"


def test_restart_budget():
    clock = Clock(0.0)
    m = FarmModule(ModuleSection(start="true", stop="true", restart_limit=2, restart_window=10), clock=clock)
    assert m.may_restart() and m.restarts_in_window() == 0
    m.restart()
    clock.t = 1.0
    assert m.may_restart()
    m.restart()
    clock.t = 2.0
    assert not m.may_restart() and m.restarts_in_window() == 2  # a third restart within 10 s: refused
    clock.t = 9.9
    assert not m.may_restart()
    clock.t = 10.5  # the restart at t=0 left the window
    assert m.may_restart() and m.restarts_in_window() == 1
    m.restart()
    clock.t = 10.6
    assert not m.may_restart()
    clock.t = 21.0
    assert m.restarts_in_window() == 0 and m.may_restart()


def test_env_vars(tmp_path, monkeypatch):
    monkeypatch.setenv("NLBFARM_TEST_INHERITED", "from-parent")
    out = tmp_path / "env"
    m = FarmModule(ModuleSection(name="shop", start=f'echo "$NLBFARM_MODULE $EXTRA $NLBFARM_TEST_INHERITED" > {out}'),
                   env={"EXTRA": "x1"})
    assert m.start().ok
    assert out.read_text() == "shop x1 from-parent\n"


def test_command_timeout(tmp_path):
    m = FarmModule(ModuleSection(start="sleep 30", command_timeout=0.3))
    started = time.monotonic()
    r = m.start()
    assert time.monotonic() - started < 0.3 + 0.5
    assert (r.ok, r.returncode, r.detail) == (False, None, "timed out after 0.3 s")


def test_run_command_details():
    r = run_command("echo working; echo giving up >&2; exit 4", timeout=5)
    assert (r.ok, r.returncode, r.detail) == (False, 4, "exit 4: giving up")
    r = run_command("kill -TERM $$", timeout=5)
    assert (r.ok, r.returncode, r.detail) == (False, -signal.SIGTERM, "killed by SIGTERM")
    r = run_command("printf '%0300d\\n' 0", timeout=5)
    assert r.ok and len(r.detail) == len("exit 0: ") + 200 and r.detail.endswith("...")
    r = run_command("read x || echo eof", timeout=5)  # stdin is /dev/null, never the agent's terminal
    assert r.detail == "exit 0: eof"


def test_background_daemon_does_not_hold_the_command(tmp_path):
    """A start command that launches a daemon returns when the shell does, and leaves the daemon running."""
    pidfile = tmp_path / "daemon.pid"
    started = time.monotonic()
    r = run_command(f"sleep 30 & echo $! > {pidfile}; echo launched", timeout=5)
    try:
        assert r.ok and r.detail == "exit 0: launched"
        assert time.monotonic() - started < 2
        pid = int(pidfile.read_text())
        os.kill(pid, 0)  # still alive
    finally:
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
