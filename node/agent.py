"""farmd: the node agent.

Threads and who decides what (Patroni's shape):

* the etcd watch thread only updates ``ClusterCache`` and wakes the loop;
* the keepalive thread only refreshes the lease, records when a refresh last
  succeeded, and wakes the loop;
* the checker threads (farm module health checks) only record results, publish
  a check_transition event and wake the loop;
* the gRPC status server and the metrics endpoint only read, apart from
  drain/undrain requests, which are written to etcd like any operator's;
* ONE reconcile loop (``Agent.cycle``) makes every decision: writing a new
  table, which buckets the kernel accepts, whether the fence stays open, what
  is published as applied, which state this node announces, and when the farm
  module's application is restarted or stopped. Each cycle returns a sentence
  that is logged when it changes and that tests assert on. The application's
  start/stop commands run on a worker thread so a slow script never stalls it.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import random
import secrets
import signal
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from nlbfarm import __version__
from nlbfarm.config import Config, load_config
from nlbfarm.coordinator.cluster import (
    Applied, ClusterSettings, ClusterSnapshot, DrainRequest, Member, applied_key, build_snapshot,
    cluster_key, drain_key, expand, member_key, table_key, TableRecord)
from nlbfarm.coordinator.rules import bucket_for, digest as rules_digest, match as match_rule
from nlbfarm.coordinator.rules import resolve as resolve_rules
from nlbfarm.coordinator.handover import AcceptPlan, plan_accept, plan_table
from nlbfarm.coordinator.store import EtcdStore, LeaseExpired, Store
from nlbfarm.coordinator.table import bucket_ranges
from nlbfarm.errors import (
    ConfigError, DataPlaneError, DuplicateMember, FarmError, StoreError, StoreUnavailable)
from nlbfarm.logs import setup_logging
from nlbfarm.node.checks import HealthMonitor
from nlbfarm.node.conntrack import live_connections_by_bucket
from nlbfarm.node import iplib
from nlbfarm.node.dataplane import DataPlane, DataPlaneSpec, cluster_mac_for
from nlbfarm.node.events import EventBus
from nlbfarm.node.metrics import AgentMetrics
from nlbfarm.node.module import FarmModule
from nlbfarm.node.peers import PeerProbe, peer_tls
from nlbfarm.node.vip import Vip

log = logging.getLogger("nlbfarm.agent")

# Margin kept between the fence expiry and the earliest lease expiry, for
# scheduling jitter between reading the clock and the kernel taking the element.
FENCE_MARGIN_S = 0.2
# How often a node with draining buckets counts its connections in conntrack.
CONNTRACK_SCAN_S = 1.0


class ClusterCache:
    """The agent's copy of every key under the cluster prefix, fed by the watch."""

    def __init__(self, prefix: str, wake: threading.Event):
        self.prefix = prefix
        self._wake = wake
        # (monotonic time, revision) of the first membership change not yet
        # applied, for the change-to-apply histogram; the loop clears it.
        self.member_change_at: tuple[float, int] | None = None
        self._lock = threading.Lock()
        self._items: dict[str, tuple[bytes, int]] = {}
        self._revision = 0
        # Events at or below the revision of the last full read are already in
        # it; a lagging watch must not roll the cache back (e.g. after the
        # agent re-read the prefix on re-registration).
        self._floor = 0
        self._version = 0
        self._snapshot: ClusterSnapshot | None = None
        self._warned: set[str] = set()

    def reset(self, items: dict[str, tuple[bytes, int]], revision: int) -> None:
        with self._lock:
            if revision < self._floor:
                return
            self._items = dict(items)
            self._revision = self._floor = revision
            self._version += 1
        self._wake.set()

    @property
    def revision(self) -> int:
        return self._revision

    def on_event(self, ev) -> None:
        if ev.kind == "resync":
            self.reset({k: (kv.value, kv.mod_revision) for k, kv in ev.snapshot.items()}, ev.mod_revision)
            return
        with self._lock:
            if ev.mod_revision <= self._floor:
                return
            if "/members/" in ev.key and self.member_change_at is None:
                old = self._items.get(ev.key)
                if ev.kind == "delete" or old is None or old[0] != ev.value:
                    self.member_change_at = (time.monotonic(), ev.mod_revision)
            if ev.kind == "put":
                self._items[ev.key] = (ev.value, ev.mod_revision)
                self._revision = max(self._revision, ev.mod_revision)
            elif ev.kind == "delete":
                self._items.pop(ev.key, None)
                self._revision = max(self._revision, ev.mod_revision)
            self._version += 1
        self._wake.set()

    def snapshot(self) -> ClusterSnapshot:
        with self._lock:
            if self._snapshot is None or self._snapshot_version != self._version:
                self._snapshot = build_snapshot(self.prefix, self._items, self._revision)
                self._snapshot_version = self._version
            snap = self._snapshot
        for w in snap.warnings:
            if w not in self._warned:
                self._warned.add(w)
                log.warning(w)
        return snap


@dataclass
class LocalState:
    """What this node has done, as opposed to what the cluster wants."""

    accepting: frozenset = frozenset()
    # Released TCP buckets still serving established connections: bucket -> (deadline, released at).
    draining: dict = field(default_factory=dict)
    conn_counts: Counter = field(default_factory=Counter)
    conn_scan_at: float = 0.0
    published: Applied | None = None  # last record written to applied/<me>
    last_sentence: str = "starting"
    etcd_state: str = "connecting"
    node_state: str = "starting"
    state_reason: str = "agent starting"

    @property
    def published_generation(self) -> int:
        return self.published.generation if self.published else -1


