"""farmd: the node agent. Wiring, the run loop, and the execution of plans.

Who owns what (one owner for each piece of mutable state):

* the **loop** (``Agent.cycle``) owns ``LocalState``: it gathers observations,
  asks the pure ``node.decide.decide`` for a ``Plan``, and executes it (etcd
  writes through ``FarmStore``'s verbs, one nft transaction, the applied
  report). Each cycle returns the plan's sentence, rendered from its reason;
* the **lease keeper** (``node/lease.py``) owns the lease: keepalives, the
  fence element's life, rule E's peer probes. Others read its ``LeaseView``;
* the **module supervisor** (``node/supervisor.py``) owns the application:
  its commands (on its own executor), health checks and restart protection;
* the etcd **watch** thread only updates ``ClusterCache`` and wakes the loop;
* the **liveness** watcher (``node/liveness.py``) holds idle connections to
  the peers' listeners and retires a peer whose agent it certified dead;
* the gRPC status server and the metrics endpoint only read, apart from
  drain/undrain requests, which are written to etcd like any operator's.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import secrets
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import replace

from nlbfarm import __version__
from nlbfarm.config import Config, load_config
from nlbfarm.coordinator.cluster import MAX_FENCE_MS, ClusterSettings, ClusterSnapshot, Member, expand
from nlbfarm.coordinator.farm import ClusterCache, FarmStore
from nlbfarm.coordinator.rules import bucket_for, digest as rules_digest, match as match_rule
from nlbfarm.coordinator.rules import resolve as resolve_rules
from nlbfarm.coordinator.etcd import EtcdStore
from nlbfarm.coordinator.store import LeaseExpired, Store
from nlbfarm.coordinator.table import bucket_ranges
from nlbfarm.errors import (
    ConfigError, DataPlaneError, DuplicateMember, FarmError, StoreError, StoreUnavailable)
from nlbfarm.logs import setup_logging
from nlbfarm.node.conntrack import live_connections_by_bucket
from nlbfarm.node import iplib
from nlbfarm.node.dataplane import DataPlane, DataPlaneSpec, cluster_mac_for
from nlbfarm.node.decide import (
    FENCE_MARGIN_S, LocalState, Observations, Plan, Reason, Timing, decide, own_record_present,
    remember_table)
from nlbfarm.node.events import EventBus
from nlbfarm.node.handoff import (
    HandoffState, adoption_refusal, boot_id, continuity_refusal, handoff_refusal, handoff_until,
    local_after_adoption, predecessor_alive, process_start, read_state, remove_state, state_path, write_state)
from nlbfarm.node.lease import LeaseKeeper
from nlbfarm.node.liveness import Back, BackChannel, LivenessWatch, Verdict, Watched, ip_endpoint, judge
from nlbfarm.node.metrics import AgentMetrics
from nlbfarm.node.peers import Peer, PeerProbe, foreign_answer, peer_tls
from nlbfarm.node.supervisor import ModuleSupervisor
from nlbfarm.node.vip import Vip

__all__ = ["Agent", "ClusterCache", "FENCE_MARGIN_S", "main"]

log = logging.getLogger("nlbfarm.agent")

# How often a node with draining buckets counts its connections in conntrack.
CONNTRACK_SCAN_S = 1.0


class Agent:
    def __init__(self, cfg: Config, store: Store | None = None, dataplane: DataPlane | None = None,
                 vip: Vip | None = None):
        self.cfg = cfg
        self.me = cfg.node.id
        self.prefix = cfg.key_prefix
        self.timing = Timing.from_config(cfg)
        self.store = store or EtcdStore.from_config(cfg.etcd)  # endpoints, timing, TLS, credentials
        self.farm = FarmStore(self.store, self.prefix)
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
        self.local = LocalState()
        self.last_sentence = "starting"
        self.settings: ClusterSettings | None = None
        self.conn_counts: Counter = Counter()
        self.conn_scan_at = 0.0
        self.probe = PeerProbe(self.me, timeout=self.timing.probe_timeout, tls=peer_tls(cfg.status),
                               instance=self.instance)
        self.keeper = LeaseKeeper(self.me, self.timing, self.farm, self.dp, link_up=self._link_up,
                                  member_present=self._member_present, peers=self._peers,
                                  probe=self.probe, wake=self.wake)
        self.liveness = self._liveness_watch()
        self._seen_watched: frozenset[Watched] = frozenset()
        self._watch = None
        self._own_missing_since: float | None = None
        self.leave_started: float | None = None
        self.events = EventBus()
        self.metrics = AgentMetrics(self)
        self.ready = None  # the gRPC health service's readiness, set by main()
        self.supervisor = ModuleSupervisor(
            self.me, cfg.module, cfg.timing.leave_timeout,
            env={"NLBFARM_NODE": self.me, "NLBFARM_CLUSTER": cfg.cluster.name},
            wake=self.wake, events=self.events, stopping=self.stopping)
        self._seen_members: dict[str, str] | None = None
        self._seen_generation = 0
        self._change_base_generation = 0
        # Hitless restarts (node/handoff.py): where the state for a successor
        # goes, what was last written there, and what this process adopted.
        self.state_path = (state_path(cfg.node.state_dir, cfg.cluster.name, self.me)
                           if cfg.node.state_dir else None)
        self._saved_state: HandoffState | None = None
        self.adopted: HandoffState | None = None
        self._adopted_fence_ms = 0  # the fence figure the adoption's swap published
        self._adopted_until = 0.0   # by when the adopted element has surely expired
        self.restart_requested = threading.Event()
        self.handed_off = False
        self._pid_start = process_start(os.getpid()) or 0

    @property
    def lease_id(self) -> int | None:
        v = self.keeper.view()
        return v.lease_id if v.registered else None

    # ---- what the keeper reads ------------------------------------------------

    def _link_up(self) -> bool:
        return self.vip.link_up()

    def _member_present(self) -> bool:
        """Called by the fence thread, the one owner of ``_own_missing_since``.

        Our records vanish when our leases expire or an operator revokes both:
        the fence then closes within one refresh, not at the next keepalive.
        With only applied/ left, it closes after the own-record grace even if
        the loop is too slow to write the member record again.
        """
        snap = self.cache.snapshot()
        if self.me in snap.members:
            self._own_missing_since = None
        elif self._own_missing_since is None:
            self._own_missing_since = time.monotonic()
        return own_record_present(self.me, snap, self._own_missing_since, time.monotonic(), self.timing)

    def _peers(self) -> list[Peer]:
        """Everyone to ask under rule E: every other live node, with what its record says."""
        snap = self.cache.snapshot()
        peers = [Peer(m.id, m.instance, m.peer) for m in snap.members.values() if m.id != self.me]
        peers += [Peer(n, "", "") for n in sorted(snap.orphans() - {self.me})]
        return peers

    # ---- start-up -------------------------------------------------------

    def _wait_for_etcd(self) -> None:
        """Retry with backoff until etcd answers; at start there is nothing to protect yet."""
        delay = 0.5
        while not self.stopping.is_set():
            try:
                self.farm.settings()
                return
            except StoreError as exc:
                log.warning("etcd unreachable endpoints=%s retry_in=%.1fs reason=%s",
                            ",".join(self.cfg.etcd.endpoints), delay, exc)
                self.stopping.wait(delay)
                delay = min(delay * 2, 10.0)

    def _ensure_settings(self) -> ClusterSettings | None:
        proposal = ClusterSettings(seed=random.SystemRandom().getrandbits(32),
                                   buckets=self.cfg.cluster.buckets)
        if self.farm.propose_settings(proposal):
            log.info("created cluster settings prefix=%s buckets=%d", self.prefix, proposal.buckets)
        while not self.stopping.is_set():
            settings, why = self.farm.settings()
            if settings is None and why == "missing":
                self.farm.propose_settings(proposal)
                continue
            if settings is None:
                log.warning("cluster settings unusable prefix=%s reason=%s retry_in=5s", self.prefix, why)
                self.stopping.wait(5)
                continue
            if settings.buckets != self.cfg.cluster.buckets:
                raise ConfigError(
                    f"cluster.buckets is {self.cfg.cluster.buckets} but cluster {self.cfg.cluster.name!r} "
                    f"in etcd uses {settings.buckets}; every node must use the same bucket count")
            return settings
        return None

    @property
    def fence_ms(self) -> int:
        """The longest fence element this process writes outside a planned restart."""
        return int(math.ceil(self.cfg.timing.fence_timeout * 1000))

    def _member(self, state: str, reason: str = "", handing_over: bool = False, fence_ms: int = 0) -> Member:
        if self._adopted_fence_ms and time.monotonic() > self._adopted_until:
            self._adopted_fence_ms = 0  # the adopted element has surely expired by now
        return Member(self.me, self.cfg.node.weight, state, self.cfg.node.addresses, __version__,
                      self.instance, self.cfg.status.peer_address, reason, self.rules_digest,
                      handing_over=handing_over, fence_ms=max(fence_ms, self._adopted_fence_ms, self.fence_ms))

    def _desired_state(self, snap: ClusterSnapshot | None) -> tuple[str, str]:
        leaving = self.leave_started is not None
        if not leaving and not self._link_up():
            # Withdraw through the table: the fence is closed, so the node must
            # not keep buckets that peers could serve.
            return "failed", f"link {self.cfg.node.interface} is down"
        return self.supervisor.desired_state(leaving, snap is not None and self.me in snap.drains)

    def _register(self) -> None:
        """Create members/<me> bound to a new lease, then re-read the cluster.

        The re-read matters after a lost lease: the cache may still show an old
        table in which this node owned buckets that peers have since taken.
        """
        sent = time.monotonic()
        old = self.keeper.view()
        lease = self.farm.grant(self.cfg.timing.lease_ttl).id
        try:
            applied_lease = self.farm.grant(self.cfg.timing.lease_ttl).id
        except BaseException:
            self._revoke_quietly(lease)
            raise
        first, reason = self._desired_state(None)
        try:
            created = self.farm.register(self._member(first, reason), lease)
            if not created:
                kv, theirs = self.farm.member_record(self.me)
                if theirs is not None and theirs.instance == self.instance:
                    # An earlier attempt of this very process registered, but
                    # its reply was lost: retire that lease and register again.
                    self.farm.revoke(kv.lease)
                    created = self.farm.register(self._member(first, reason), lease)
            if not created:
                raise DuplicateMember(
                    f"node id {self.me!r} is already registered in cluster {self.cfg.cluster.name!r} "
                    f"by a live agent ({self.prefix}/members/{self.me} exists); refusing to start so the "
                    "running node is not disturbed")
            items, rev = self.farm.read_all()
        except BaseException:
            self._revoke_quietly(lease, applied_lease)
            raise
        self.cache.reset(items, rev)
        self.keeper.adopt(lease, applied_lease, sent)
        if old.registered:  # a lost registration: what is left of it goes
            self._revoke_quietly(old.lease_id, old.applied_lease)
        # Remember the table read here: a newer one may reach the first cycle
        # before it, and without it the previous owner of every bucket would be
        # unknown (decide() would then hold them all for the acquire grace).
        self.local = remember_table(replace(self.local, published=None, published_revision=0),
                                    self.cache.snapshot().table, time.monotonic(), self.timing.table_memory)
        log.info("registered node=%s lease=%x ttl=%ds weight=%d", self.me, lease,
                 self.cfg.timing.lease_ttl, self.cfg.node.weight)

    # ---- hitless restarts (node/handoff.py) ---------------------------------

    def _adopt(self) -> bool:
        """Continue a predecessor process's registration, if etcd still shows it as that process's.

        True: the leases, the member record (now naming this process) and the
        loop's state are adopted; start() then re-applies the predecessor's
        ruleset keeping its fence element. False: register anew (after
        retiring a dead predecessor's registration whose kernel state is stale).
        Raises DuplicateMember if the predecessor still runs.
        """
        if not self.state_path:
            return False
        state, why = read_state(self.state_path)
        items, rev = self.farm.read_all()
        kv, record = self.farm.member_record(self.me)
        refusal = adoption_refusal(state, self.me, self.prefix, boot_id(), kv.lease if kv else None, record)
        if refusal is not None:
            if state is not None or why != refusal.value:
                log.info("not adopting the previous agent's lease node=%s reason=%r", self.me,
                         why or refusal.value)
            return False
        if predecessor_alive(state):
            raise DuplicateMember(
                f"node id {self.me!r} is served by another farmd still running (pid {state.pid}); "
                "refusing to start so the running node is not disturbed")
        table, interface = self.cfg.nft.table, self.cfg.node.interface
        left = self.dp.adopt_fence(table, interface) if (table, interface) == (state.table, state.interface) \
            else 0.0
        lapsed = continuity_refusal(state, left, rev)
        if lapsed is not None:
            # The predecessor is dead and its fence closed by itself (or its
            # view predates etcd's): its lease ends by itself. Not revoked:
            # etcd's table may still name this node as the owner of buckets
            # that peers serve now (after a restore), and only the table
            # written once the record is gone is safe to join.
            log.warning("not adopting the previous agent's lease node=%s reason=%r: registering anew once "
                        "its lease ends", self.me, lapsed.value)
            self.dp.close_fence_of(state.table, state.interface)
            self._wait_for_record_gone(state)
            return False
        sent = time.monotonic()
        try:
            self.farm.refresh_all((state.lease_id, state.applied_lease), deadline=self.timing.late_after)
        except LeaseExpired:
            log.info("not adopting the previous agent's lease node=%s reason=%r", self.me,
                     "the old lease expired before the successor renewed it")
            self.dp.close_fence_of(table, interface)
            return False
        # The record says how long the element in the kernel may live: a
        # planned restart's is longer than fence_timeout until it is rewritten.
        long_ms = int(math.ceil(left * 1000)) + 1
        if not self.farm.swap_member(self._member(record.state, record.reason, fence_ms=long_ms),
                                     state.lease_id, kv.mod_revision):
            # Whoever changed the record owns what happens next; our kernel
            # must not serve on the predecessor's element meanwhile.
            log.warning("not adopting the previous agent's lease node=%s reason=%r", self.me,
                        "the member record changed before the successor swapped itself in")
            self.dp.close_fence_of(table, interface)
            return False
        # From the swap on, no peer can revoke or certify away the record the
        # predecessor had: both are conditioned on it. The watch from rev + 1
        # delivers the swap itself.
        self.cache.reset(items, rev)
        self.keeper.adopt(state.lease_id, state.applied_lease, sent, acquire_after=state.acquire_after)
        self._adopted_fence_ms = long_ms
        self._adopted_until = time.monotonic() + long_ms / 1000
        self.local = remember_table(local_after_adoption(state, record.state, record.reason),
                                    self.cache.snapshot().table, time.monotonic(), self.timing.table_memory)
        self.adopted = state
        log.info("adopted the previous agent's lease node=%s lease=%x previous_instance=%s planned=%s "
                 "accepting=%d element_left=%.2fs", self.me, state.lease_id, state.instance,
                 "yes" if state.handing_over_until else "no", len(self.local.accepting), left)
        self.events.publish("adopted", self.me, f"{self.me} adopted lease {state.lease_id:x} from agent "
                            f"{state.instance}", planned=bool(state.handing_over_until))
        return True

    def _shorten_adopted_fence(self) -> None:
        """After adopting a planned restart's long element: rewrite it to at most fence_timeout
        (the fence thread's own refresh), then say so in the record.

        In this order: a peer that certifies this process dead in between
        still waits for the longer figure the swap wrote.
        """
        if self._adopted_fence_ms <= self.fence_ms:
            return
        try:
            # Only a write that went in replaced the long element (a failed
            # one forgets fence_expires_at but not the kernel's element).
            rewritten = self.dp.refresh_fence(self.keeper.fence_deadline()[0])
        except DataPlaneError:
            rewritten = False
        if not rewritten or self.dp.fence_expires_at - time.monotonic() > self.cfg.timing.fence_timeout:
            log.warning("could not shorten the adopted fence element node=%s fence_ms=%d: peers keep waiting "
                        "that long before certifying this agent dead", self.me, self._adopted_fence_ms)
            return
        try:
            kv, record = self.farm.member_record(self.me)
            if record is None or record.instance != self.instance:
                return
            # A CAS: a state change the loop wrote meanwhile is not overwritten.
            normal = replace(self._member(record.state, record.reason), fence_ms=self.fence_ms)
            if not self.farm.swap_member(normal, kv.lease, kv.mod_revision):
                return  # not published: keep saying the longer figure
        except StoreError as exc:
            log.warning("could not publish the fence figure node=%s reason=%s", self.me, exc)
            return
        self._adopted_fence_ms = 0

    # ---- certificates of death (node/liveness.py) -------------------------------

    def _liveness_watch(self) -> LivenessWatch:
        """The watcher, with rule 5's evidence from this node's own peer listener.

        Without a peer listener no peer's agent connects here, so this node
        certifies nobody (every verdict is UNCORROBORATED).
        """
        listen = self.cfg.status.peer_listen or ""
        port = listen.rpartition(":")[2]
        back = BackChannel(int(port)).open_from if port.isdigit() else (lambda ip: False)
        own = ip_endpoint(self.cfg.status.peer_address)
        return LivenessWatch(self._watched_peers, self._identify_peer, self.retire_dead, back,
                             source=own[0] if own else None)

    def _watched_peers(self, snap: ClusterSnapshot | None = None) -> list[Watched]:
        snap = snap if snap is not None else self.cache.snapshot()
        return [Watched(m.id, m.instance, m.peer) for m in snap.members.values()
                if m.id != self.me and m.peer and m.instance and m.fence_ms and not m.handing_over]

    def _identify_peer(self, peer: Watched) -> bool:
        answer = self.probe.ask(peer.id, peer.addr)
        return answer is not None and foreign_answer(
            self.me, self.instance, Peer(peer.id, peer.instance, peer.addr), answer) is None

    def retire_dead(self, peer: Watched, refused_at: float, back: Back,
                    back_gone_at: float | None = None) -> tuple[Verdict, float]:
        """The liveness watcher's certificate: delete a dead peer's records once its fence has closed.

        Rules 1-6 of node/liveness.py, on a fresh read of both records.
        """
        now, ft = time.monotonic(), self.cfg.timing.fence_timeout
        # The cached record first: while the certificate waits, etcd is not asked.
        verdict, due = judge(self.cache.snapshot().members.get(peer.id), peer.instance, True, refused_at, now, ft,
                             back, back_gone_at)
        if verdict is Verdict.STILL_CONNECTED:
            log.warning("peer lives peer=%s addr=%s: its listener refuses, but its agent's own connection to "
                        "this node is open: it lives, not retired (does a firewall reject the peer port? filter "
                        "it with drop)", peer.id, peer.addr)
        if verdict is not Verdict.DEAD:
            return verdict, due
        try:
            kv, record = self.farm.member_record(peer.id)
            verdict, due = judge(record, peer.instance, True, refused_at, now, ft, back, back_gone_at)
            if verdict is not Verdict.DEAD:
                return verdict, due
            applied = self.farm.applied_record(peer.id)
            if not self.farm.retire_dead(peer.id, kv.mod_revision, applied.mod_revision if applied else 0,
                                         deadline=self.timing.late_after):
                return Verdict.OTHER_INSTANCE, 0.0  # changed meanwhile: judged again on the next refusal
            # Nothing may use the leases now: if the node lives after all, its
            # next keepalive finds them gone and it starts from nothing.
            self._revoke_quietly(kv.lease, applied.lease if applied else 0)
        except StoreError as exc:
            log.warning("cannot retire dead peer yet peer=%s reason=%s", peer.id, exc)
            return Verdict.WAIT, now + 0.5
        took = time.monotonic() - refused_at
        log.warning("retired peer node=%s instance=%s refused_ago=%.2fs: its listener refused and its fence "
                    "has closed", peer.id, peer.instance, took)
        self.events.publish("peer_retired", peer.id, f"{self.me} retired {peer.id}: its agent died "
                            f"({took:.2f} s after its listener refused)")
        return Verdict.DEAD, due

    def _wait_for_record_gone(self, state: HandoffState) -> None:
        """Until the predecessor's member record expires (at most its lease TTL and a keepalive)."""
        deadline = time.monotonic() + self.cfg.timing.lease_ttl + 2 * self.timing.keepalive_interval + 1.0
        while time.monotonic() < deadline and not self.stopping.is_set():
            kv, record = self.farm.member_record(self.me)
            if kv is None or record is None or record.instance != state.instance:
                return
            self.stopping.wait(0.2)

    def _handoff_state(self, spec: DataPlaneSpec, handing_over_until: float = 0.0) -> HandoffState:
        v = self.keeper.view()
        return HandoffState(
            node_id=self.me, prefix=self.prefix, boot_id=boot_id(), instance=self.instance, pid=os.getpid(),
            pid_start=self._pid_start, revision=self.cache.revision,
            lease_id=v.lease_id, applied_lease=v.applied_lease, table=spec.table, interface=spec.interface,
            accepting=spec.accepting, draining=spec.draining, guarded=spec.guarded,
            drains=self.local.draining, acquire_after=v.acquire_after,
            checks=self.supervisor.health.verdicts(), handing_over_until=handing_over_until)

    def _save_state(self, spec: DataPlaneSpec, handing_over_until: float = 0.0) -> None:
        """Keep the state file current. Raises DataPlaneError if it cannot be written or removed:
        a successor must never adopt a kernel that accepts more than this one does."""
        if not self.state_path or not self.keeper.view().registered:
            return
        state = self._handoff_state(spec, handing_over_until)
        # The revision alone changing is no reason to write: the one last
        # written is still a lower bound of what this process has read.
        if self._saved_state is not None and replace(state, revision=0) == replace(self._saved_state, revision=0):
            return
        try:
            write_state(self.state_path, state)
            self._saved_state = state
        except OSError as exc:
            self._saved_state = None
            try:
                if os.path.exists(self.state_path):
                    os.unlink(self.state_path)
            except OSError as exc2:
                raise DataPlaneError(f"cannot write or remove the state file {self.state_path}: {exc}; "
                                     f"{exc2}") from exc
            log.warning("cannot write the state file path=%s reason=%s: a restart will not be hitless",
                        self.state_path, exc)

    def _hand_off(self) -> str:
        """SIGUSR2: stop so that a successor process adopts everything, with no bucket moving.

        Returns a sentence. ``self.handed_off`` says whether it happened; if
        not, this process goes on as if nothing was asked.
        """
        snap = self.cache.snapshot()
        view, now = self.keeper.view(), time.monotonic()
        refusal = handoff_refusal(view, self.timing, now, leaving=self.leave_started is not None,
                                  ruleset=self.dp.current is not None and self.dp.current.fence_open,
                                  link_up=self._link_up(), member_present=self.me in snap.members)
        why = refusal.value if refusal else ""
        if not why:
            try:
                kv, record = self.farm.member_record(self.me)
                if record is None or record.instance != self.instance or kv.lease != view.lease_id:
                    why = "the member record is not this process's"
                elif not self.farm.swap_member(replace(record, handing_over=True), view.lease_id, kv.mod_revision):
                    why = "the member record changed while it was marked"
            except StoreError as exc:
                # Nothing is stopped yet, so the agent goes on. A mark that went in
                # with its reply lost stays until the next member write (which never
                # says handing_over): until then peers wait for the lease instead of
                # certifying a kill -9, the safe side.
                why = f"etcd did not answer: {exc}"
        if why:
            log.error("restart refused node=%s reason=%r: the agent goes on; SIGTERM stops it with a drain",
                      self.me, why)
            self.events.publish("handoff_refused", self.me, f"restart of {self.me} refused: {why}")
            return f"restart refused: {why}"
        # No way back from here: a successor adopts, or the lease ends.
        self.keeper.stop()
        self.supervisor.health.stop()
        sent = time.monotonic()
        try:
            self.farm.refresh_all((view.lease_id, view.applied_lease), deadline=self.timing.keepalive_interval)
            self.keeper.note_keepalive(sent)
        except LeaseExpired:
            self.keeper.mark_lost()
            self.stopping.set()
            return "restart: the lease was gone at the last keepalive; stopping instead"
        except StoreError:
            pass  # the last success still bounds the element
        until = handoff_until(self.keeper.view(), self.timing, self._link_up(), True)
        held = 0
        if until is not None:
            try:
                held = self.dp.hold_fence(until)
            except DataPlaneError as exc:
                log.error("could not extend the fence for the restart node=%s reason=%s", self.me, exc)
        try:
            self._save_state(self.dp.current, self.dp.fence_expires_at if held else 0.0)
        except DataPlaneError as exc:
            log.error("restart fence write failed node=%s reason=%s", self.me, exc)
        self.handed_off = True
        left = max(0.0, self.dp.fence_expires_at - time.monotonic()) if held else 0.0
        log.info("handing over node=%s lease=%x window=%.1fs: the next farmd must start within it",
                 self.me, view.lease_id, left)
        return f"handed over: a successor has {left:.1f} s to adopt lease {view.lease_id:x}"

    def close_after_handoff(self) -> None:
        """Exit without touching what the successor adopts: VIP, rules, leases, application."""
        if self._watch is not None:
            self._watch.cancel()
        self.liveness.stop()
        self.probe.close()
        self.store.close()
        self.events.close()
        log.info("stopped node=%s for a restart: VIP, rules, leases and application left to the successor",
                 self.me)

    def _revoke_quietly(self, *leases: int) -> None:
        for lease in leases:
            if lease:
                try:
                    self.farm.revoke(lease, deadline=1.0)
                except StoreError:
                    pass  # it expires by itself

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
                if not self._adopt():
                    self._register()
                break
            except StoreUnavailable as exc:
                # etcd went away between the probe and registration: same policy as at start.
                log.warning("etcd unreachable during registration retry_in=%.1fs reason=%s", delay, exc)
                self.stopping.wait(delay)
                delay = min(delay * 2, 10.0)
        # Order matters: the ARP rewrite must be in force before the VIP exists,
        # or a client could learn this node's own MAC for the VIP.
        first = self._base_spec(fence_open=True)
        if self.adopted is not None:
            # The predecessor's ruleset again, keeping its fence element: no
            # packet meets a gap (its element cannot outlive our deadline).
            a = self.adopted
            self.dp.adopt_fence(first.table, first.interface)
            first = first.with_buckets(a.accepting, a.draining, a.guarded)
        self.dp.apply(first, self.keeper.fence_deadline()[0])
        self._save_state(first)
        self.vip.up()
        self._watch = self.farm.watch(self.cache.on_event, start_revision=self.cache.revision + 1)
        self.keeper.start()
        self.liveness.start()
        if self.adopted is not None:
            self._shorten_adopted_fence()
            self.supervisor.resume(dict(self.adopted.checks))
        else:
            self.supervisor.run("start")

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

    # ---- the reconcile loop ----------------------------------------------

    def _scan_conntrack(self, now: float) -> None:
        """Count live connections per bucket while buckets drain (what decide() ends drains on)."""
        if not self.local.draining or now - self.conn_scan_at < CONNTRACK_SCAN_S:
            return
        try:
            self.conn_counts = live_connections_by_bucket(self.cfg.cluster.vips, self.rules,
                                                          self.cfg.cluster.unmatched, self.settings.buckets,
                                                          self.settings.seed)
            self.conn_scan_at = now
        except DataPlaneError as exc:
            log.warning("conntrack scan failed node=%s reason=%s", self.me, exc)

    def observe(self, snap: ClusterSnapshot) -> Observations:
        now = time.monotonic()
        self._scan_conntrack(now)
        desired, why = self._desired_state(snap)
        t = self.cfg.timing
        return Observations(now=time.monotonic(), lease=self.keeper.view(), link_up=self._link_up(),
                            desired_state=desired, desired_reason=why, conn_counts=self.conn_counts,
                            conn_scan_at=self.conn_scan_at, leave_started=self.leave_started,
                            drain_timeout=t.drain_timeout, stop_drain_timeout=t.stop_drain_timeout,
                            interface=self.cfg.node.interface, own_missing_since=self._own_missing_since)

    def cycle(self) -> str:
        """One reconcile step: observe, decide, act. Returns the plan's sentence."""
        snap = self.cache.snapshot()
        self._note_changes(snap)
        obs = self.observe(snap)
        plan = decide(self.me, self.timing, snap, self.local, obs)
        sentence = self.execute(plan, snap)
        self.supervisor.after_cycle(self.local.node_state, self.cache.snapshot().members.get(self.me),
                                    bool(self.local.accepting))
        self.keeper.loop_alive()  # a cycle finished: the loop does not hang
        return sentence

    def _write_deadline(self) -> float:
        # A write must not hold the loop longer than a keepalive may be late:
        # a failed one is simply decided again next cycle.
        return self.timing.late_after

    def execute(self, plan: Plan, snap: ClusterSnapshot) -> str:
        """Carry out a plan, edge by edge. ``self.local`` takes each step only once it happened."""
        try:
            return self._execute(plan, snap)
        except LeaseExpired:
            # A write with our lease was refused: it was revoked or expired.
            self.keeper.mark_lost()
            return "lease gone (a write with it was refused): fence closed"

    def _execute(self, plan: Plan, snap: ClusterSnapshot) -> str:
        sentence = plan.sentence()
        if plan.reason in (Reason.LEASE_LOST, Reason.LEASE_LOST_LEAVING):
            self._apply(plan)
            if plan.reason is Reason.LEASE_LOST:
                try:
                    self._register()
                except DuplicateMember:
                    return "lease lost; waiting for the old member key to expire before re-registering"
            return sentence
        if plan.member_write is not None:
            state, why = plan.member_write
            self.farm.announce(self._member(state, why), self.lease_id, deadline=self._write_deadline())
            if state != self.local.node_state:
                log.info("state change node=%s from=%s to=%s reason=%r", self.me, self.local.node_state,
                         state, why)
                self.events.publish("node_state", self.me, f"{self.local.node_state} -> {state}: {why}",
                                    old=self.local.node_state, new=state)
            self.local = plan.next
            return sentence
        if plan.table_write is not None:
            if not self.farm.write_table(plan.table_write, deadline=self._write_deadline()):
                sentence = f"table generation {plan.table_write.generation} was written by a peer first"
            self.local = plan.next
            return sentence
        self._apply(plan)
        if plan.publish is not None:
            # Invariant I: the kernel now accepts new connections only in T_g's
            # buckets for this node; the draining list goes out in the same write,
            # so a new owner guards those buckets from its first packet.
            rev = self.farm.publish_applied(self.me, plan.publish, self.keeper.view().applied_lease,
                                            deadline=self._write_deadline())
            self.local = replace(self.local, published=plan.publish, published_revision=rev)
        if plan.reason in (Reason.APPLIED, Reason.WAITING_FOR_PEERS, Reason.ACQUIRE_GRACE, Reason.NO_TABLE):
            self._observe_change_applied(snap, plan.reason is Reason.APPLIED)
        if plan.ready is not None and self.ready is not None:
            self.ready.set_ready(plan.ready)
        return sentence

    def _apply(self, plan: Plan) -> None:
        k = plan.kernel
        spec = self._base_spec(plan.fence_until is not None).with_buckets(
            bucket_ranges(k.accepting), k.draining, k.guarded)
        rebuilt = self.dp.current is None
        t0 = time.monotonic()
        if self.dp.apply(spec, plan.fence_until):
            self.metrics.apply_seconds.observe(time.monotonic() - t0)
            if rebuilt:
                # Our tables had vanished (flushed by another tool): while the ARP
                # rewrite was gone, clients may have cached this node's own MAC.
                self.vip.announce()
        # The loop is the only writer of self.local, so plan.next was decided from it.
        self.local = plan.next
        # Before anything is published about this kernel (a successor adopts
        # what the file says; etcd must never know of a release it lacks).
        self._save_state(spec)

    def _observe_change_applied(self, snap: ClusterSnapshot, complete: bool) -> None:
        """Membership change -> this node's kernel runs the resulting table: one histogram sample.

        Called only for a snapshot that needs no new table (a cycle that writes
        one returns before), so ``snap.table`` is the resulting table.
        """
        if not complete:
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
        watched = frozenset(self._watched_peers(snap))
        if watched != self._seen_watched:
            # A peer (re)started or changed: the watcher connects to it now, not
            # at its next idle wake-up, so that a death soon after is certified.
            self._seen_watched = watched
            self.liveness.poke()
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

    def run_loop(self) -> None:
        while True:
            self.wake.wait(self.cfg.timing.keepalive_interval)
            self.wake.clear()
            if self.restart_requested.is_set() and not self.stopping.is_set():
                self.restart_requested.clear()
                sentence = self._hand_off()
                log.info("cycle node=%s result=%r", self.me, sentence)
                self.last_sentence = sentence
                if self.handed_off:
                    return
            if self.stopping.is_set() and self.leave_started is None:
                self.leave_started = time.monotonic()
                log.info("leaving node=%s: handing over buckets before removing the VIP", self.me)
            try:
                sentence = self.cycle()
            except StoreUnavailable as exc:
                # etcd trouble is the keeper's to judge; the loop itself is fine.
                self.keeper.loop_alive()
                sentence = f"cycle failed: {exc}"
            except (StoreError, DataPlaneError) as exc:
                sentence = f"cycle failed: {exc}"
            except Exception as exc:  # a bug must not kill the loop silently
                log.exception("cycle crashed node=%s", self.me)
                sentence = f"cycle crashed: {type(exc).__name__}: {exc}"
            if sentence != self.last_sentence:
                log.info("cycle node=%s result=%r", self.me, sentence)
                self.last_sentence = sentence
            if self.leave_started is not None and self._leave_done():
                return

    # ---- graceful leave ----------------------------------------------------

    def _leave_done(self) -> bool:
        if self.keeper.view().lost:
            return True
        snap = self.cache.snapshot()
        handed_over = self._handed_over(snap)
        if not handed_over and time.monotonic() - self.leave_started > self.cfg.timing.leave_timeout:
            log.warning("leave timeout node=%s after=%.0fs: peers did not take over; leaving anyway",
                        self.me, self.cfg.timing.leave_timeout)
            return True
        # Established connections finish first; decide() ends them at
        # leave_started + stop_drain_timeout at the latest.
        return handed_over and not self.local.draining

    def _handed_over(self, snap: ClusterSnapshot) -> bool:
        """The table no longer gives this node buckets and every live peer applied it."""
        if snap.table is None:
            return True
        g = snap.table.generation
        if snap.table.owned_by(self.me) or self.local.accepting or self.local.published_generation != g:
            return False
        peers = snap.live() - {self.me}
        return all((a := snap.applied.get(p)) is not None and a.generation >= g for p in peers)

    def shutdown(self) -> None:
        """Stop serving, remove the VIP, then the rules, then the lease (never the other way round)."""
        self.keeper.stop()
        self.supervisor.health.stop()
        if self.ready is not None:
            self.ready.set_ready(False)
        if self.dp.current is not None and self.settings is not None:
            try:
                self.dp.apply(self._base_spec(fence_open=False).with_buckets((), ()), None)
                self.local = replace(self.local, accepting=frozenset(), draining={})
            except DataPlaneError as exc:
                log.error("could not close the fence node=%s reason=%s", self.me, exc)
        # Revoking the leases below deletes this node's records, and peers take
        # its buckets at once: an element that could not be closed must have
        # expired by itself first (at most fence_ms, as a certificate assumes).
        left = self.dp.fence_expires_at - time.monotonic() if self.dp.fence_expires_at else 0.0
        if left > 0:
            log.warning("fence element still open node=%s wait=%.2fs: waiting for it to expire before "
                        "releasing the lease", self.me, left)
            time.sleep(min(left, MAX_FENCE_MS / 1000))
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
        view = self.keeper.release()
        for lease in (view.lease_id, view.applied_lease):
            if not lease:
                continue
            try:
                self.farm.revoke(lease, deadline=2.0)
            except StoreError as exc:
                log.warning("lease revoke failed node=%s reason=%s (it expires by itself)", self.me, exc)
                break
        if self.state_path:
            remove_state(self.state_path)  # a graceful stop: nothing for a successor to adopt
        self.liveness.stop()
        self.probe.close()
        self.store.close()
        self.stop_module()
        self.events.close()
        log.info("stopped node=%s", self.me)

    def stop_module(self) -> None:
        self.supervisor.shutdown()

    # ---- operator requests and peer questions (gRPC threads) ---------------

    def request_drain(self, node_id: str, timeout: float | None) -> str:
        snap = self.cache.snapshot()
        if node_id not in snap.members:
            raise KeyError(f"no member named {node_id!r} in cluster {self.cfg.cluster.name!r} "
                           f"(members: {', '.join(sorted(snap.members)) or 'none'})")
        self.farm.request_drain(node_id, timeout)
        log.info("drain requested node=%s timeout=%s via=%s", node_id, timeout or "default", self.me)
        self.events.publish("drain_requested", node_id, f"drain of {node_id} requested through {self.me}",
                            timeout=timeout or "default")
        return f"{node_id} is draining: it takes no new connections and keeps established ones " \
               f"until they close or {timeout or 'its drain_timeout'} s pass"

    def request_undrain(self, node_id: str) -> str:
        snap = self.cache.snapshot()
        if node_id not in snap.members and node_id not in snap.drains:
            raise KeyError(f"no member named {node_id!r} in cluster {self.cfg.cluster.name!r}")
        existed = self.farm.cancel_drain(node_id)
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

    def etcd_reachability(self) -> tuple[bool, bool, float]:
        """(votes, reaches etcd, age of the last keepalive): what a peer asking under rule E hears.

        An agent that has not registered (or lost its lease) does not vote.
        """
        return self.keeper.reachability()

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
            "applied_generation": max(self.local.published_generation, 0),
            "owned_buckets": len(snap.table.owned_by(self.me)) if snap.table else 0,
            "accepting_buckets": len(self.local.accepting),
            "draining_buckets": len(self.local.draining),
            # What was written, not a kernel listing: no reader may take the
            # data plane's lock (peers' calls must never delay a fence refresh).
            "fence_open": self.dp.fence_held(),
            "etcd_state": self.keeper.etcd_state,
            "last_cycle": self.last_sentence,
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
        st = self.local
        lease = self.keeper.view()
        return {
            "node_id": self.me,
            "state": st.node_state,
            "state_reason": st.state_reason,
            "generation": snap.table.generation if snap.table else 0,
            "applied_generation": max(st.published_generation, 0),
            "owned_buckets": len(snap.table.owned_by(self.me)) if snap.table else 0,
            "accepting_buckets": len(st.accepting),
            "draining_buckets": len(st.draining),
            "draining_connections": sum(self.conn_counts.get(b, 0) for b in st.draining),
            "accepting_ranges": bucket_ranges(st.accepting),
            "fence_open": self.dp.fence_held(),
            "etcd_state": self.keeper.etcd_state,
            "last_keepalive_age_s": (time.monotonic() - lease.last_ok_sent
                                     if lease.last_ok_sent is not None else -1.0),
            "lease_id": f"{self.lease_id:x}" if self.lease_id else "",
            "counters": counters,
            "checks": [dataclasses.asdict(c) for c in self.supervisor.health.statuses()],
            "module": self.cfg.module.name,
            "restarts_in_window": self.supervisor.module.restarts_in_window(),
            "last_cycle": self.last_sentence,
            "vips": list(self.cfg.cluster.vips),
            "version": __version__,
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="farmd", description="nlbfarm node agent")
    ap.add_argument("--version", action="version", version=f"farmd {__version__}")
    ap.add_argument("--config", help="path to the YAML configuration (required unless --schema)")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ap.add_argument("--log-format", default="logfmt", choices=["logfmt", "kv", "json"],
                    help="logfmt lines (kv is its old name) or JSON lines with the same keys")
    ap.add_argument("--check", action="store_true", help="validate the configuration and exit")
    ap.add_argument("--print", dest="print_config", action="store_true",
                    help="with --check: print the effective configuration (every field, defaults filled in)")
    ap.add_argument("--schema", action="store_true",
                    help="print the JSON Schema of the configuration and exit (no --config needed)")
    args = ap.parse_args(argv)
    if args.schema:
        from nlbfarm.config import json_schema
        print(json.dumps(json_schema(), indent=2))
        return 0
    if not args.config:
        ap.error("--config is required")
    if args.print_config and not args.check:
        ap.error("--print goes with --check")
    setup_logging(args.log_level, args.log_format)

    def refuse(exc: Exception, rc: int) -> int:
        # --check talks to a person (or Ansible's validate): plain text. A running farmd's
        # stderr is its log, where every line is logfmt.
        if args.check:
            print(f"farmd: {exc}", file=sys.stderr)
        else:
            log.error("refusing to start reason=%s", exc)
        return rc

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        return refuse(exc, 2)
    if args.check:
        if args.print_config:
            from nlbfarm.config import effective_yaml
            print(f"# farmd: configuration {args.config} is valid; effective values:")
            print(effective_yaml(cfg), end="")
        else:
            print(f"farmd: configuration {args.config} is valid")
        return 0

    from nlbfarm.node.status import ReadyTracker, read_token, serve_status  # grpc only once we run

    try:
        token = read_token(cfg.status.token_file) if cfg.status.token_file else None
    except ConfigError as exc:
        return refuse(exc, 2)
    if token is None:
        log.warning("status.token_file is not set: drain and undrain through the API are refused")
    try:
        agent = Agent(cfg)  # builds the etcd store: its TLS files are read here
    except ConfigError as exc:
        return refuse(exc, 2)
    agent.ready = ReadyTracker()

    def on_signal(signum, _frame):
        log.info("signal=%s: graceful stop", signal.Signals(signum).name)
        agent.stopping.set()
        agent.wake.set()

    def on_restart(signum, _frame):
        log.info("signal=%s: handing over to the next farmd process", signal.Signals(signum).name)
        agent.restart_requested.set()
        agent.wake.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGUSR2, on_restart)

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
        rc = refuse(exc, 3)
    except ConfigError as exc:
        rc = refuse(exc, 2)
    except FarmError as exc:
        log.error("stopping on error reason=%s", exc)
        rc = 1
    finally:
        agent.stopping.set()
        if agent.handed_off:
            agent.close_after_handoff()
        elif agent.lease_id is not None or agent.dp.current is not None:
            agent.shutdown()
        if agent.ready is not None:
            agent.ready.shutdown()
        for server in servers:
            server.stop(grace=0.5)
        agent.metrics.close()
    return rc


if __name__ == "__main__":
    sys.exit(main())
