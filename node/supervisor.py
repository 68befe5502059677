"""The farm module's supervisor: the one owner of the application's state.

It owns the start/stop/restart commands (run on its own executor, which owns
the "busy" state: Patroni's AsyncExecutor), the health checks, and the loop
protection of ``on_failure: restart``. The reconcile loop asks it two things
each cycle: which member state this node should announce
(:meth:`desired_state`), and, once that state is known, whether the
application must be restarted or stopped (:meth:`after_cycle`). Worker
threads only record outcomes and wake the loop; they decide nothing.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from nlbfarm.node.checks import HealthMonitor
from nlbfarm.node.module import FarmModule

log = logging.getLogger("nlbfarm.agent")


class ModuleSupervisor:
    def __init__(self, me: str, cfg_module, leave_timeout: float, *, env: dict, wake: threading.Event,
                 events, stopping: threading.Event, clock: Callable[[], float] = time.monotonic):
        self.me = me
        self.cfg = cfg_module
        self.leave_timeout = leave_timeout
        self._wake = wake
        self.events = events
        self._stopping = stopping
        self.clock = clock
        self.module = FarmModule(cfg_module, env=env)
        self.health = HealthMonitor(cfg_module.checks, on_transition=self._on_check_transition)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="module")
        self._lock = threading.Lock()
        self.busy: str | None = None           # "start", "restart", "stop" while a command runs
        self.idle_since = clock()
        self.started = not cfg_module.start    # the first start command finished
        self.stopped = False                   # on_failure: stop has stopped the application
        self.start_failed: str | None = None   # why the last start/restart command failed
        self.restarts_exhausted = False        # loop protection hit: no restart until healthy again
        self.failed_since: float | None = None

    # ---- what the loop asks --------------------------------------------------------

    def desired_state(self, leaving: bool, drain_requested: bool) -> tuple[str, str]:
        """The member state this node should announce, and why."""
        if leaving:
            return "leaving", "the agent is stopping"
        if self.stopped:
            return "stopped", ("a health check failed and on_failure is stop: application stopped; "
                               "restart the agent to rejoin")
        failing = self.health.failing()
        if failing:
            # The cause, not the latest probe's detail: the reason goes to
            # etcd, and must not change (and be rewritten) with every probe.
            st = {c.name: c for c in self.health.statuses()}
            what = "; ".join(f"check {n} failing: {st[n].cause}" for n in failing)
            if self.busy == "restart":
                what += "; restarting the application"
            elif self.restarts_exhausted:
                what += "; restart limit reached"
            return "failed", what
        if self.start_failed is not None and not self.cfg.checks and not self.busy:
            return "failed", f"{self.cfg.name} failed to start: {self.start_failed}"
        if not self.started:
            return "starting", f"application starting ({self.busy or 'start'} command running)"
        if not self.health.healthy():
            waiting = [c.name for c in self.health.statuses() if c.state != "passing"]
            return "starting", f"waiting for checks to pass: {', '.join(waiting)}"
        if drain_requested:
            return "draining", "an operator asked this node to drain"
        if self.cfg.checks:
            return "active", "all checks passing"
        return "active", "no checks configured"

    def after_cycle(self, state: str, announced, accepting_any: bool) -> None:
        """on_failure for a failed node, once it has withdrawn.

        Restarting or stopping the application while the node still accepts
        its buckets would reset new connections that peers could serve, so
        the action waits until the failed state is announced and this node
        accepts nothing (or leave_timeout passed, say in a one-node farm).
        """
        m = self.cfg
        now = self.clock()
        if state != "failed":
            self.failed_since = None
            if state == "active":
                self.restarts_exhausted = False
            return
        if self.failed_since is None:
            self.failed_since = now
        if self.busy or m.on_failure == "withdraw" or self.restarts_exhausted or self.stopped:
            return
        withdrawn = announced is not None and announced.state == "failed" and not accepting_any
        if not withdrawn and now - self.failed_since < self.leave_timeout:
            return
        if m.on_failure == "stop":
            log.warning("check failed node=%s action=stop module=%s: stopping it and staying out of the farm",
                        self.me, m.name)
            self.stopped = True
            self.run("stop")
            return
        # Give a restarted application one full check window to come back
        # before counting it as still failing.
        settle = max((c.interval * (c.rise + c.fall) for c in m.checks), default=0)
        if now - self.idle_since < settle:
            return
        if self.module.may_restart():
            log.warning("check failed node=%s action=restart restarts_in_window=%d limit=%d", self.me,
                        self.module.restarts_in_window(), m.restart_limit)
            self.run("restart")
        else:
            # SafeKit's loop protection: no more restarts until the checks
            # pass again, however long that takes.
            self.restarts_exhausted = True
            log.error("restart limit reached node=%s restarts=%d window=%.0fs: staying withdrawn until "
                      "the checks pass again", self.me, self.module.restarts_in_window(), m.restart_window)
            self.events.publish("module_action", self.me,
                                f"restart limit reached ({m.restart_limit} in {m.restart_window:.0f} s): "
                                "staying withdrawn", action="restart_limit")

    # ---- the executor ----------------------------------------------------------------

    def resume(self, verdicts: dict) -> None:
        """Take over a running application from a predecessor process: no start command,
        and the checks go on from the verdicts it had reached."""
        self.started = True
        self.health.seed(verdicts)
        self.health.start()

    def run(self, action: str) -> None:
        """Run start, restart or stop on the worker; the loop sees the outcome."""
        if action in ("start", "restart") and not self.cfg.start:
            self.started = True
            self.health.start()
            return
        if action == "stop" and not self.cfg.stop:
            return
        self.busy = action
        self.events.publish("module_action", self.me, f"{action} of {self.cfg.name} begins", action=action)

        def work():
            try:
                res = getattr(self.module, action)()
                self.events.publish("module_action", self.me,
                                    f"{action} of {self.cfg.name} "
                                    f"{'done' if res.ok else 'FAILED'}: {res.detail}",
                                    action=action, ok=res.ok)
                if action in ("start", "restart"):
                    self.start_failed = None if res.ok else res.detail
                if action == "start":
                    self.started = True
                    # Checks begin after the start command, as SafeKit's
                    # checkers do after start_both: a starting application
                    # must not count as failing. Not once the agent stops.
                    if not self._stopping.is_set():
                        self.health.start()
            finally:
                # idle_since first: the loop reads busy, then idle_since.
                self.idle_since = self.clock()
                self.busy = None
                self._wake.set()

        self._worker.submit(work)

    def shutdown(self) -> None:
        """The application's stop command, once no VIP traffic can reach it any more."""
        self._worker.shutdown(wait=True)  # a running start/restart finishes first
        self.health.stop()  # in case a start finished after shutdown() stopped the checks
        if self.cfg.stop and not self.stopped:
            self.stopped = True
            res = self.module.stop()
            if not res.ok:
                log.error("module stop failed node=%s module=%s reason=%s", self.me, self.cfg.name,
                          res.detail)

    def _on_check_transition(self, name: str, old: str, new: str, detail: str) -> None:
        # Checker thread: record and wake; the loop decides what follows.
        self.events.publish("check_transition", self.me, f"check {name} {old} -> {new}: {detail}",
                            check=name, old=old, new=new)
        self._wake.set()
