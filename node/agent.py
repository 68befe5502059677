"""farmd: the node agent.

Threads and who decides what (Patroni's shape):

* the etcd watch thread only updates ``ClusterCache`` and wakes the loop;
* the keepalive thread only refreshes the lease, records when a refresh last
  succeeded, and wakes the loop;
* the gRPC status server only reads ``Agent.status()``;
* ONE reconcile loop (``Agent.cycle``) makes every decision: writing a new
  table, which buckets the kernel accepts, whether the fence stays open, what
  is published as applied. Each cycle returns a sentence that is logged when
  it changes and that tests assert on.
"""
from __future__ import annotations

import argparse
import logging
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass

from nlbfarm import __version__
from nlbfarm.config import Config, load_config
from nlbfarm.coordinator.cluster import (
    Applied, ClusterSettings, ClusterSnapshot, Member, applied_key, build_snapshot, cluster_key,
    member_key, table_key, TableRecord)
from nlbfarm.coordinator.handover import AcceptPlan, plan_accept, plan_table
from nlbfarm.coordinator.store import EtcdStore, LeaseExpired, Store
from nlbfarm.coordinator.table import bucket_ranges
from nlbfarm.errors import (
    ConfigError, DataPlaneError, DuplicateMember, FarmError, StoreError, StoreUnavailable)
from nlbfarm.logs import setup_logging
from nlbfarm.node.dataplane import DataPlane, DataPlaneSpec, cluster_mac_for
from nlbfarm.node.vip import Vip

log = logging.getLogger("nlbfarm.agent")

# Margin kept between the fence expiry and the earliest lease expiry, for
# scheduling jitter between reading the clock and the kernel taking the element.
FENCE_MARGIN_S = 0.2


class ClusterCache:
    """The agent's copy of every key under the cluster prefix, fed by the watch."""

    def __init__(self, prefix: str, wake: threading.Event):
        self.prefix = prefix
        self._wake = wake
        self._lock = threading.Lock()
        self._items: dict[str, tuple[bytes, int]] = {}
        self._revision = 0
        self._version = 0
        self._snapshot: ClusterSnapshot | None = None
        self._warned: set[str] = set()

    def reset(self, items: dict[str, tuple[bytes, int]], revision: int) -> None:
        with self._lock:
            self._items = dict(items)
            self._revision = revision
            self._version += 1
        self._wake.set()

    def on_event(self, ev) -> None:
        with self._lock:
            if ev.kind == "resync":
                self._items = {k: (kv.value, kv.mod_revision) for k, kv in ev.snapshot.items()}
                self._revision = max(self._revision, ev.mod_revision)
            elif ev.kind == "put":
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
    published: tuple[int, int] = (-1, -1)  # (generation, accepting) last written to applied/<me>

    @property
    def published_generation(self) -> int:
        return self.published[0]
    plan: AcceptPlan | None = None
    last_sentence: str = "starting"
    etcd_state: str = "connecting"


