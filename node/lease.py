"""The lease keeper: the one owner of this node's etcd lease and of its fence element's life.

Three threads, each with one job, none of which decides anything itself
(every decision is a pure function of ``node/decide.py``):

* **keepalive**: refreshes the lease every ``keepalive_interval`` and records
  the *send* time of each success. ``LeaseExpired`` (expired or revoked)
  marks the lease lost and closes the fence at once.
* **fence**: every ``Timing.fence_refresh`` writes the fence element for the
  whole seconds that fit before ``fence_deadline(view)``. It never waits for
  etcd or for a peer, so neither a slow etcd nor a slow peer can keep it from
  extending (or closing) the fence in time.
* **prober** (rule E): while the keepalive is late, asks every peer whether it
  reaches etcd, and records the start time of each unanimous "no".

Everyone else reads :meth:`LeaseKeeper.view`, an immutable ``LeaseView``.
The loop reports that it is alive (:meth:`loop_alive`): a loop that cannot
finish a cycle for longer than the lease TTL stops the keepalives, so peers
take over instead of waiting for it.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from typing import Callable

from nlbfarm.coordinator.store import LeaseExpired
from nlbfarm.errors import DataPlaneError, StoreError
from nlbfarm.node.decide import (
    LeaseView, Timing, after_adopt, after_keepalive_failed, after_keepalive_ok, after_probe,
    answers_reachable, fence_deadline)

log = logging.getLogger("nlbfarm.lease")


class LeaseKeeper:
    def __init__(self, me: str, timing: Timing, farm, dataplane, *,
                 link_up: Callable[[], bool], member_present: Callable[[], bool],
                 peers: Callable[[], list], probe, wake: threading.Event,
                 clock: Callable[[], float] = time.monotonic):
        self.me = me
        self.timing = timing
        self.farm = farm  # FarmStore: refresh() is the only call the keeper makes
        self.dp = dataplane
        self._link_up = link_up
        self._member_present = member_present
        self._peers = peers
        self.probe = probe
        self._wake = wake
        self.clock = clock
        self._lock = threading.Lock()
        self._view = LeaseView()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._loop_ok = clock()
        self._etcd_state = "connecting"

    # ---- the view ------------------------------------------------------------

    def view(self) -> LeaseView:
        with self._lock:
            return self._view

    def _update(self, **changes) -> LeaseView:
        with self._lock:
            self._view = replace(self._view, **changes)
            return self._view

    @property
    def etcd_state(self) -> str:
        return self._etcd_state

    def fence_deadline(self):
        return fence_deadline(self.view(), self.timing, self._link_up(), self._member_present())

    def reachability(self) -> tuple[bool, bool, float]:
        """(votes, reaches etcd, age of the last success) for a peer that asks."""
        # View and clock under the lock that _succeeded holds: an answer given
        # from the old view is never later than the "now" its successor is
        # judged at (after_keepalive_ok's acquire grace relies on that).
        with self._lock:
            v, now = self._view, self.clock()
        answer = answers_reachable(v, self.timing, now)
        age = now - v.last_ok_sent if v.last_ok_sent is not None else -1.0
        return answer is not None, bool(answer), age

    # ---- registration (called by the loop, which does the etcd writes) --------

    def adopt(self, lease_id: int, applied_lease: int, sent: float, acquire_after: float = 0.0) -> None:
        """Leases were granted and the member key written with the first; ``sent``: when the grant was sent.

        ``acquire_after``: a predecessor process's acquire grace, which a successor keeps.
        """
        with self._lock:
            v = after_adopt(lease_id, applied_lease, sent, self.clock(), self.timing)
            self._view = replace(v, acquire_after=max(v.acquire_after, acquire_after))
        self._etcd_state = "connected"

    def release(self) -> LeaseView:
        """Forget the lease (shutdown): the fence may not be extended any more."""
        return self._update(registered=False, lost=False, consensus_at=None)

    def mark_lost(self) -> None:
        """etcd refused a write with our lease: it is gone. Close the fence now."""
        if not self.view().lost:
            log.error("lease gone node=%s: closing the fence and re-registering", self.me)
        self._update(lost=True)
        self._close_fence()
        self._wake.set()

    def loop_alive(self) -> None:
        self._loop_ok = self.clock()

    # ---- threads ------------------------------------------------------------------

    def start(self) -> None:
        for name, fn in (("keepalive", self._keepalive_loop), ("fence", self._fence_loop),
                         ("prober", self._prober_loop)):
            t = threading.Thread(target=self._guard(name, fn), name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=5)

    def _guard(self, name: str, fn):
        """Keep a thread alive through any bug or unexpected error: a dead keeper thread
        would leave a zombie agent that never refreshes (or never closes) its fence."""
        def run():
            while not self._stop.is_set():
                try:
                    fn()
                    return
                except Exception:  # noqa: BLE001 - logged, then the loop starts again
                    log.exception("thread failed thread=%s node=%s; restarting it", name, self.me)
                    self._stop.wait(self.timing.fence_refresh)
        return run

    def _keepalive_loop(self) -> None:
        # The first refresh at once: registration, the first ruleset and the VIP
        # took time since the grant was sent, and the lease counts from then.
        self.keepalive_once()
        while not self._stop.wait(self.timing.keepalive_interval):
            self.keepalive_once()

    def keepalive_once(self) -> None:
        v = self.view()
        if not v.registered or v.lost:
            return
        now = self.clock()
        if now - self._loop_ok > self.timing.lease_ttl:
            if not v.loop_stuck:
                log.error("reconcile loop stuck for=%.1fs node=%s: not refreshing the lease",
                          now - self._loop_ok, self.me)
            self._update(loop_stuck=True)
            return
        if v.loop_stuck:
            self._update(loop_stuck=False)
        sent = self.clock()
        try:
            self.farm.refresh_all((v.lease_id, v.applied_lease), deadline=self.timing.keepalive_interval)
        except LeaseExpired:
            log.error("lease expired node=%s lease=%x: peers may have taken over; closing the fence and "
                      "re-registering", self.me, v.lease_id)
            self._update(lost=True)
            self._close_fence()
            self._wake.set()
            return
        except StoreError as exc:
            self._failed(sent, exc)
            self._wake.set()
            return
        if self._succeeded(sent):
            # Only news wakes the loop: a routine success changes no decision
            # before the loop's own tick (an idle agent's CPU is mostly cycles).
            self._wake.set()

    def note_keepalive(self, sent: float) -> None:
        """A successful keepalive sent at ``sent`` (the keepalive thread's outcome; tests drive it by hand)."""
        self._succeeded(sent)

    def _succeeded(self, sent: float) -> bool:
        """Record a success; True if it ends a stale spell (news for the loop)."""
        with self._lock:
            before = self._view
            self._view = after_keepalive_ok(before, sent, self.clock(), self.timing)
        self._etcd_state = "connected"
        if before.stale_since is not None:
            log.info("etcd reachable again node=%s after=%.1fs", self.me, sent - (before.last_ok_sent or sent))
            return True
        return False

    def _failed(self, sent: float, exc: Exception) -> None:
        with self._lock:
            before = self._view
            self._view = after_keepalive_failed(before, sent)
        if before.stale_since is None:
            log.warning("keepalive failed node=%s reason=%s", self.me, exc)

    def _close_fence(self) -> None:
        try:
            self.dp.close_fence()
        except DataPlaneError as exc:
            log.error("could not close the fence node=%s reason=%s", self.me, exc)

    def _fence_loop(self) -> None:
        while not self._stop.wait(self.timing.fence_refresh):
            self.refresh_fence_once()

    def refresh_fence_once(self) -> None:
        until, _why = self.fence_deadline()
        try:
            self.dp.refresh_fence(until)
        except DataPlaneError as exc:
            log.error("fence refresh failed node=%s reason=%s; rebuilding the ruleset", self.me, exc)
            self._wake.set()

    def _prober_loop(self) -> None:
        while not self._stop.wait(self.timing.keepalive_interval):
            self.probe_once()

    def probe_once(self) -> None:
        v, now = self.view(), self.clock()
        if not v.registered or v.lost or v.last_ok_sent is None:
            return
        if now - v.last_ok_sent < self.timing.late_after:
            return
        started = self.clock()
        down_for_all, why = self.probe.etcd_down_for_all(self._peers())
        state = ("unreachable for every peer: keeping the last table" if down_for_all
                 else f"unreachable from this node ({why}): stepping back")
        if state != self._etcd_state:
            log.warning("etcd session state=%s node=%s", state, self.me)
        self._etcd_state = state
        with self._lock:
            self._view = after_probe(self._view, started, v.last_ok_sent, down_for_all, self.timing,
                                     self.clock())
        self._wake.set()
