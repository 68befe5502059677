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
import secrets
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
    published: tuple[int, int] = (-1, -1)  # (generation, accepting) last written to applied/<me>
    plan: AcceptPlan | None = None
    last_sentence: str = "starting"
    etcd_state: str = "connecting"

    @property
    def published_generation(self) -> int:
        return self.published[0]


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

    def _member(self, state: str) -> Member:
        return Member(self.me, self.cfg.node.weight, state, self.cfg.node.addresses, __version__,
                      self.instance)

    def _register(self) -> None:
        """Create members/<me> bound to a new lease, then re-read the cluster.

        The re-read matters after a lost lease: the cache may still show an old
        table in which this node owned buckets that peers have since taken.
        """
        key = member_key(self.prefix, self.me)
        sent = time.monotonic()
        lease = self.store.grant_lease(self.cfg.timing.lease_ttl).id
        try:
            created = self.store.create(key, self._member("active").encode(), lease_id=lease)
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
                    created = self.store.create(key, self._member("active").encode(), lease_id=lease)
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
        t = threading.Thread(target=self._keepalive_loop, name="keepalive", daemon=True)
        t.start()
        self._threads.append(t)

    def _base_spec(self, fence_open: bool) -> DataPlaneSpec:
        return DataPlaneSpec(interface=self.cfg.node.interface, vips=self.cfg.cluster.vips,
                             cluster_mac=self.cluster_mac, buckets=self.settings.buckets,
                             seed=self.settings.seed, accepting=bucket_ranges(self.state.accepting),
                             fence_open=fence_open, fence_timeout=self.cfg.timing.fence_timeout,
                             table=self.cfg.nft.table)

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
                self._last_keepalive_ok = sent
                self.state.etcd_state = "connected"
            except LeaseExpired:
                log.error("lease expired node=%s lease=%x: peers may have taken over; re-registering",
                          self.me, lease)
                self.lease_lost.set()
            except StoreError as exc:
                self.state.etcd_state = "retrying"
                log.warning("keepalive failed node=%s reason=%s", self.me, exc)
            try:
                self.dp.refresh_fence(self.fence_ok)
            except DataPlaneError as exc:
                log.error("fence refresh failed node=%s reason=%s; rebuilding the ruleset", self.me, exc)
            self.wake.set()

    # ---- the reconcile loop ----------------------------------------------

    def fence_ok(self, now: float | None = None) -> bool:
        """May the fence be extended now? (step 3 of the handover argument)"""
        now = time.monotonic() if now is None else now
        t = self.cfg.timing
        return (not self.lease_lost.is_set()
                and now - self._last_keepalive_ok < t.lease_ttl - t.fence_timeout - FENCE_MARGIN_S)

    def cycle(self) -> str:
        """One reconcile step. Returns the sentence describing what it did or waits for."""
        if self.lease_lost.is_set():
            return self._recover_lease()
        snap = self.cache.snapshot()
        leaving = self.leave_started is not None
        if leaving:
            mine = snap.members.get(self.me)
            if mine is not None and mine.state != "leaving":
                self.store.put(member_key(self.prefix, self.me), self._member("leaving").encode(),
                               lease_id=self.lease_id)
                return "announced leaving: peers will take over this node's buckets"
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
            # close the fence now rather than wait for the element to expire,
            # and take nothing new.
            plan = AcceptPlan(plan.generation, plan.target, plan.accepting & self.state.accepting,
                              plan.waiting_for)
        spec = self._base_spec(fence_open).with_accepting(bucket_ranges(plan.accepting))
        if self.dp.apply(spec):
            self.state.accepting = plan.accepting
        self.state.plan = plan
        if not fence_open:
            return (f"fence closed: no successful keepalive for "
                    f"{time.monotonic() - self._last_keepalive_ok:.1f} s; dropping all VIP traffic")
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
        # Peers may already own our buckets: stop accepting anything first.
        self.dp.apply(self._base_spec(fence_open=False).with_accepting(()))
        self.state.accepting = frozenset()
        if self.leave_started is not None:
            return "lease lost while leaving: nothing left to hand over"
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
        """Stop serving, remove the VIP, then the rules, then the lease (never the other way round)."""
        self._keepalive_stop.set()
        if self.dp.current is not None and self.settings is not None:
            try:
                self.dp.apply(self._base_spec(fence_open=False).with_accepting(()))
                self.state.accepting = frozenset()
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
            "fence_open": self.dp.fence_is_open(),
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

    from nlbfarm.node.status import serve_status  # grpc is only needed once we run

    agent = Agent(cfg)

    def on_signal(signum, _frame):
        log.info("signal=%s: graceful stop", signal.Signals(signum).name)
        agent.stopping.set()
        agent.wake.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    server = None
    rc = 0
    try:
        # Bind first: a busy port is a config error found before anything changes.
        server = serve_status(agent, cfg.status.listen)
        agent.start()
        if agent.lease_id is None:  # stopped before registering: nothing to undo
            log.info("stopped node=%s before joining", agent.me)
            return 0
        log.info("running node=%s vips=%s status=%s", agent.me, ",".join(cfg.cluster.vips),
                 cfg.status.listen)
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
        if server is not None:
            server.stop(grace=0.5)
    return rc


if __name__ == "__main__":
    sys.exit(main())