class Agent:
    def __init__(self, cfg: Config, store: Store | None = None, dataplane: DataPlane | None = None,
                 vip: Vip | None = None):
        self.cfg = cfg
        self.me = cfg.node.id
        self.prefix = cfg.key_prefix
        self.store = store or EtcdStore(list(cfg.etcd.endpoints), timeout=cfg.etcd.timeout,
                                        retry_deadline=cfg.etcd.retry_deadline)
        self.dp = dataplane or DataPlane()
        mac = cfg.cluster.cluster_mac
        self.cluster_mac = cluster_mac_for(cfg.cluster.vips[0]) if mac == "auto" else mac
        self.vip = vip or Vip(cfg.node.interface, cfg.cluster.vips, self.cluster_mac)
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.cache = ClusterCache(self.prefix, self.wake)
        self.state = LocalState()
        self.settings: ClusterSettings | None = None
        self.lease_id: int | None = None
        self.lease_lost = threading.Event()
        self._last_keepalive_ok = 0.0  # monotonic time the last successful refresh was SENT
        self._last_fence_refresh = 0.0
        self._watch = None
        self._keepalive_stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.leave_started: float | None = None

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

    def _ensure_settings(self) -> ClusterSettings:
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
        raise FarmError("stopped before etcd answered")

    def _register(self) -> None:
        sent = time.monotonic()
        lease = self.store.grant_lease(self.cfg.timing.lease_ttl).id
        member = Member(self.me, self.cfg.node.weight, "active", self.cfg.node.addresses, __version__)
        if not self.store.create(member_key(self.prefix, self.me), member.encode(), lease_id=lease):
            self.store.revoke_lease(lease)
            raise DuplicateMember(
                f"node id {self.me!r} is already registered in cluster {self.cfg.cluster.name!r} "
                f"by a live agent ({member_key(self.prefix, self.me)} exists); refusing to start "
                "so the running node is not disturbed")
        self.lease_id = lease
        self._last_keepalive_ok = sent
        self.lease_lost.clear()
        self.state.published = (-1, -1)
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
                self._register()
                break
            except StoreUnavailable as exc:
                # etcd went away between the probe and registration: same policy as at start.
                log.warning("etcd unreachable during registration retry_in=%.1fs reason=%s", delay, exc)
                self.stopping.wait(delay)
                delay = min(delay * 2, 10.0)
        base = self._base_spec(fence_open=True)
        # Order matters: the ARP rewrite must be in force before the VIP exists,
        # or a client could learn this node's own MAC for the VIP.
        self.dp.apply(base)
        self.vip.up()
        items, rev = self.store.get_prefix(self.prefix)
        self.cache.reset({k: (kv.value, kv.mod_revision) for k, kv in items.items()}, rev)
        self._watch = self.store.watch_prefix(self.prefix, self.cache.on_event, start_revision=rev + 1)
        t = threading.Thread(target=self._keepalive_loop, name="keepalive", daemon=True)
        t.start()
        self._threads.append(t)

    def _base_spec(self, fence_open: bool) -> DataPlaneSpec:
        return DataPlaneSpec(interface=self.cfg.node.interface, vips=self.cfg.cluster.vips,
                             cluster_mac=self.cluster_mac, buckets=self.settings.buckets,
                             seed=self.settings.seed, accepting=bucket_ranges(self.state.accepting),
                             fence_open=fence_open, fence_timeout=self.cfg.timing.fence_timeout,
                             table=self.cfg.nft.table)

    # ---- keepalive thread: only refreshes and records ------------------

    def _keepalive_loop(self) -> None:
        interval = self.cfg.timing.keepalive_interval
        while not self._keepalive_stop.wait(interval):
            lease = self.lease_id
            if lease is None or self.lease_lost.is_set():
                continue
            sent = time.monotonic()
            try:
                self.store.refresh_lease(lease)
                self._last_keepalive_ok = sent
                self.state.etcd_state = "connected"
            except LeaseExpired:
                log.error("lease expired node=%s lease=%x: peers may have taken over; re-registering",
                          self.me, lease)
                self.lease_lost.set()
            except StoreError as exc:
                self.state.etcd_state = "retrying"
                log.warning("keepalive failed node=%s reason=%s", self.me, exc)
            self.wake.set()

    # ---- the reconcile loop ----------------------------------------------

    def fence_ok(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        t = self.cfg.timing
        return (not self.lease_lost.is_set()
                and now - self._last_keepalive_ok < t.lease_ttl - t.fence_timeout - FENCE_MARGIN_S)

    def cycle(self) -> str:
        """One reconcile step. Returns the sentence describing what it did or waits for."""
        if self.lease_lost.is_set():
            return self._recover_lease()
        snap = self.cache.snapshot()
        update = plan_table(snap)
        if update is not None:
            ok = self.store.compare_and_swap(
                table_key(self.prefix), TableRecord.encode(update.generation, update.owners),
                update.expected_revision)
            if ok:
                return (f"wrote table generation {update.generation}: moved {update.moved} "
                        f"buckets ({update.reason})")
            return f"table generation {update.generation} was written by a peer first"
        fence_open = self.fence_ok()
        plan = plan_accept(self.me, snap, self.state.accepting)
        if not fence_open:
            # Without a fresh keepalive this node must not rely on its buckets:
            # close the fence now rather than wait for the element to expire.
            plan = AcceptPlan(plan.generation, plan.target, plan.accepting & self.state.accepting,
                              plan.waiting_for)
        spec = self._base_spec(fence_open).with_accepting(bucket_ranges(plan.accepting))
        now = time.monotonic()
        if self.dp.apply(spec):
            self.state.accepting = plan.accepting
            self._last_fence_refresh = now
        elif fence_open and now - self._last_fence_refresh >= self.cfg.timing.keepalive_interval / 2:
            self.dp.refresh_fence()
            self._last_fence_refresh = now
        self.state.plan = plan
        if not fence_open:
            return (f"fence closed: no successful keepalive for {now - self._last_keepalive_ok:.1f} s; "
                    "dropping all VIP traffic")
        g = plan.generation
        report = (g, len(self.state.accepting))
        if g and self.state.published != report:
            # Invariant I: the kernel now accepts a subset of T_g for this node.
            self.store.put(applied_key(self.prefix, self.me), Applied(*report).encode(),
                           lease_id=self.lease_id)
            self.state.published = report
        if g == 0:
            return "waiting for the first table"
        if plan.complete:
            return f"generation {g} applied: accepting {len(plan.accepting)} of {self.settings.buckets} buckets"
        return (f"generation {g}: accepting {len(plan.accepting)} of {len(plan.target)} owned buckets, "
                f"waiting for {','.join(plan.waiting_for)} to apply generation {g}")

    def _recover_lease(self) -> str:
        # Peers may already own our buckets: stop accepting anything, then rejoin.
        self.dp.apply(self._base_spec(fence_open=False).with_accepting(()))
        self.state.accepting = frozenset()
        try:
            self._register()
        except DuplicateMember:
            return "lease lost; waiting for the old member key to expire before re-registering"
        return "lease lost: released every bucket and registered again"

    def run_loop(self) -> None:
        while True:
            self.wake.wait(self.cfg.timing.keepalive_interval)
            self.wake.clear()
            if self.stopping.is_set() and self.leave_started is None:
                self.leave_started = time.monotonic()
                self._announce_leaving()
            try:
                sentence = self.cycle()
            except (StoreError, DataPlaneError) as exc:
                sentence = f"cycle failed: {exc}"
            if sentence != self.state.last_sentence:
                log.info("cycle node=%s result=%r", self.me, sentence)
                self.state.last_sentence = sentence
            if self.leave_started is not None and self._leave_done():
                return

    # ---- graceful leave ----------------------------------------------------

    def _announce_leaving(self) -> None:
        log.info("leaving node=%s: handing over buckets before removing the VIP", self.me)
        member = Member(self.me, self.cfg.node.weight, "leaving", self.cfg.node.addresses, __version__)
        try:
            self.store.put(member_key(self.prefix, self.me), member.encode(), lease_id=self.lease_id)
        except StoreError as exc:
            log.warning("could not announce leave node=%s reason=%s", self.me, exc)

    def _leave_done(self) -> bool:
        if time.monotonic() - self.leave_started > self.cfg.timing.leave_timeout:
            log.warning("leave timeout node=%s after %.0fs; leaving anyway", self.me,
                        self.cfg.timing.leave_timeout)
            return True
        snap = self.cache.snapshot()
        if snap.table is None:
            return True
        g = snap.table.generation
        if snap.table.owned_by(self.me) or self.state.accepting or self.state.published_generation != g:
            return False
        # Peers have applied the table without us: they now accept our old buckets.
        peers = snap.live() - {self.me}
        return all((a := snap.applied.get(p)) is not None and a.generation >= g for p in peers)

    def shutdown(self) -> None:
        """Revoke the lease, remove the VIP, then the rules (the reverse of start)."""
        self._keepalive_stop.set()
        if self._watch is not None:
            self._watch.cancel()
        if self.lease_id is not None:
            try:
                self.store.revoke_lease(self.lease_id)
            except StoreError as exc:
                log.warning("lease revoke failed node=%s reason=%s (it expires by itself)", self.me, exc)
        self.lease_id = None
        try:
            self.vip.down()
        finally:
            self.dp.teardown(self.cfg.nft.table)
        self.store.close()
        log.info("stopped node=%s", self.me)

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
                 "buckets": counts.get(m.id, 0)}
                for m in sorted(snap.members.values(), key=lambda m: m.id)],
            "applied_generation": max(self.state.published_generation, 0),
            "owned_buckets": len(snap.table.owned_by(self.me)) if snap.table else 0,
            "accepting_buckets": len(self.state.accepting),
            "fence_open": bool(self.dp.current and self.dp.current.fence_open),
            "etcd_state": self.state.etcd_state,
            "last_cycle": self.state.last_sentence,
            "vips": list(self.cfg.cluster.vips),
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

    agent = Agent(cfg)

    def on_signal(signum, _frame):
        log.info("signal=%s: graceful stop", signal.Signals(signum).name)
        agent.stopping.set()
        agent.wake.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    from nlbfarm.node.status import serve_status  # grpc is only needed once we run

    server = None
    try:
        agent.start()
        if agent.lease_id is None:  # stopped before registering: nothing to undo
            log.info("stopped node=%s before joining", agent.me)
            return 0
        server = serve_status(agent, cfg.status.listen)
        log.info("running node=%s vips=%s status=%s", agent.me, ",".join(cfg.cluster.vips),
                 cfg.status.listen)
        agent.run_loop()
    except DuplicateMember as exc:
        log.error("refusing to start: %s", exc)
        print(f"farmd: {exc}", file=sys.stderr)
        return 3
    except ConfigError as exc:
        log.error("refusing to start: %s", exc)
        print(f"farmd: {exc}", file=sys.stderr)
        return 2
    except FarmError as exc:
        log.error("stopping on error: %s", exc)
        agent.stopping.set()
        if agent.lease_id is not None:
            agent.shutdown()
        return 1
    finally:
        if server is not None:
            server.stop(grace=0.5)
    agent.stopping.set()
    agent.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
