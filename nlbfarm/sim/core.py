"""Deterministic simulation of a farm: N decision cores, one etcd, a network, a fake clock.

Each simulated node runs farmd's own decisions: ``node.decide.decide`` for
the loop, the keeper's pure transitions (``after_keepalive_ok``,
``fence_deadline``, ``fence_seconds``, ``after_probe`` ...) and rule E's
``judge_answers``, fed by the real ``ClusterCache`` and ``build_snapshot``.
What is simulated is everything around them: etcd (keys, revisions, CAS,
leases with a reaper tick, watches that break and resync), the network
(per-direction links with latency), the kernel (accept set, fence element
with a timeout), the clock (per-node rate skew) and the agent's threads (as
generators, so a pause or a kill freezes or drops them).

A run is a pure function of its seed (FoundationDB's simulation testing,
with Jepsen-style nemeses in ``faults.py``). At every kernel change it checks
that no bucket is accepted by two nodes; once every fault has healed it
measures how long until every bucket is served again. A failing run prints
its seed and fault schedule, and ``python -m nlbfarm.sim --replay`` runs
exactly that schedule again.
"""
from __future__ import annotations

import heapq
import math
import random
import threading
from dataclasses import dataclass, field, replace

from nlbfarm.coordinator.cluster import ClusterSettings, Member, TableRecord
from nlbfarm.coordinator.farm import ClusterCache
from nlbfarm.coordinator.store import KV, WatchEvent
from nlbfarm.node.decide import (
    LeaseView, LocalState, Observations, Reason, Timing, after_adopt, after_keepalive_failed,
    after_keepalive_ok, after_probe, answers_reachable, decide, fence_deadline, own_record_present,
    remember_table)
from nlbfarm.coordinator.table import bucket_ranges
from nlbfarm.node.dataplane import HOLD_SLACK_S, MIN_FENCE_MS, fence_seconds
from nlbfarm.node.handoff import (
    HandoffState, adoption_refusal, continuity_refusal, handoff_refusal, handoff_until, local_after_adoption)
from nlbfarm.node.liveness import Back, Verdict, judge
from nlbfarm.node.peers import Peer, foreign_answer, judge_answers

PREFIX = "/nlbfarm/sim"
TIMEOUT = object()      # an RPC that got no answer in time
NOT_FOUND = object()    # etcd: lease not found
LEASE_MIN_TTL = 2       # etcd 3.4 with its default election timeout


class Violation(AssertionError):
    pass


@dataclass
class Answer:
    node_id: str
    instance: str
    voting: bool
    reachable: bool


# ---- etcd ---------------------------------------------------------------------------

@dataclass
class EtcdState:
    kv: dict = field(default_factory=dict)          # key -> (value, mod_revision, lease)
    leases: dict = field(default_factory=dict)      # lease -> [ttl, expiry]
    revision: int = 1
    next_lease: int = 0x1000

    def copy(self) -> "EtcdState":
        return EtcdState(dict(self.kv), {k: list(v) for k, v in self.leases.items()}, self.revision,
                         self.next_lease)


class Etcd:
    """One etcd: linearizable ops applied at arrival, a 500 ms lease reaper, watches."""

    def __init__(self, sim: "Sim"):
        self.sim = sim
        self.s = EtcdState()
        self.up = True
        self.watchers: dict[str, "SimNode"] = {}

    def _change(self, events: list[WatchEvent]) -> None:
        for w in sorted(self.watchers):
            self.sim.nodes[w].watch_push(events)

    def _put(self, key: str, value: bytes, lease: int) -> None:
        self.s.revision += 1
        self.s.kv[key] = (value, self.s.revision, lease)
        self._change([WatchEvent("put", key, value, self.s.revision, lease)])

    def _delete(self, keys: list[str]) -> None:
        keys = [k for k in keys if k in self.s.kv]
        if not keys:
            return
        self.s.revision += 1
        for k in keys:
            del self.s.kv[k]
        self._change([WatchEvent("delete", k, b"", self.s.revision) for k in keys])

    def apply(self, op: tuple):
        kind = op[0]
        s, now = self.s, self.sim.now
        if kind == "grant":
            s.next_lease += 1
            ttl = max(LEASE_MIN_TTL, int(op[1]))
            s.leases[s.next_lease] = [ttl, now + ttl]
            return s.next_lease
        if kind == "keepalive":
            lease = s.leases.get(op[1])
            if lease is None:
                return NOT_FOUND
            lease[1] = now + lease[0]
            return lease[0]
        if kind == "revoke":
            if s.leases.pop(op[1], None) is not None:
                self._delete(sorted(k for k, v in s.kv.items() if v[2] == op[1]))
            return True
        if kind in ("put", "create"):
            _, key, value, lease = op
            if lease and lease not in s.leases:
                return NOT_FOUND
            if kind == "create" and key in s.kv:
                return False
            self._put(key, value, lease)
            return s.revision if kind == "put" else True
        if kind == "cas":
            _, key, value, expected, *rest = op
            lease = rest[0] if rest else 0
            if lease and lease not in s.leases:
                return NOT_FOUND
            cur = s.kv.get(key)
            if (cur[1] if cur else 0) != expected:
                return False
            self._put(key, value, lease)
            return True
        if kind == "get":
            return s.kv.get(op[1])
        if kind == "delete":
            self._delete([op[1]])
            return True
        if kind == "txn_delete":  # Store.delete_if_unchanged
            expected = op[1]
            if any((s.kv[k][1] if k in s.kv else 0) != rev for k, rev in expected.items()):
                return False
            self._delete(sorted(k for k in expected if k in s.kv))
            return True
        if kind == "read":
            scope = op[1]
            return ({k: v for k, v in s.kv.items() if k.startswith(scope)}, s.revision)
        raise ValueError(kind)

    def reap(self) -> None:
        if self.up:
            expired = sorted(lid for lid, (_ttl, exp) in self.s.leases.items() if exp <= self.sim.now)
            for lid in expired:
                self.apply(("revoke", lid))
        self.sim.after(0.5, self.reap)

    def restart(self) -> None:
        """etcd back after an outage: a new leader extends every lease to its full TTL."""
        self.up = True
        for lease in self.s.leases.values():
            lease[1] = self.sim.now + lease[0]


