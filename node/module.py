"""The farm module's application commands: start and stop the application this node serves.

Like SafeKit's start_both/stop_both: shell commands that return once the
application is up or down. A command that hangs must not hang the agent, so
every command runs under a timeout in its own process group and the whole group
is killed when the timeout expires (a shell that is killed alone would leave its
children running and holding the ports the next start needs).

Output goes to an unlinked temporary file, not a pipe: a start command that
launches a daemon in the background (``myserver &``) returns as soon as the
shell exits, while with a pipe the daemon would hold the write end and the
caller would wait for it until the timeout, then kill the daemon it just started.

``FarmModule`` also keeps the restart budget (SafeKit's loop protection): an
application that fails again right after every restart is left stopped instead
of being restarted forever.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass

from nlbfarm.config import ModuleSection

log = logging.getLogger("nlbfarm.module")

# Only the end of the output is kept: the last line is what explains a failure.
_OUTPUT_TAIL = 64 * 1024
_DETAIL_LINE_MAX = 200
# After SIGKILL the shell dies at once; this only bounds a pathological reap.
_REAP_TIMEOUT = 2.0


@dataclass(frozen=True)
class CommandResult:
    ok: bool
    returncode: int | None  # None when the command did not finish (timeout, could not start)
    detail: str
    duration: float


def _last_line(output: bytes) -> str:
    for line in reversed(output.decode("utf-8", errors="replace").splitlines()):
        line = line.strip()
        if line:
            return line if len(line) <= _DETAIL_LINE_MAX else line[:_DETAIL_LINE_MAX - 3] + "..."
    return ""


def _read_tail(f) -> bytes:
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - _OUTPUT_TAIL))
    return f.read()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_shell(command: str, timeout: float, env: dict | None = None) -> CommandResult:
    """Run ``/bin/sh -c command`` in a new process group; never raises, never outlives ``timeout`` by much.

    ``env`` holds extra variables set on top of ``os.environ``. Exit 0 passes;
    the detail is the exit status plus the last non-empty output line.
    Background children of a command that exits in time are left running (a
    start command may launch a daemon); on timeout the whole group is killed.
    This is the quiet core shared by ``run_command`` and the command checker,
    which runs every interval and must not log each run.
    """
    started = time.monotonic()
    full_env = {**os.environ, **{k: str(v) for k, v in (env or {}).items()}}
    try:
        with tempfile.TemporaryFile() as out:
            try:
                proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, env=full_env, start_new_session=True,
                                        close_fds=True)
            except OSError as exc:
                return CommandResult(False, None, f"cannot run /bin/sh: {exc}", time.monotonic() - started)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                # The shell is not reaped yet, so its pid (the group id) cannot
                # have been reused by an unrelated process group.
                _kill_group(proc.pid)
                try:
                    proc.wait(timeout=_REAP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    pass
                last = _last_line(_read_tail(out))
                detail = f"timed out after {timeout:g} s" + (f"; last output: {last}" if last else "")
                return CommandResult(False, None, detail, time.monotonic() - started)
            except BaseException:
                # Interrupted (KeyboardInterrupt in a foreground run): no orphans.
                _kill_group(proc.pid)
                proc.wait()
                raise
            last = _last_line(_read_tail(out))
    except OSError as exc:  # the temporary file itself
        return CommandResult(False, None, f"cannot capture output: {exc}", time.monotonic() - started)
    if rc < 0:
        try:
            status = f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            status = f"killed by signal {-rc}"
    else:
        status = f"exit {rc}"
    return CommandResult(rc == 0, rc, f"{status}: {last}" if last else status, time.monotonic() - started)


def run_command(command: str, timeout: float, env: dict | None = None) -> CommandResult:
    """``run_shell`` with a log line when the command starts and one with its result."""
    log.info("command start command=%r timeout=%gs", command, timeout)
    result = run_shell(command, timeout, env)
    level = logging.INFO if result.ok else logging.WARNING
    log.log(level, "command done command=%r ok=%s rc=%s duration=%.3fs detail=%r", command, result.ok,
            result.returncode, result.duration, result.detail)
    return result


class FarmModule:
    """Start/stop/restart of the farm module's application, with the restart budget.

    ``restart`` does not consult the budget itself: the agent asks
    ``may_restart`` first and decides what to do when it is spent (stay
    withdrawn), so a manual restart by an operator is never refused here.
    """

    def __init__(self, spec: ModuleSection, env: dict | None = None, clock=time.monotonic):
        self.spec = spec
        self._env = {**(env or {}), "NLBFARM_MODULE": spec.name}
        self._clock = clock
        self._lock = threading.Lock()
        self._restarts: deque[float] = deque()

    @property
    def name(self) -> str:
        return self.spec.name

    def _run(self, action: str, command: str | None) -> CommandResult:
        if command is None:
            return CommandResult(True, None, f"no {action} command", 0.0)
        log.info("module command action=%s module=%s", action, self.spec.name)
        return run_command(command, self.spec.command_timeout, self._env)

    def start(self) -> CommandResult:
        return self._run("start", self.spec.start)

    def stop(self) -> CommandResult:
        return self._run("stop", self.spec.stop)

    def restart(self) -> CommandResult:
        """Stop then start; the attempt counts against the budget whether or not it works.

        Start runs even when stop failed: stop's process group was killed on
        timeout, and a start that then fails says more than not trying.
        """
        with self._lock:
            self._restarts.append(self._clock())
        log.warning("module restart module=%s restarts_in_window=%d limit=%d window=%gs", self.spec.name,
                    self.restarts_in_window(), self.spec.restart_limit, self.spec.restart_window)
        stopped = self.stop()
        if not stopped.ok:
            log.warning("module stop failed during restart module=%s detail=%r; starting anyway",
                        self.spec.name, stopped.detail)
        started = self.start()
        return CommandResult(started.ok, started.returncode,
                             f"stop: {stopped.detail}; start: {started.detail}",
                             stopped.duration + started.duration)

    def restarts_in_window(self) -> int:
        with self._lock:
            horizon = self._clock() - self.spec.restart_window
            while self._restarts and self._restarts[0] <= horizon:
                self._restarts.popleft()
            return len(self._restarts)

    def may_restart(self) -> bool:
        """Fewer than ``restart_limit`` restarts in the last ``restart_window`` seconds."""
        return self.restarts_in_window() < self.spec.restart_limit