class Agent:
    def __init__(self, cfg: Config, store: Store | None = None, dataplane: DataPlane | None = None,
                 vip: Vip | None = None):
        self.cfg = cfg
        self.me = cfg.node.id
        self.prefix = cfg.key_prefix
        self.store = store or EtcdStore.from_config(cfg.etcd)  # endpoints, timing, TLS, credentials
        self.dp = dataplane or DataPlane()
        mac = cfg.cluster.cluster_mac
        self.cluster_mac = cluster_mac_for(cfg.cluster.vips[0], cfg.cluster.mac_mode) if mac == "auto" else mac
        self.vip = vip or Vip(cfg.node.interface, cfg.cluster.vips, self.cluster_mac,
                              mac_mode=cfg.cluster.mac_mode)
        self.rules = resolve_rules(cfg.cluster.vips, cfg.cluster.effective_rules)
        self._node_mac: str | None = None
        self.rules_digest = rules_digest(self.rules, cfg.cluster.unmatched)
        self._rules_warned: set[str] = set()
        self.instance = secrets.token_hex(8)
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.cache = ClusterCache(self.prefix, self.wake)
        self.state = LocalState()
        self.settings: ClusterSettings | None = None
        self.lease_id: int | None = None
        self.lease_lost = threading.Event()
        self._last_keepalive_ok = 0.0  # monotonic time the last successful refresh was SENT
        self._last_cycle_ok = time.monotonic()
        # Rule E (etcd down for everyone): when all peers last confirmed it.
        self._consensus_at = 0.0
        self._failing_since: float | None = None
        # No new buckets before this time: set when etcd comes back after an outage.
        self._acquire_after = 0.0
        self._seen_tables: dict[int, tuple] = {}  # recent tables by generation
        self.probe = PeerProbe(self.me, timeout=min(0.5, cfg.timing.keepalive_interval),
                               tls=peer_tls(cfg.status))
        self._watch = None
        self._keepalive_stop = threading.Event()
        self.leave_started: float | None = None
        self.events = EventBus()
        self.metrics = AgentMetrics(self)
        self.ready = None  # the gRPC health service's readiness, set by main()
        # The farm module: the application's commands and health checks.
        self.module = FarmModule(cfg.module, env={"NLBFARM_NODE": self.me, "NLBFARM_CLUSTER": cfg.cluster.name})
        self.health = HealthMonitor(cfg.module.checks, on_transition=self._on_check_transition)
        self._module_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="module")
        self._module_busy: str | None = None  # "start", "restart", "stop" while a command runs
        self._module_idle_since = time.monotonic()
        self._module_started = not cfg.module.start  # the first start command finished
        self._module_stopped = False  # on_failure: stop has stopped the application
        self._start_failed: str | None = None  # why the last start/restart command failed
        self._restarts_exhausted = False  # loop protection hit: no restart until healthy again
        self._failed_since: float | None = None
        self._seen_members: dict[str, str] | None = None
        self._seen_generation = 0
        self._change_base_generation = 0

    # ---- start-up -------------------------------------------------------

    def _wait_for_etcd(self) -> None:
        """Retry with backoff until etcd answers; at start there is nothing to protect yet."""
        delay = 0.5
        while not self.stopping.is_set():
            try:
                self.store.get(cluster_key(self.prefix))
                self.state.etcd_state = "connected"
                return
            except StoreError as exc:
                self.state.etcd_state = "retrying"
                log.warning("etcd unreachable endpoints=%s retry_in=%.1fs reason=%s",
                            ",".join(self.cfg.etcd.endpoints), delay, exc)
                self.stopping.wait(delay)
                delay = min(delay * 2, 10.0)

    def _ensure_settings(self) -> ClusterSettings | None:
        key = cluster_key(self.prefix)
        proposal = ClusterSettings(seed=random.SystemRandom().getrandbits(32),
                                   buckets=self.cfg.cluster.buckets)
        if self.store.create(key, proposal.encode()):
            log.info("created cluster settings prefix=%s buckets=%d", self.prefix, proposal.buckets)
        while not self.stopping.is_set():
            kv = self.store.get(key)
            try:
                settings = ClusterSettings.decode(kv.value) if kv else None
            except ValueError as exc:
                log.warning("cluster settings unusable key=%s reason=%s retry_in=5s", key, exc)
                self.stopping.wait(5)
                continue
            if settings is None:
                self.store.create(key, proposal.encode())
                continue
            if settings.buckets != self.cfg.cluster.buckets:
                raise ConfigError(
                    f"cluster.buckets is {self.cfg.cluster.buckets} but cluster {self.cfg.cluster.name!r} "
                    f"in etcd uses {settings.buckets}; every node must use the same bucket count")
            return settings
        return None

    def _member(self, state: str, reason: str = "") -> Member:
        return Member(self.me, self.cfg.node.weight, state, self.cfg.node.addresses, __version__,
                      self.instance, self.cfg.status.peer_listen or "", reason, self.rules_digest)

    def _register(self) -> None:
        """Create members/<me> bound to a new lease, then re-read the cluster.

        The re-read matters after a lost lease: the cache may still show an old
        table in which this node owned buckets that peers have since taken.
        """
        key = member_key(self.prefix, self.me)
        sent = time.monotonic()
        lease = self.store.grant_lease(self.cfg.timing.lease_ttl).id
        first, reason = self._desired_state(None)
        try:
            created = self.store.create(key, self._member(first, reason).encode(), lease_id=lease)
            if not created:
                kv = self.store.get(key)
                mine = False
                if kv is not None:
                    try:
                        mine = Member.decode(self.me, kv.value).instance == self.instance
                    except ValueError:
                        pass
                if mine:
                    # An earlier attempt of this very process registered, but
                    # its reply was lost: retire that lease and register again.
                    self.store.revoke_lease(kv.lease)
                    created = self.store.create(key, self._member(first, reason).encode(), lease_id=lease)
            if not created:
                raise DuplicateMember(
                    f"node id {self.me!r} is already registered in cluster {self.cfg.cluster.name!r} "
                    f"by a live agent ({key} exists); refusing to start so the running node is "
                    "not disturbed")
            items, rev = self.store.get_prefix(self.prefix)
        except BaseException:
            try:
                self.store.revoke_lease(lease, deadline=1.0)
            except StoreError:
                pass  # it expires by itself
            raise
        self.cache.reset({k: (kv.value, kv.mod_revision) for k, kv in items.items()}, rev)
        self.lease_id = lease
        self._last_keepalive_ok = sent
        self.lease_lost.clear()
        self.state.published = None
        log.info("registered node=%s lease=%x ttl=%ds weight=%d", self.me, lease,
                 self.cfg.timing.lease_ttl, self.cfg.node.weight)

    def start(self) -> None:
        """Everything up to a running loop. Raises FarmError before any change if it cannot run."""
        delay = 0.5
        while True:
            self._wait_for_etcd()
            if self.stopping.is_set():
                return
            try:
                self.settings = self._ensure_settings()
                if self.settings is None:
                    return
                self._register()
                break
            except StoreUnavailable as exc:
                # etcd went away between the probe and registration: same policy as at start.
                log.warning("etcd unreachable during registration retry_in=%.1fs reason=%s", delay, exc)
                self.stopping.wait(delay)
                delay = min(delay * 2, 10.0)
        # Order matters: the ARP rewrite must be in force before the VIP exists,
        # or a client could learn this node's own MAC for the VIP.
        self.dp.apply(self._base_spec(fence_open=True))
        self.vip.up()
        self._watch = self.store.watch_prefix(self.prefix, self.cache.on_event,
                                              start_revision=self.cache.revision + 1)
        threading.Thread(target=self._keepalive_loop, name="keepalive", daemon=True).start()
        self._run_module("start")

    @property
    def node_mac(self) -> str:
        """The interface's MAC, read once: the IPv6 neighbour-discovery rewrite is computed from it."""
        if self._node_mac is None:
            if not any(":" in v for v in self.cfg.cluster.vips):
                self._node_mac = ""  # IPv4 only: the spec does not use it
            else:
                self._node_mac = iplib.link_mac(self.cfg.node.interface)
        return self._node_mac

    def _base_spec(self, fence_open: bool) -> DataPlaneSpec:
        return DataPlaneSpec(interface=self.cfg.node.interface, vips=self.cfg.cluster.vips,
                             cluster_mac=self.cluster_mac, buckets=self.settings.buckets,
                             seed=self.settings.seed, fence_open=fence_open, fence_timeout=self.cfg.timing.fence_timeout,
                             table=self.cfg.nft.table, mac_mode=self.cfg.cluster.mac_mode, rules=self.rules,
                             unmatched=self.cfg.cluster.unmatched, node_mac=self.node_mac)

    # ---- keepalive thread: refreshes the lease and extends an open fence ----

    def _keepalive_loop(self) -> None:
        t = self.cfg.timing
        while not self._keepalive_stop.wait(t.keepalive_interval):
            lease = self.lease_id
            if lease is None or self.lease_lost.is_set():
                continue
            if time.monotonic() - self._last_cycle_ok > t.lease_ttl:
                # A loop that cannot finish a cycle must not keep a lease that
                # makes peers wait for it: let it lapse so they take over.
                log.error("reconcile loop stuck for %.1fs node=%s: not refreshing the lease",
                          time.monotonic() - self._last_cycle_ok, self.me)
                continue
            sent = time.monotonic()
            try:
                self.store.refresh_lease(lease, deadline=t.keepalive_interval)
                self._keepalive_succeeded(sent)
            except LeaseExpired:
                log.error("lease expired node=%s lease=%x: peers may have taken over; re-registering",
                          self.me, lease)
                self.lease_lost.set()
            except StoreError as exc:
                self._keepalive_failed(sent, exc)
            try:
                self.dp.refresh_fence(self.fence_ok)
            except DataPlaneError as exc:
                log.error("fence refresh failed node=%s reason=%s; rebuilding the ruleset", self.me, exc)
            self.wake.set()

    def _keepalive_succeeded(self, sent: float) -> None:
        t = self.cfg.timing
        if self._failing_since is not None:
            down = sent - self._failing_since
            if down > 2 * t.keepalive_interval:
                # Peers that stayed cut off may still serve from rule E for a
                # moment: take no new bucket until they have surely stopped.
                self._acquire_after = time.monotonic() + self.acquire_grace()
            log.info("etcd reachable again node=%s after=%.1fs", self.me, down)
        self._failing_since = None
        self._last_keepalive_ok = sent
        self.state.etcd_state = "connected"

    def _keepalive_failed(self, sent: float, exc: Exception) -> None:
        if self._failing_since is None:
            self._failing_since = sent
            log.warning("keepalive failed node=%s reason=%s", self.me, exc)
        if sent - self._last_keepalive_ok <= 2 * self.cfg.timing.keepalive_interval:
            return
        snap = self.cache.snapshot()
        peers = {m.id: m.peer for m in snap.members.values() if m.id != self.me}
        down_for_all, why = self.probe.etcd_down_for_all(peers)
        state = ("unreachable for every peer: keeping the last table" if down_for_all
                 else f"unreachable from this node ({why}): stepping back")
        if state != self.state.etcd_state:
            log.warning("etcd %s node=%s", state, self.me)
        self.state.etcd_state = state
        if down_for_all:
            self._consensus_at = sent

    def acquire_grace(self) -> float:
        t = self.cfg.timing
        return t.fence_timeout + 3 * t.keepalive_interval + self.cfg.etcd.timeout + 0.5

    # ---- the reconcile loop ----------------------------------------------

    def fence_ok(self, now: float | None = None) -> bool:
        """May the fence be extended now? (step 3 and rule E of the handover argument)"""
        now = time.monotonic() if now is None else now
        if self.lease_lost.is_set() or not self.vip.link_up():
            return False
        window = self.cfg.timing.lease_ttl - self.cfg.timing.fence_timeout - FENCE_MARGIN_S
        return now - self._last_keepalive_ok < window or self.static_mode(now)

    def static_mode(self, now: float | None = None) -> bool:
        """Serving from rule E: etcd unreachable, and every peer recently said the same."""
        now = time.monotonic() if now is None else now
        t = self.cfg.timing
        window = min(2 * t.keepalive_interval + self.cfg.etcd.timeout,
                     t.lease_ttl - t.fence_timeout - FENCE_MARGIN_S)
        return now - self._consensus_at < window

    def _desired_state(self, snap: ClusterSnapshot | None) -> tuple[str, str]:
        """The member state this node should announce, and why."""
        if self.leave_started is not None:
            return "leaving", "the agent is stopping"
        if self._module_stopped:
            return "stopped", ("a health check failed and on_failure is stop: application stopped; "
                               "restart the agent to rejoin")
        failing = self.health.failing()
        if failing:
            # The cause, not the latest probe's detail: the reason goes to
            # etcd, and must not change (and be rewritten) with every probe.
            st = {c.name: c for c in self.health.statuses()}
            what = "; ".join(f"check {n} failing: {st[n].cause}" for n in failing)
            if self._module_busy == "restart":
                what += "; restarting the application"
            elif self._restarts_exhausted:
                what += "; restart limit reached"
            return "failed", what
        if self._start_failed is not None and not self.cfg.module.checks and not self._module_busy:
            return "failed", f"{self.cfg.module.name} failed to start: {self._start_failed}"
        if not self._module_started:
            return "starting", f"application starting ({self._module_busy or 'start'} command running)"
        if not self.health.healthy():
            waiting = [c.name for c in self.health.statuses() if c.state != "passing"]
            return "starting", f"waiting for checks to pass: {', '.join(waiting)}"
        if snap is not None and self.me in snap.drains:
            return "draining", "an operator asked this node to drain"
        if self.cfg.module.checks:
            return "active", "all checks passing"
        return "active", "no checks configured"

    # ---- farm module: health checks and the application's commands ---------

    def _on_check_transition(self, name: str, old: str, new: str, detail: str) -> None:
        # Checker thread: record and wake; the loop decides what follows.
        self.events.publish("check_transition", self.me, f"check {name} {old} -> {new}: {detail}",
                            check=name, old=old, new=new)
        self.wake.set()

    def _run_module(self, action: str) -> None:
        """Run start, restart or stop on the module worker; the loop sees the outcome."""
        if action in ("start", "restart") and not self.cfg.module.start:
            self._module_started = True
            self.health.start()
            return
        if action == "stop" and not self.cfg.module.stop:
            return
        self._module_busy = action
        self.events.publish("module_action", self.me, f"{action} of {self.cfg.module.name} begins",
                            action=action)

        def work():
            try:
                res = getattr(self.module, action)()
                self.events.publish("module_action", self.me,
                                    f"{action} of {self.cfg.module.name} "
                                    f"{'done' if res.ok else 'FAILED'}: {res.detail}",
                                    action=action, ok=res.ok)
                if action in ("start", "restart"):
                    self._start_failed = None if res.ok else res.detail
                if action == "start":
                    self._module_started = True
                    # Checks begin after the start command, as SafeKit's
                    # checkers do after start_both: a starting application
                    # must not count as failing. Not once the agent stops.
                    if not self.stopping.is_set():
                        self.health.start()
            finally:
                # idle_since first: the loop reads busy, then idle_since.
                self._module_idle_since = time.monotonic()
                self._module_busy = None
                self.wake.set()

        self._module_worker.submit(work)

    def _module_action(self, state: str, announced: Member | None) -> None:
        """on_failure for a failed node, once it has withdrawn.

        Restarting or stopping the application while the node still accepts
        its buckets would reset new connections that peers could serve, so
        the action waits until the failed state is announced and this node
        accepts nothing (or leave_timeout passed, say in a one-node farm).
        """
        m = self.cfg.module
        now = time.monotonic()
        if state != "failed":
            self._failed_since = None
            if state == "active":
                self._restarts_exhausted = False
            return
        if self._failed_since is None:
            self._failed_since = now
        if self._module_busy or m.on_failure == "withdraw" or self._restarts_exhausted or self._module_stopped:
            return
        withdrawn = announced is not None and announced.state == "failed" and not self.state.accepting
        if not withdrawn and now - self._failed_since < self.cfg.timing.leave_timeout:
            return
        if m.on_failure == "stop":
            log.warning("check failed node=%s action=stop: stopping %s and staying out of the farm",
                        self.me, m.name)
            self._module_stopped = True
            self._run_module("stop")
            return
        # Give a restarted application one full check window to come back
        # before counting it as still failing.
        settle = max((c.interval * (c.rise + c.fall) for c in m.checks), default=0)
        if time.monotonic() - self._module_idle_since < settle:
            return
        if self.module.may_restart():
            log.warning("check failed node=%s action=restart restarts_in_window=%d limit=%d", self.me,
                        self.module.restarts_in_window(), m.restart_limit)
            self._run_module("restart")
        else:
            # SafeKit's loop protection: no more restarts until the checks
            # pass again, however long that takes.
            self._restarts_exhausted = True
            log.error("restart limit reached node=%s restarts=%d window=%.0fs: staying withdrawn until "
                      "the checks pass again", self.me, self.module.restarts_in_window(), m.restart_window)
            self.events.publish("module_action", self.me,
                                f"restart limit reached ({m.restart_limit} in {m.restart_window:.0f} s): "
                                "staying withdrawn", action="restart_limit")

    def _note_changes(self, snap: ClusterSnapshot) -> None:
        """Turn differences between snapshots into events."""
        members = {m.id: m.state for m in snap.members.values()}
        reasons = {m.id: m.reason for m in snap.members.values()}
        if self._seen_members is not None:
            for nid in sorted(members.keys() - self._seen_members.keys()):
                self.events.publish("member_joined", nid, f"{nid} joined as {members[nid]}",
                                    state=members[nid])
            for nid in sorted(self._seen_members.keys() - members.keys()):
                self.events.publish("member_left", nid, f"{nid} left (its lease ended)")
            for nid in sorted(members.keys() & self._seen_members.keys()):
                if members[nid] != self._seen_members[nid]:
                    self.events.publish("member_state", nid,
                                        f"{nid} {self._seen_members[nid]} -> {members[nid]}: {reasons[nid]}",
                                        old=self._seen_members[nid], new=members[nid])
        self._seen_members = members
        for m in snap.members.values():
            if m.rules and m.rules != self.rules_digest and m.id not in self._rules_warned:
                self._rules_warned.add(m.id)
                log.warning("traffic rules differ node=%s peer=%s mine=%s theirs=%s: cluster.vips, "
                            "cluster.rules and cluster.unmatched must be identical on every node, or a "
                            "packet may be served by two nodes or none", self.me, m.id, self.rules_digest,
                            m.rules)
        g = snap.table.generation if snap.table else 0
        if g != self._seen_generation:
            counts = snap.counts()
            self.events.publish("table_changed", "", f"table generation {g}: " + ", ".join(
                f"{n}={counts[n]}" for n in sorted(counts)), generation=g)
            self._seen_generation = g

    def _drain_deadline(self, snap: ClusterSnapshot, now: float) -> float:
        """When buckets released now stop serving their old connections."""
        t = self.cfg.timing
        if self.leave_started is not None:
            return self.leave_started + t.stop_drain_timeout
        req = snap.drains.get(self.me)
        if req is not None and req.timeout is not None:
            return now + req.timeout
        return now + t.drain_timeout

    def _update_draining(self, snap: ClusterSnapshot, released: frozenset, accepting: frozenset,
                         now: float) -> None:
        """Track released buckets until their last connection closed or their deadline passed."""
        st = self.state
        deadline = self._drain_deadline(snap, now)
        draining = {b: v for b, v in st.draining.items() if b not in accepting}
        for b in released:
            draining.setdefault(b, (deadline, now))
        if self.leave_started is not None:  # a stop caps every drain
            draining = {b: (min(d, deadline), since) for b, (d, since) in draining.items()}
        if draining and now - st.conn_scan_at >= CONNTRACK_SCAN_S:
            try:
                st.conn_counts = live_connections_by_bucket(self.cfg.cluster.vips, self.rules,
                                                            self.cfg.cluster.unmatched,
                                                            self.settings.buckets,
                                                            self.settings.seed)
                st.conn_scan_at = now
            except DataPlaneError as exc:
                log.warning("conntrack scan failed node=%s reason=%s", self.me, exc)
        done = [b for b, (d, since) in draining.items()
                if now >= d or (st.conn_scan_at > since and st.conn_counts.get(b, 0) == 0)]
        expired = [b for b in done if st.conn_counts.get(b, 0) and now >= draining[b][0]]
        if expired:
            log.warning("drain timeout node=%s buckets=%d connections=%d: no longer served", self.me,
                        len(expired), sum(st.conn_counts.get(b, 0) for b in expired))
        for b in done:
            del draining[b]
        st.draining = draining

    def cycle(self) -> str:
        """One reconcile step. Returns the sentence describing what it did or waits for."""
        if self.lease_lost.is_set():
            return self._recover_lease()
        snap = self.cache.snapshot()
        self._remember_table(snap)
        self._note_changes(snap)
        mine = snap.members.get(self.me)
        desired, reason = self._desired_state(snap)
        self._module_action(desired, mine)
        if mine is not None and (mine.state, mine.reason) != (desired, reason):
            self.store.put(member_key(self.prefix, self.me), self._member(desired, reason).encode(),
                           lease_id=self.lease_id)
            if desired != self.state.node_state:
                log.info("state change node=%s from=%s to=%s reason=%r", self.me, self.state.node_state,
                         desired, reason)
                self.events.publish("node_state", self.me, f"{self.state.node_state} -> {desired}: {reason}",
                                    old=self.state.node_state, new=desired)
            self.state.node_state, self.state.state_reason = desired, reason
            return f"state {desired} ({reason}): " + {
                "leaving": "peers will take over this node's buckets",
                "draining": "no new connections; established ones are kept until they close",
                "failed": "withdrawing: peers take over this node's buckets",
                "stopped": "withdrawing: peers take over this node's buckets",
                "starting": "taking no buckets until every check passes",
                "active": "taking buckets"}[desired]
        self.state.node_state, self.state.state_reason = desired, reason
        update = plan_table(snap)
        if update is not None:
            ok = self.store.compare_and_swap(
                table_key(self.prefix), TableRecord.encode(update.generation, update.owners),
                update.expected_revision)
            if ok:
                return (f"wrote table generation {update.generation}: moved {update.moved} "
                        f"buckets ({update.reason})")
            return f"table generation {update.generation} was written by a peer first"
        now = time.monotonic()
        link_up = self.vip.link_up()
        fence_open = link_up and self.fence_ok(now)
        plan = plan_accept(self.me, snap, self.state.accepting)
        keepalive_fresh = now - self._last_keepalive_ok < 2 * self.cfg.timing.keepalive_interval
        if not fence_open or not keepalive_fresh:
            # Take nothing new without a fresh lease (rule E serves only what it
            # had); without an open fence, also close it now rather than wait
            # for the element to expire.
            plan = AcceptPlan(plan.generation, plan.target, plan.accepting & self.state.accepting,
                              plan.waiting_for)
        elif now < self._acquire_after:
            plan = self._hold_vanished_owners(snap, plan)
        self._update_draining(snap, self.state.accepting - plan.accepting, plan.accepting, now)
        guarded = plan.accepting & snap.draining_elsewhere(self.me)
        spec = self._base_spec(fence_open).with_buckets(
            bucket_ranges(plan.accepting), bucket_ranges(self.state.draining), bucket_ranges(guarded))
        rebuilt = self.dp.current is None
        t0 = time.monotonic()
        if self.dp.apply(spec):
            self.metrics.apply_seconds.observe(time.monotonic() - t0)
            self.state.accepting = plan.accepting
            if rebuilt:
                # Our tables had vanished (flushed by another tool): while the ARP
                # rewrite was gone, clients may have cached this node's own MAC.
                self.vip.announce()
        if not link_up:
            return f"link {self.cfg.node.interface} is down: fence closed, withdrawing from the farm"
        if not fence_open:
            return (f"fence closed: no successful keepalive for "
                    f"{time.monotonic() - self._last_keepalive_ok:.1f} s; dropping all VIP traffic")
        if not keepalive_fresh:
            # No etcd writes without a fresh keepalive: they would only block
            # the loop in retries while the keepalive thread sorts things out.
            if self.static_mode(now):
                return (f"etcd unreachable for every peer: serving generation {plan.generation} "
                        f"unchanged ({len(self.state.accepting)} buckets)")
            return (f"etcd keepalive late ({now - self._last_keepalive_ok:.1f} s): holding generation "
                    f"{plan.generation} with {len(self.state.accepting)} buckets, taking none")
        g = plan.generation
        conns = sum(self.state.conn_counts.get(b, 0) for b in self.state.draining)
        report = Applied(g, len(self.state.accepting), tuple(bucket_ranges(self.state.draining)), conns)
        if g and self.state.published != report:
            # Invariant I: the kernel now accepts new connections only in T_g's
            # buckets for this node; the draining list goes out in the same write,
            # so a new owner guards those buckets from its first packet.
            self.store.put(applied_key(self.prefix, self.me), report.encode(), lease_id=self.lease_id)
            self.state.published = report
        self._observe_change_applied(snap, plan)
        if self.ready is not None:
            self.ready.set_ready(self.state.node_state == "active" and plan.complete and g > 0)
        if g == 0:
            return "waiting for the first table"
        draining = (f"; draining {len(self.state.draining)} buckets with {conns} connections"
                    if self.state.draining else "")
        if plan.complete:
            return (f"generation {g} applied: accepting {len(plan.accepting)} of {self.settings.buckets} "
                    f"buckets{draining}")
        waiting = (f"waiting for {','.join(plan.waiting_for)} to apply generation {g}" if plan.waiting_for
                   else "holding buckets of vanished nodes until they surely stopped serving")
        return (f"generation {g}: accepting {len(plan.accepting)} of {len(plan.target)} owned buckets, "
                f"{waiting}{draining}")

    def _observe_change_applied(self, snap: ClusterSnapshot, plan: AcceptPlan) -> None:
        """Membership change -> this node's kernel runs the resulting table: one histogram sample.

        Called only for a snapshot that needs no new table (cycle() returns
        early after writing one), so ``snap.table`` is the resulting table.
        """
        if not plan.complete:
            return
        g = snap.table.generation if snap.table else 0
        change = self.cache.member_change_at
        if change is None or snap.revision < change[1]:
            if change is None:
                self._change_base_generation = g
            return
        self.cache.member_change_at = None
        # A change that needed no new table (say a weight-0 member) has nothing to time.
        if g != self._change_base_generation:
            self.metrics.change_to_apply_seconds.observe(time.monotonic() - change[0])
        self._change_base_generation = g

    def _remember_table(self, snap: ClusterSnapshot) -> None:
        if snap.table is not None and snap.table.generation not in self._seen_tables:
            self._seen_tables[snap.table.generation] = snap.table.owners
            for g in sorted(self._seen_tables)[:-3]:
                del self._seen_tables[g]

    def _hold_vanished_owners(self, snap: ClusterSnapshot, plan: AcceptPlan) -> AcceptPlan:
        """Right after an etcd outage: no bucket whose previous owner vanished with its lease.

        That owner may still serve it under rule E until it learns that etcd is
        back (peers tell it within a keepalive interval) and its fence runs out.
        Buckets handed over by live peers are safe and are taken at once.
        """
        new = plan.accepting - self.state.accepting
        earlier = [g for g in self._seen_tables if g < plan.generation]
        prev = self._seen_tables[max(earlier)] if earlier else None
        live = snap.live()
        held = frozenset(b for b in new if prev is None or prev[b] not in live)
        if not held:
            return plan
        return AcceptPlan(plan.generation, plan.target, plan.accepting - held, plan.waiting_for)

    def _recover_lease(self) -> str:
        # Peers may already own our buckets: stop accepting anything first.
        self.dp.apply(self._base_spec(fence_open=False).with_buckets((), ()))
        self.state.accepting = frozenset()
        self.state.draining = {}
        if self.leave_started is not None:
            return "lease lost while leaving: nothing left to hand over"
        try:
            self._register()
        except DuplicateMember:
            return "lease lost; waiting for the old member key to expire before re-registering"
        self._acquire_after = time.monotonic() + self.acquire_grace()
        return "lease lost: released every bucket and registered again"

    def run_loop(self) -> None:
        while True:
            self.wake.wait(self.cfg.timing.keepalive_interval)
            self.wake.clear()
            if self.stopping.is_set() and self.leave_started is None:
                self.leave_started = time.monotonic()
                log.info("leaving node=%s: handing over buckets before removing the VIP", self.me)
            try:
                sentence = self.cycle()
                self._last_cycle_ok = time.monotonic()
            except (StoreError, DataPlaneError) as exc:
                sentence = f"cycle failed: {exc}"
            except Exception as exc:  # a bug must not kill the loop silently
                log.exception("cycle crashed node=%s", self.me)
                sentence = f"cycle crashed: {type(exc).__name__}: {exc}"
            if sentence != self.state.last_sentence:
                log.info("cycle node=%s result=%r", self.me, sentence)
                self.state.last_sentence = sentence
            if self.leave_started is not None and self._leave_done():
                return

    # ---- graceful leave ----------------------------------------------------

    def _leave_done(self) -> bool:
        if self.lease_lost.is_set():
            return True
        snap = self.cache.snapshot()
        handed_over = self._handed_over(snap)
        if not handed_over and time.monotonic() - self.leave_started > self.cfg.timing.leave_timeout:
            log.warning("leave timeout node=%s after %.0fs: peers did not take over; leaving anyway",
                        self.me, self.cfg.timing.leave_timeout)
            return True
        # Established connections finish first; _update_draining ends them at
        # leave_started + stop_drain_timeout at the latest.
        return handed_over and not self.state.draining

    def _handed_over(self, snap: ClusterSnapshot) -> bool:
        """The table no longer gives this node buckets and every live peer applied it."""
        if snap.table is None:
            return True
        g = snap.table.generation
        if snap.table.owned_by(self.me) or self.state.accepting or self.state.published_generation != g:
            return False
        peers = snap.live() - {self.me}
        return all((a := snap.applied.get(p)) is not None and a.generation >= g for p in peers)

    def shutdown(self) -> None:
        """Stop serving, remove the VIP, then the rules, then the lease (never the other way round)."""
        self._keepalive_stop.set()
        self.health.stop()
        if self.ready is not None:
            self.ready.set_ready(False)
        if self.dp.current is not None and self.settings is not None:
            try:
                self.dp.apply(self._base_spec(fence_open=False).with_buckets((), ()))
                self.state.accepting = frozenset()
                self.state.draining = {}
            except DataPlaneError as exc:
                log.error("could not close the fence node=%s reason=%s", self.me, exc)
        if self.vip.down():
            try:
                self.dp.teardown(self.cfg.nft.table)
            except DataPlaneError as exc:
                log.error("could not remove nft tables node=%s reason=%s", self.me, exc)
        else:
            log.error("a VIP is still configured node=%s: keeping the ARP rewrite so clients keep "
                      "the cluster MAC; remove the VIP by hand, then the nft tables", self.me)
        if self._watch is not None:
            self._watch.cancel()
        if self.lease_id is not None:
            try:
                self.store.revoke_lease(self.lease_id, deadline=2.0)
            except StoreError as exc:
                log.warning("lease revoke failed node=%s reason=%s (it expires by itself)", self.me, exc)
        self.lease_id = None
        self.probe.close()
        self.store.close()
        self.stop_module()
        self.events.close()
        log.info("stopped node=%s", self.me)

    def stop_module(self) -> None:
        """The application's stop command, once no VIP traffic can reach it any more."""
        self._module_worker.shutdown(wait=True)  # a running start/restart finishes first
        self.health.stop()  # in case a start finished after shutdown() stopped the checks
        if self.cfg.module.stop and not self._module_stopped:
            self._module_stopped = True
            res = self.module.stop()
            if not res.ok:
                log.error("module stop failed node=%s module=%s reason=%s", self.me, self.cfg.module.name,
                          res.detail)

    # ---- operator requests and peer questions (gRPC threads) ---------------

    def request_drain(self, node_id: str, timeout: float | None) -> str:
        snap = self.cache.snapshot()
        if node_id not in snap.members:
            raise KeyError(f"no member named {node_id!r} in cluster {self.cfg.cluster.name!r} "
                           f"(members: {', '.join(sorted(snap.members)) or 'none'})")
        self.store.put(drain_key(self.prefix, node_id), DrainRequest(timeout).encode())
        log.info("drain requested node=%s timeout=%s via=%s", node_id, timeout or "default", self.me)
        self.events.publish("drain_requested", node_id, f"drain of {node_id} requested through {self.me}",
                            timeout=timeout or "default")
        return f"{node_id} is draining: it takes no new connections and keeps established ones " \
               f"until they close or {timeout or 'its drain_timeout'} s pass"

    def request_undrain(self, node_id: str) -> str:
        snap = self.cache.snapshot()
        if node_id not in snap.members and node_id not in snap.drains:
            raise KeyError(f"no member named {node_id!r} in cluster {self.cfg.cluster.name!r}")
        existed = self.store.delete(drain_key(self.prefix, node_id))
        log.info("undrain requested node=%s via=%s", node_id, self.me)
        self.events.publish("undrain_requested", node_id, f"undrain of {node_id} requested through {self.me}")
        return f"{node_id} takes buckets again" if existed else f"{node_id} was not draining"

    def table_view(self) -> dict:
        snap = self.cache.snapshot()
        if snap.table is None:
            return {"generation": 0, "bucket_count": self.cfg.cluster.buckets, "nodes": [],
                    "unowned": self.cfg.cluster.buckets}
        owners = snap.table.owners
        nodes = sorted({o for o in owners if o})
        return {"generation": snap.table.generation, "bucket_count": len(owners),
                "nodes": [{"node_id": n, "buckets": sum(1 for o in owners if o == n),
                           "ranges": bucket_ranges(i for i, o in enumerate(owners) if o == n)} for n in nodes],
                "unowned": sum(1 for o in owners if o is None)}

    def which(self, client_ip: str, client_port: int, vip: str | None, vip_port: int = 0,
              protocol: str = "") -> dict:
        """The bucket a client lands in and the node that serves it now.

        vip_port 0 / protocol "": the first port rule of the VIP decides.
        """
        import ipaddress
        try:
            family = ipaddress.ip_address(client_ip).version
        except ValueError:
            raise ValueError(f"client_ip {client_ip!r} is not an IP address") from None
        if not 0 < client_port < 65536:
            raise ValueError(f"client_port must be 1..65535, got {client_port}")
        if vip is not None and vip not in self.cfg.cluster.vips:
            raise ValueError(f"vip {vip} is not one of this farm's VIPs ({', '.join(self.cfg.cluster.vips)})")
        if protocol not in ("", "tcp", "udp"):
            raise ValueError(f"protocol must be tcp or udp, got {protocol!r}")
        if not 0 <= vip_port < 65536:
            raise ValueError(f"vip_port must be 0..65535, got {vip_port}")
        same_family = [v for v in self.cfg.cluster.vips if ipaddress.ip_address(v).version == family]
        if vip is None and not same_family:
            raise ValueError(f"client_ip {client_ip} is IPv{family} but this farm has no IPv{family} VIP")
        if vip is not None and vip not in same_family:
            raise ValueError(f"client_ip {client_ip} and vip {vip} are not of the same address family")
        snap = self.cache.snapshot()
        if snap.settings is None or snap.table is None:
            raise LookupError("the cluster has no bucket table yet")
        vip = vip or same_family[0]
        if not vip_port or not protocol:
            first = next((r for r in self.rules if r.vip == vip), None)
            vip_port = vip_port or (first.first if first else 1)
            protocol = protocol or (first.protocols[0] if first else "tcp")
        rule = match_rule(self.rules, vip, protocol, vip_port)
        b = bucket_for(self.rules, self.cfg.cluster.unmatched, vip, protocol, vip_port, client_ip, client_port,
                       snap.settings.buckets, snap.settings.seed)
        if rule is not None:
            why = (f"{vip} {protocol} {rule.first}" + (f"-{rule.last}" if rule.last != rule.first else "")
                   + f" affinity {rule.affinity}")
        elif b is not None:
            why = "no port rule matches: served by the owner of bucket 0 (unmatched: one-node)"
        else:
            why = "no port rule matches: dropped (unmatched: drop)"
        if b is None:
            return {"bucket": 0, "node_id": "", "generation": snap.table.generation, "draining_on": [],
                    "rule": why}
        draining = sorted(n for n, a in snap.applied.items() if b in expand(a.draining))
        return {"bucket": b, "node_id": snap.table.owners[b] or "", "generation": snap.table.generation,
                "draining_on": draining, "rule": why}

    def etcd_reachability(self) -> tuple[bool, float]:
        """Did a keepalive succeed recently? Peers ask this during an etcd outage."""
        age = time.monotonic() - self._last_keepalive_ok
        t = self.cfg.timing
        return age < 2 * t.keepalive_interval + self.cfg.etcd.timeout, age

    # ---- read side (status server) -------------------------------------

    def status(self) -> dict:
        snap = self.cache.snapshot()
        counts = snap.counts()
        return {
            "node_id": self.me,
            "cluster": self.prefix,
            "generation": snap.table.generation if snap.table else 0,
            "bucket_count": snap.settings.buckets if snap.settings else self.cfg.cluster.buckets,
            "members": [
                {"id": m.id, "weight": m.weight, "state": m.state, "addresses": list(m.addresses),
                 "version": m.version,
                 "applied_generation": snap.applied[m.id].generation if m.id in snap.applied else 0,
                 "buckets": counts.get(m.id, 0),
                 "draining_buckets": snap.applied[m.id].draining_buckets if m.id in snap.applied else 0,
                 "draining_connections": (snap.applied[m.id].draining_connections
                                          if m.id in snap.applied else 0),
                 "drain_requested": m.id in snap.drains, "reason": m.reason, "rules": m.rules}
                for m in sorted(snap.members.values(), key=lambda m: m.id)],
            "applied_generation": max(self.state.published_generation, 0),
            "owned_buckets": len(snap.table.owned_by(self.me)) if snap.table else 0,
            "accepting_buckets": len(self.state.accepting),
            "draining_buckets": len(self.state.draining),
            "fence_open": self.dp.fence_is_open(),
            "etcd_state": self.state.etcd_state,
            "last_cycle": self.state.last_sentence,
            "vips": list(self.cfg.cluster.vips),
        }

    def node_view(self, with_counters: bool = True) -> dict:
        """This node's own view (GetNode, metrics): state, buckets, kernel, etcd, checks."""
        snap = self.cache.snapshot()
        counters = []
        if with_counters:
            try:
                counters = [dataclasses.asdict(c) for c in self.dp.counters()]
            except DataPlaneError as exc:
                log.warning("cannot read nft counters node=%s reason=%s", self.me, exc)
        st = self.state
        return {
            "node_id": self.me,
            "state": st.node_state,
            "state_reason": st.state_reason,
            "generation": snap.table.generation if snap.table else 0,
            "applied_generation": max(st.published_generation, 0),
            "owned_buckets": len(snap.table.owned_by(self.me)) if snap.table else 0,
            "accepting_buckets": len(st.accepting),
            "draining_buckets": len(st.draining),
            "draining_connections": sum(st.conn_counts.get(b, 0) for b in st.draining),
            "accepting_ranges": bucket_ranges(st.accepting),
            "fence_open": self.dp.fence_is_open(),
            "etcd_state": st.etcd_state,
            "last_keepalive_age_s": (time.monotonic() - self._last_keepalive_ok
                                     if self._last_keepalive_ok else -1.0),
            "lease_id": f"{self.lease_id:x}" if self.lease_id else "",
            "counters": counters,
            "checks": [dataclasses.asdict(c) for c in self.health.statuses()],
            "module": self.cfg.module.name,
            "restarts_in_window": self.module.restarts_in_window(),
            "last_cycle": st.last_sentence,
            "vips": list(self.cfg.cluster.vips),
            "version": __version__,
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="farmd", description="nlbfarm node agent")
    ap.add_argument("--config", required=True, help="path to the YAML configuration")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ap.add_argument("--log-format", default="kv", choices=["kv", "json"])
    ap.add_argument("--check", action="store_true", help="validate the configuration and exit")
    args = ap.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"farmd: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"farmd: configuration {args.config} is valid")
        return 0

    from nlbfarm.node.status import ReadyTracker, read_token, serve_status  # grpc only once we run

    try:
        token = read_token(cfg.status.token_file) if cfg.status.token_file else None
    except ConfigError as exc:
        print(f"farmd: {exc}", file=sys.stderr)
        return 2
    if token is None:
        log.warning("status.token_file is not set: drain and undrain through the API are refused")
    try:
        agent = Agent(cfg)  # builds the etcd store: its TLS files are read here
    except ConfigError as exc:
        print(f"farmd: {exc}", file=sys.stderr)
        return 2
    agent.ready = ReadyTracker()

    def on_signal(signum, _frame):
        log.info("signal=%s: graceful stop", signal.Signals(signum).name)
        agent.stopping.set()
        agent.wake.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    servers = []
    rc = 0
    try:
        # Bind first: a busy port is a config error found before anything changes.
        servers = serve_status(agent, cfg.status.listen, cfg.status.peer_listen, token, agent.ready,
                               tls_cert_file=cfg.status.tls_cert_file, tls_key_file=cfg.status.tls_key_file,
                               tls_client_ca_file=cfg.status.tls_client_ca_file)
        if cfg.metrics.listen:
            agent.metrics.serve(cfg.metrics.listen)
        agent.start()
        if agent.lease_id is None:  # stopped before registering: nothing to undo
            log.info("stopped node=%s before joining", agent.me)
            return 0
        log.info("running node=%s vips=%s status=%s metrics=%s module=%s checks=%d", agent.me,
                 ",".join(cfg.cluster.vips), cfg.status.listen, cfg.metrics.listen or "off",
                 cfg.module.name, len(cfg.module.checks))
        agent.run_loop()
    except DuplicateMember as exc:
        log.error("refusing to start: %s", exc)
        print(f"farmd: {exc}", file=sys.stderr)
        rc = 3
    except ConfigError as exc:
        log.error("refusing to start: %s", exc)
        print(f"farmd: {exc}", file=sys.stderr)
        rc = 2
    except FarmError as exc:
        log.error("stopping on error: %s", exc)
        rc = 1
    finally:
        agent.stopping.set()
        if agent.lease_id is not None or agent.dp.current is not None:
            agent.shutdown()
        if agent.ready is not None:
            agent.ready.shutdown()
        for server in servers:
            server.stop(grace=0.5)
        agent.metrics.close()
    return rc


if __name__ == "__main__":
    sys.exit(main())