# ---- nodes ------------------------------------------------------------------------------

@dataclass
class Kernel:
    """What a node's kernel does: survives an agent kill, not a node crash."""

    accepting: frozenset = frozenset()
    fence_open: bool = False          # the ruleset's intent (spec.fence_open)
    fence_expires: float = 0.0        # global time the element is gone (0: none)


class Proc:
    __slots__ = ("node", "gen", "incarnation", "waiting", "token")

    def __init__(self, node, gen):
        self.node, self.gen, self.incarnation = node, gen, node.incarnation
        self.waiting = False
        self.token = 0


class SimNode:
    def __init__(self, sim: "Sim", node_id: str, rate: float):
        self.sim = sim
        self.id = node_id
        self.rate = rate                 # local seconds per global second (clock skew)
        self.kernel = Kernel()
        self.lan_up = True
        self.paused = False
        self.parked: list = []
        self.incarnation = 0
        self.nft_delay = 0.002
        self.alive = False
        self.answer_as_self = False      # misconfigured wildcard peer address: dials lead back here
        self.rejects_peer = False        # a firewall on this node rejects the peer port (resets, alive)
        self.boot = 1                    # the machine's boot: a crash starts a new one
        self.state_file: HandoffState | None = None  # survives the agent, not the machine
        self.handoff_delay: float | None = None      # a planned restart was asked for; successor after this
        self.adoptions = 0
        self.machine_up = True           # False between a crash and the machine's restart
        self.retired: list[tuple[float, str]] = []  # (time, peer) this node certified dead
        self.adopted_fence_ms = 0
        self.phase_shift: dict[str, float] = {}  # thread -> seconds its next tick comes later
        self._boot()

    # -- agent lifecycle ------------------------------------------------------------------

    def _boot(self) -> None:
        self.incarnation += 1
        self.instance = f"{self.id}-{self.incarnation}"
        self.alive = True
        self.cache = ClusterCache(PREFIX, threading.Event())
        self.local = LocalState()
        self.view = LeaseView()
        self.loop_ok = self.clock()
        self.waiting_loop: Proc | None = None
        self.wake_pending = False
        self.watch_connected = False
        self.own_missing_since = None
        self.watch_rev = 0
        self.watch_sent_rev = 0
        self.watch_last_delivery = 0.0
        self.threads_stopped = False
        self.sentences: list[str] = []
        self.sim.spawn(self, self.main())

    def kill(self) -> None:
        """kill -9 of the agent: its threads stop; the kernel keeps its rules and fence element."""
        self.alive = False
        self.incarnation += 1
        self.parked = []
        self.sim.etcd.watchers.pop(self.id, None)

    def crash(self) -> None:
        """The whole node dies: the kernel goes with it."""
        self.kill()
        self.kernel = Kernel()
        self.boot += 1
        self.state_file = None
        self.machine_up = False
        self.sim.kernel_changed(self)

    def restart(self) -> None:
        self.incarnation += 1
        self.machine_up = True
        self._boot()

    def clock(self) -> float:
        return self.sim.now * self.rate

    def local_to_global(self, dt: float) -> float:
        return dt / self.rate

    # -- the kernel -------------------------------------------------------------------------

    def commit_ruleset(self, accepting: frozenset, fence_open: bool, until: float | None,
                       keep_element: bool = False) -> None:
        """``DataPlane.apply``: seconds decided when the transaction is sent, element set when it lands.

        ``keep_element``: an adopted element that cannot outlive ``until`` stays (a hitless restart).
        """
        k = self.kernel
        if (keep_element and fence_open and until is not None and k.fence_expires > self.sim.now
                and k.fence_expires <= self.sim.now + self.local_to_global(until - self.clock())):
            self.kernel = Kernel(accepting, True, k.fence_expires)
            self.sim.kernel_changed(self)
            return
        secs = fence_seconds(until, self.clock(), self.sim.timing.fence_timeout) if fence_open else 0
        self.kernel = Kernel(accepting, fence_open, self.sim.now + self.local_to_global(secs) if secs else 0.0)
        self._after_fence_write(secs, until)
        self.sim.kernel_changed(self)

    def refresh_fence(self, until: float | None) -> None:
        """``DataPlane.refresh_fence``."""
        if not self.kernel.fence_open:
            return
        secs = fence_seconds(until, self.clock(), self.sim.timing.fence_timeout)
        self.kernel = replace(self.kernel, fence_expires=self.sim.now + self.local_to_global(secs) if secs else 0.0)
        self._after_fence_write(secs, until)
        self.sim.kernel_changed(self)

    def _after_fence_write(self, secs: int, until: float | None) -> None:
        done = self.clock()
        if secs and until is not None and done + secs > until:
            self.kernel = replace(self.kernel, fence_expires=0.0)

    def close_fence(self) -> None:
        self.kernel = replace(self.kernel, fence_expires=0.0)

    # -- watch ---------------------------------------------------------------------------------

    def watch_push(self, events: list[WatchEvent]) -> None:
        if not self.alive or not self.watch_connected:
            return
        if not self.sim.net.etcd_to(self.id):
            self.watch_connected = False  # the stream broke; the watch process reconnects
            return
        t = max(self.sim.now + self.sim.latency(), self.watch_last_delivery + 1e-6)
        self.watch_last_delivery = t
        self.watch_sent_rev = max([self.watch_sent_rev] + [ev.mod_revision for ev in events])
        inc = self.incarnation
        self.sim.at(t, lambda: self._deliver(events, inc))

    def _deliver(self, events, inc) -> None:
        if inc != self.incarnation or not self.alive:
            return
        if self.paused:
            self.parked.append(("deliver", events, inc))
            return
        for ev in events:
            self.cache.on_event(ev)
            # The last revision delivered (a rewound resync sets it back, as EtcdStore's watch does).
            self.watch_rev = ev.mod_revision if ev.rewound else max(self.watch_rev, ev.mod_revision)
        self.wake()

    def watch_proc(self):
        """Reconnect a broken watch: a resync (a full read) once etcd is reachable again."""
        while True:
            if not self.watch_connected and self.sim.net.etcd_to(self.id) and self.sim.net.to_etcd(self.id) \
                    and self.sim.etcd.up:
                self.sim.etcd.watchers[self.id] = self
                items, rev = self.sim.etcd.apply(("read", PREFIX + "/"))
                # Against what the stream already carried, delivered or still on
                # its way: EtcdStore's watch thread reads and delivers in turn,
                # so it never compares with a revision older than one it passed on.
                rewound = rev < max(self.watch_rev, self.watch_sent_rev)
                self.watch_connected = True
                self.watch_last_delivery = self.sim.now
                snap = {k: KV(k, v, r, le) for k, (v, r, le) in items.items()}
                self.watch_push([WatchEvent("resync", PREFIX + "/", b"", rev, snapshot=snap, rewound=rewound)])
            yield ("sleep", 0.2)

    # -- the agent's threads -------------------------------------------------------------------

    def wake(self) -> None:
        """``Agent.wake.set()``: a wake while the loop is busy is kept for its next wait."""
        p = self.waiting_loop
        if p is not None and p.waiting:
            p.waiting = False
            p.token += 1
            self.sim.after(0, lambda: self.sim.step(p))
        else:
            self.wake_pending = True

    def rpc(self, op, timeout=None):
        return ("rpc", op, self.sim.timing.etcd_timeout if timeout is None else timeout)

    def call(self, op, deadline: float):
        """A store call: attempts until ``deadline`` (local seconds from now) as EtcdStore retries."""
        end = self.clock() + deadline
        backoff = 0.05
        while True:
            r = yield self.rpc(op)
            if r is not TIMEOUT or self.clock() >= end:
                return r
            yield ("sleep", min(backoff, max(0.0, end - self.clock())))
            backoff = min(backoff * 2, 1.0)

    def main(self):
        t = self.sim.timing
        adopted = yield from self.adopt()
        while not adopted:  # registration, as Agent.start
            ok = yield from self.register()
            if ok:
                break
            yield ("sleep", 0.5)
        first = self.state_file.accepting if adopted else ()
        self.commit_ruleset(frozenset(b for lo, hi in first for b in range(lo, hi + 1)), True,
                            fence_deadline(self.view, t, self.lan_up, True)[0], keep_element=adopted)
        self.save_state()
        self.sim.spawn(self, self.watch_proc())
        self.sim.spawn(self, self.keepalive_proc())
        self.sim.spawn(self, self.fence_proc())
        self.sim.spawn(self, self.prober_proc())
        self.sim.spawn(self, self.liveness_proc())
        if adopted and self.adopted_fence_ms:
            yield ("sleep", 0.05)  # the rest of Agent.start(): the VIP, the watch, the threads
            yield from self.shorten_adopted_fence()
        while True:
            yield ("wait", t.keepalive_interval)
            if self.handoff_delay is not None:
                delay, self.handoff_delay = self.handoff_delay, None
                done = yield from self.hand_off(delay)
                if done:
                    return
            yield from self.cycle()
            self.loop_ok = self.clock()

    # -- hitless restarts (node/handoff.py) ---------------------------------------------------

    def save_state(self) -> None:
        """``Agent._save_state``: after every kernel change, before anything is published."""
        v = self.view
        if not v.registered:
            return
        self.state_file = HandoffState(
            node_id=self.id, prefix=PREFIX, boot_id=str(self.boot), instance=self.instance, pid=0, pid_start=0,
            revision=self.cache.revision,
            lease_id=v.lease_id, applied_lease=v.applied_lease, table="nlbfarm", interface="lan0",
            accepting=tuple(bucket_ranges(self.kernel.accepting)), drains=self.local.draining,
            acquire_after=v.acquire_after)

    def hand_off(self, delay: float):
        """``Agent._hand_off``; the successor boots ``delay`` seconds later."""
        t = self.sim.timing
        snap = self.cache.snapshot()
        refusal = handoff_refusal(self.view, t, self.clock(), leaving=False, ruleset=self.kernel.fence_open,
                                  link_up=self.lan_up, member_present=self.id in snap.members)
        if refusal is not None:
            return False
        key = f"{PREFIX}/members/{self.id}"
        cur = yield self.rpc(("get", key))
        if cur is TIMEOUT or cur is None:
            return False
        try:
            record = Member.decode(self.id, cur[0])
        except ValueError:
            return False
        if record.instance != self.instance or cur[2] != self.view.lease_id:
            return False
        r = yield self.rpc(("cas", key, replace(record, handing_over=True).encode(), cur[1], self.view.lease_id))
        if r is not True:
            return False
        self.stop_threads()  # no way back: the keeper stops before the last keepalive
        sent = self.clock()
        v = self.view
        r = yield self.rpc(("keepalive", v.lease_id))
        if r is not TIMEOUT and r is not NOT_FOUND:
            r = yield self.rpc(("keepalive", v.applied_lease))
        if r is NOT_FOUND:
            self.lease_lost()
            return False
        if r is not TIMEOUT:
            self.view = after_keepalive_ok(self.view, sent, self.clock(), t)
        until = handoff_until(self.view, t, self.lan_up, True)
        held = 0.0
        if until is not None and self.kernel.fence_open:
            held = max(0.0, until - self.clock() - HOLD_SLACK_S)
            held = held if held * 1000 >= MIN_FENCE_MS else 0.0
            self.kernel = replace(self.kernel, fence_expires=self.sim.now + self.local_to_global(held)
                                  if held else 0.0)
            self.sim.kernel_changed(self)
        self.save_state()
        self.state_file = replace(self.state_file, handing_over_until=self.clock() + held if held else 0.0)
        self.kill()
        self.sim.after(delay, self.restart)
        return True

    def shorten_adopted_fence(self):
        """``Agent._shorten_adopted_fence``: rewrite the element, then publish the normal figure by CAS."""
        t = self.sim.timing
        self.refresh_fence(fence_deadline(self.view, t, self.lan_up, self.member_present())[0])
        if self.kernel.fence_expires - self.sim.now > self.local_to_global(t.fence_timeout):
            return
        key = f"{PREFIX}/members/{self.id}"
        cur = yield self.rpc(("get", key))
        if cur is TIMEOUT or cur is None:
            return
        try:
            record = Member.decode(self.id, cur[0])
        except ValueError:
            return
        if record.instance != self.instance:
            return
        self.adopted_fence_ms = 0
        r = yield self.rpc(("cas", key, self.member(record.state, record.reason).encode(), cur[1], cur[2]))
        if r is not True:
            self.adopted_fence_ms = record.fence_ms  # not published: keep saying the longer figure

    def liveness_proc(self):
        """``LivenessWatch`` and ``Agent.retire_dead``: certify a peer dead when its listener refuses.

        A connection is refused when the peer's machine is up and reachable but
        its agent process is gone; a paused agent still listens; a crashed
        machine, or a cut link, does not answer at all.
        """
        t = self.sim.timing
        verified: set[tuple[str, str]] = set()
        refused: dict[str, list] = {}   # node -> [instance, refused_at, back_gone_at]
        while True:
            yield ("sleep", 0.02)
            if self.threads_stopped:
                return
            snap = self.cache.snapshot()
            for m in sorted(snap.members.values(), key=lambda m: m.id):
                if m.id == self.id or not m.peer or not m.fence_ms or m.handing_over:
                    continue
                other = self.sim.nodes.get(m.peer.removeprefix("peer:"))
                if other is None or not other.machine_up or not self.sim.net.peer(self.id, other.id) \
                        or not self.sim.net.peer(other.id, self.id):
                    continue  # no answer at all
                if (other.alive and not other.rejects_peer) or other.answer_as_self:
                    a = other.answer(self)
                    if a is not None and foreign_answer(self.id, self.instance, Peer(m.id, m.instance, m.peer),
                                                        a) is None:
                        verified.add((m.id, m.instance))
                    refused.pop(m.id, None)
                    continue
                if (m.id, m.instance) in verified and refused.get(m.id, ("",))[0] != m.instance:
                    # Rule 5's "seen" holds: a verified peer is alive, so its watcher
                    # connected here (the sim has no lost or late connection).
                    refused[m.id] = [m.instance, self.clock(), None]
            for node_id, entry in sorted(refused.items()):
                instance, at, _ = entry
                rec = snap.members.get(node_id)
                other = self.sim.nodes.get(node_id)
                # A live agent (any process on that machine, as the socket table
                # shows connections by address) keeps its connection here: a firewall
                # that rejects the peer port does not close it; a dead one's kernel did.
                back = Back.OPEN if other is not None and other.alive else Back.CLOSED
                # As LivenessWatch._back: the fence counts from when the connection
                # was first seen gone (the watcher may have been paused meanwhile).
                if back is Back.CLOSED and entry[2] is None:
                    entry[2] = self.clock()
                elif back is not Back.CLOSED:
                    entry[2] = None
                verdict, _due = judge(rec, instance, True, at, self.clock(), t.fence_timeout, back, entry[2])
                if verdict is Verdict.WAIT:
                    continue
                del refused[node_id]
                # As LivenessWatch: only the first attempt after a verified connection
                # closed certifies; another needs a new verified connection first.
                verified.discard((node_id, instance))
                if verdict is not Verdict.DEAD:
                    continue
                mkey, akey = f"{PREFIX}/members/{node_id}", f"{PREFIX}/applied/{node_id}"
                cur = yield self.rpc(("get", mkey))
                app = yield self.rpc(("get", akey))
                if cur is TIMEOUT or app is TIMEOUT or cur is None:
                    continue
                try:
                    fresh = Member.decode(node_id, cur[0])
                except ValueError:
                    continue
                if judge(fresh, instance, True, at, self.clock(), t.fence_timeout, back,
                         entry[2])[0] is not Verdict.DEAD:
                    continue
                r = yield self.rpc(("txn_delete", {mkey: cur[1], akey: app[1] if app else 0}))
                if r is True:
                    self.retired.append((self.sim.now, node_id))
                    for lease in (cur[2], app[2] if app else 0):
                        if lease:
                            yield self.rpc(("revoke", lease))

    def stop_threads(self) -> None:
        """Every thread but the loop's stops (the loop ends right after)."""
        self.threads_stopped = True

    def adopt(self):
        """``Agent._adopt``: the same checks, in the same order."""
        t = self.sim.timing
        state = self.state_file
        if state is None:
            return False
        items = yield from self.call(("read", PREFIX + "/"), 5.0)
        if items is TIMEOUT:
            return False
        kvs, rev = items
        cur = kvs.get(f"{PREFIX}/members/{self.id}")
        record = None
        if cur is not None:
            try:
                record = Member.decode(self.id, cur[0])
            except ValueError:
                record = None
        if adoption_refusal(state, self.id, PREFIX, str(self.boot), cur[2] if cur else None, record) is not None:
            return False
        left = self.kernel.fence_expires - self.sim.now if self.kernel.fence_open else 0.0
        if continuity_refusal(state, left, rev) is not None:
            # Close the dead predecessor's element; register anew once its record is gone.
            self.close_fence()
            self.sim.kernel_changed(self)
            return False
        sent = self.clock()
        r = yield self.rpc(("keepalive", state.lease_id))
        if r is not TIMEOUT and r is not NOT_FOUND:
            r = yield self.rpc(("keepalive", state.applied_lease))
        if r is TIMEOUT or r is NOT_FOUND:
            self.close_fence()
            self.sim.kernel_changed(self)
            return False
        long_ms = int(math.ceil(left * 1000)) + 1
        member = self.member(record.state, record.reason, fence_ms=long_ms)
        r = yield self.rpc(("cas", f"{PREFIX}/members/{self.id}", member.encode(), cur[1], state.lease_id))
        if r is not True:
            self.close_fence()
            self.sim.kernel_changed(self)
            return False
        self.cache.reset(dict(kvs), rev)
        v = after_adopt(state.lease_id, state.applied_lease, sent, self.clock(), t)
        self.view = replace(v, acquire_after=max(v.acquire_after, state.acquire_after))
        self.local = remember_table(local_after_adoption(state, record.state, record.reason),
                                    self.cache.snapshot().table, self.clock(), t.table_memory)
        self.adoptions += 1
        self.adopted_fence_ms = long_ms if long_ms > int(math.ceil(t.fence_timeout * 1000)) else 0
        return True

    def register(self):
        t = self.sim.timing
        sent = self.clock()
        old = self.view
        lease = yield from self.call(("grant", t.lease_ttl), 5.0)
        if lease is TIMEOUT:
            return False
        applied_lease = yield from self.call(("grant", t.lease_ttl), 5.0)
        if applied_lease is TIMEOUT:
            return False
        member = self.member(*self.desired())
        created = yield from self.call(("create", f"{PREFIX}/members/{self.id}", member.encode(), lease), 5.0)
        if created is not True:
            yield from self.call(("revoke", lease), 1.0)
            return False
        items = yield from self.call(("read", PREFIX + "/"), 5.0)
        if items is TIMEOUT:
            return False
        kvs, rev = items
        self.cache.reset(dict(kvs), rev)
        self.view = after_adopt(lease, applied_lease, sent, self.clock(), t)
        if old.registered:
            for stale in (old.lease_id, old.applied_lease):
                yield from self.call(("revoke", stale), 1.0)
        self.local = remember_table(replace(self.local, published=None, published_revision=0),
                                    self.cache.snapshot().table, self.clock(), t.table_memory)
        return True

    def member(self, state: str, why: str, fence_ms: int = 0, handing_over: bool = False) -> Member:
        """``Agent._member``: the record names the longest fence element this process may have left."""
        own = int(math.ceil(self.sim.timing.fence_timeout * 1000))
        return Member(self.id, 1, state, (), "sim", self.instance, f"peer:{self.id}", why, "",
                      handing_over=handing_over, fence_ms=max(own, fence_ms, self.adopted_fence_ms))

    def desired(self) -> tuple[str, str]:
        if not self.lan_up:
            return "failed", "link lan0 is down"
        return "active", "no checks configured"

    def cycle(self):
        t = self.sim.timing
        snap = self.cache.snapshot()
        now = self.clock()
        state, why = self.desired()
        obs = Observations(now=now, lease=self.view, link_up=self.lan_up, desired_state=state,
                           desired_reason=why, conn_counts={}, conn_scan_at=now,
                           own_missing_since=self.own_missing_since)
        plan = decide(self.id, t, snap, self.local, obs)
        self.sentences.append(plan.reason.value)
        if len(self.sentences) > 50:
            del self.sentences[:25]
        write = t.late_after
        if plan.reason in (Reason.LEASE_LOST, Reason.LEASE_LOST_LEAVING):
            self.commit_ruleset(frozenset(), False, None)
            self.local = plan.next
            ok = yield from self.register()
            if ok:
                self.commit_ruleset(self.kernel.accepting, True, fence_deadline(self.view, t, self.lan_up, True)[0])
                self.save_state()
            return
        lease = self.view.lease_id
        if plan.member_write is not None:
            st, why = plan.member_write
            member = self.member(st, why)
            r = yield from self.call(("put", f"{PREFIX}/members/{self.id}", member.encode(), lease), write)
            if r is NOT_FOUND:
                self.lease_lost()
            elif r is not TIMEOUT:
                self.local = plan.next
            return
        if plan.table_write is not None:
            u = plan.table_write
            yield from self.call(("cas", f"{PREFIX}/table", TableRecord.encode(u.generation, u.owners),
                                  u.expected_revision), write)
            self.local = plan.next
            return
        k = plan.kernel
        yield ("sleep", self.nft_delay)  # the transaction's own time (slow nft: long)
        # As DataPlane.apply: an open fence's element that cannot outlive the
        # deadline stays through the rebuild (it is not rewritten to fence_timeout).
        self.commit_ruleset(k.accepting, plan.fence_until is not None, plan.fence_until,
                            keep_element=self.kernel.fence_open)
        self.local = plan.next
        self.save_state()
        if plan.publish is not None:
            r = yield from self.call(("put", f"{PREFIX}/applied/{self.id}", plan.publish.encode(),
                                      self.view.applied_lease), write)
            if r is NOT_FOUND:
                self.lease_lost()
            elif r is not TIMEOUT:
                self.local = replace(self.local, published=plan.publish, published_revision=r)

    def lease_lost(self) -> None:
        self.view = replace(self.view, lost=True)
        self.close_fence()
        self.sim.kernel_changed(self)
        self.wake()

    def member_present(self) -> bool:
        snap = self.cache.snapshot()
        if self.id in snap.members:
            self.own_missing_since = None
        elif self.own_missing_since is None:
            self.own_missing_since = self.clock()
        return own_record_present(self.id, snap, self.own_missing_since, self.clock(), self.sim.timing)

    def keepalive_proc(self):
        t = self.sim.timing
        while True:
            yield ("sleep", t.keepalive_interval + self.take_phase("keepalive"))
            if self.threads_stopped:
                return
            v = self.view
            if not v.registered or v.lost:
                continue
            if self.clock() - self.loop_ok > t.lease_ttl:
                self.view = replace(v, loop_stuck=True)
                continue
            if v.loop_stuck:
                self.view = replace(v, loop_stuck=False)
            sent = self.clock()
            r = yield self.rpc(("keepalive", v.lease_id))
            if r is not TIMEOUT and r is not NOT_FOUND:
                r = yield self.rpc(("keepalive", v.applied_lease))
            if self.view.lease_id != v.lease_id:
                continue  # re-registered meanwhile
            if r is NOT_FOUND:
                self.lease_lost()
            elif r is TIMEOUT:
                self.view = after_keepalive_failed(self.view, sent)
            else:
                self.view = after_keepalive_ok(self.view, sent, self.clock(), t)
            self.wake()

    def take_phase(self, thread: str) -> float:
        """A one-off shift of a thread's tick (the "phase" fault): agents started apart."""
        return self.phase_shift.pop(thread, 0.0)

    def fence_proc(self):
        t = self.sim.timing
        while True:
            yield ("sleep", t.fence_refresh)
            if self.threads_stopped:
                return
            until, _ = fence_deadline(self.view, t, self.lan_up, self.member_present())
            self.refresh_fence(until)

    def prober_proc(self):
        t = self.sim.timing
        while True:
            yield ("sleep", t.keepalive_interval + self.take_phase("prober"))
            if self.threads_stopped:
                return
            v = self.view
            if not v.registered or v.lost or v.last_ok_sent is None:
                continue
            if self.clock() - v.last_ok_sent < t.late_after:
                continue
            started = self.clock()
            snap = self.cache.snapshot()
            peers = [Peer(m.id, m.instance, m.peer) for m in snap.members.values() if m.id != self.id]
            peers += [Peer(n, "", "") for n in sorted(snap.orphans() - {self.id})]
            answers = yield ("ask", [p for p in peers if p.addr])
            down, _why = judge_answers(self.id, self.instance, peers, answers)
            self.view = after_probe(self.view, started, v.last_ok_sent, down, t, self.clock())
            self.wake()

    def answer(self, asker: "SimNode") -> Answer | None:
        """What this agent answers a peer (EtcdReachability)."""
        if self.answer_as_self:
            return asker.answer_self()
        if not self.alive or self.paused or self.rejects_peer:
            return None
        voting = answers_reachable(self.view, self.sim.timing, self.clock())
        return Answer(self.id, self.instance, voting is not None, bool(voting))

    def answer_self(self) -> Answer:
        voting = answers_reachable(self.view, self.sim.timing, self.clock())
        return Answer(self.id, self.instance, voting is not None, bool(voting))


# ---- network ---------------------------------------------------------------------------------

class Network:
    def __init__(self, sim: "Sim"):
        self.sim = sim
        self.cut_to_etcd: dict[str, int] = {}
        self.cut_from_etcd: dict[str, int] = {}
        self.cut_peer: dict[tuple[str, str], int] = {}

    def to_etcd(self, n: str) -> bool:
        return self.sim.etcd.up and not self.cut_to_etcd.get(n)

    def etcd_to(self, n: str) -> bool:
        return self.sim.etcd.up and not self.cut_from_etcd.get(n)

    def peer(self, a: str, b: str) -> bool:
        na, nb = self.sim.nodes[a], self.sim.nodes[b]
        return na.lan_up and nb.lan_up and not self.cut_peer.get((a, b))


# ---- the simulation ------------------------------------------------------------------------------

class Sim:
    def __init__(self, seed: int, schedule: list[dict], *, nodes: int = 3, buckets: int = 64,
                 timing: Timing | None = None, skew: float = 0.0):
        self.seed = seed
        self.rng = random.Random(seed)
        self.timing = timing or Timing(3, 0.4, 0.5, 1.0)
        self.buckets = buckets
        self.schedule = schedule
        self.now = 0.0
        self._q: list = []
        self._seq = 0
        self.extra_latency = 0.0
        self.etcd = Etcd(self)
        self.etcd.s.kv[f"{PREFIX}/cluster"] = (ClusterSettings(12345, buckets).encode(), 1, 0)
        self.net = Network(self)
        self.nodes: dict[str, SimNode] = {}
        self.violations: list[str] = []
        self.log: list[str] = []
        for i in range(nodes):
            nid = f"n{i + 1}"
            rate = 1.0 + (self.rng.uniform(-skew, skew) if skew else 0.0)
            self.nodes[nid] = SimNode(self, nid, rate)
        self.etcd.reap()

    # -- scheduling -----------------------------------------------------------------------------

    def at(self, t: float, fn) -> None:
        self._seq += 1
        heapq.heappush(self._q, (t, self._seq, fn))

    def after(self, dt: float, fn) -> None:
        self.at(self.now + dt, fn)

    def latency(self) -> float:
        return 0.0005 + self.rng.random() * 0.002 + self.extra_latency

    def spawn(self, node: SimNode, gen) -> None:
        p = Proc(node, gen)
        self.after(0, lambda: self.step(p, None))

    def step(self, p: Proc, value=None) -> None:
        node = p.node
        if p.incarnation != node.incarnation:
            return
        if node.paused:
            node.parked.append(("step", p, value))
            return
        try:
            cmd = p.gen.send(value)
        except StopIteration:
            return
        kind = cmd[0]
        if kind == "sleep":
            self.after(node.local_to_global(cmd[1]), lambda: self.step(p))
        elif kind == "wait":
            if node.wake_pending:
                node.wake_pending = False
                self.after(0, lambda: self.step(p))
                return
            p.waiting = True
            p.token += 1
            token = p.token
            node.waiting_loop = p

            def timeout():
                if p.waiting and p.token == token:
                    p.waiting = False
                    self.step(p)
            self.after(node.local_to_global(cmd[1]), timeout)
        elif kind == "rpc":
            self._rpc(p, cmd[1], node.local_to_global(cmd[2]))
        elif kind == "ask":
            self._ask(p, cmd[1])
        else:
            raise ValueError(kind)

    def _rpc(self, p: Proc, op, timeout: float) -> None:
        node = p.node
        state = {"done": False}

        def finish(value):
            if not state["done"]:
                state["done"] = True
                self.step(p, value)

        self.after(timeout, lambda: finish(TIMEOUT))
        if not self.net.to_etcd(node.id):
            return
        lat = self.latency()

        def arrive():
            if not self.etcd.up:
                return
            result = self.etcd.apply(op)
            if self.net.etcd_to(node.id):
                self.after(self.latency(), lambda: finish(result))
        self.after(lat, arrive)

    def _ask(self, p: Proc, peers: list[Peer]) -> None:
        """Each peer answers when the ask reaches it; the prober reads them all when the
        last one is in, or at its timeout, and records the verdict when it next runs
        (later, if it is paused meanwhile)."""
        node = p.node
        answers: dict = {}
        timeout = node.local_to_global(self.timing.probe_timeout)
        reachable = [peer for peer in peers
                     if (other := self.nodes.get(peer.addr.removeprefix("peer:"))) is not None
                     and self.net.peer(node.id, other.id) and self.net.peer(other.id, node.id)]
        lat = self.latency()
        for peer in reachable:
            other = self.nodes[peer.addr.removeprefix("peer:")]

            def arrive(peer=peer, other=other):
                a = other.answer(node)
                if a is not None:
                    answers[peer.id] = a
            self.after(lat, arrive)
        everyone = len(reachable) == len(peers) and all(
            self.nodes[peer.addr.removeprefix("peer:")].answer(node) is not None for peer in reachable)
        self.after(min(timeout, 2 * lat + 1e-6) if everyone else timeout, lambda: self.step(p, answers))

    # -- invariants ---------------------------------------------------------------------------------

    def holders(self) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for nid in sorted(self.nodes):
            k = self.nodes[nid].kernel
            if k.fence_expires > self.now:
                for b in k.accepting:
                    out.setdefault(b, []).append(nid)
        return out

    def kernel_changed(self, node: SimNode) -> None:
        k = node.kernel
        if k.fence_expires <= self.now or not k.accepting:
            return
        for other in self.nodes.values():
            if other is node or other.kernel.fence_expires <= self.now:
                continue
            both = k.accepting & other.kernel.accepting
            if both:
                self.violations.append(f"t={self.now:.3f}: buckets {sorted(both)[:8]} accepted by "
                                       f"{node.id} and {other.id}")
                raise Violation(self.violations[-1])

    def served(self) -> bool:
        h = self.holders()
        return all(len(h.get(b, ())) == 1 for b in range(self.buckets))

    # -- running ------------------------------------------------------------------------------------

    def run(self, until: float) -> None:
        """Play events up to ``until``, or to ``stop_at`` if something sets it earlier."""
        self.stop_at = until
        while self._q and self._q[0][0] <= self.stop_at:
            t, _, fn = heapq.heappop(self._q)
            self.now = t
            fn()
        self.now = self.stop_at

